"""petri.errors: the SDK's exception tree (defined in petri.sdk.errors; see its docstring)."""

from petri.sdk.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    Deleted,
    Expired,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    PetriError,
    QuotaExceeded,
    ResourceExhausted,
    Terminated,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "Deleted",
    "Expired",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutcomeUnknown",
    "PermissionDenied",
    "PetriError",
    "QuotaExceeded",
    "ResourceExhausted",
    "Terminated",
    "Unauthenticated",
    "Unavailable",
]
