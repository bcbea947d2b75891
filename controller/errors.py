"""The controller's exception tree, and its one mapping to gRPC status codes.

    PetriError                    INTERNAL (abstract: only its subclasses are raised)
    ├── Unauthenticated           UNAUTHENTICATED    no, malformed or unknown bearer token
    ├── PermissionDenied          PERMISSION_DENIED  the token may not use that project
    ├── InvalidArgument           INVALID_ARGUMENT   bad name, filter, page token, ttl, ...
    ├── NotFound                  NOT_FOUND          no such sandbox (or it expired / was deleted)
    ├── AlreadyExists             ALREADY_EXISTS     sandbox_id taken in the project
    ├── FailedPrecondition        FAILED_PRECONDITION  sandbox not RUNNING, limit not enforceable
    ├── ResourceExhausted         RESOURCE_EXHAUSTED over a size limit or a quota (named)
    │   └── QuotaExceeded                              a project's quota of sandboxes is full
    ├── DeadlineExceeded          DEADLINE_EXCEEDED  an execution's input files did not all arrive;
    │                                                  a create's deadline passed in line
    ├── Cancelled                 CANCELLED          the caller cancelled an upload: nothing ran
    ├── Unavailable               UNAVAILABLE        podman or the sandbox's executor unreachable;
    │                                                  nothing ran, so a retry is safe
    └── OutcomeUnknown            UNKNOWN            the executor failed after the code was sent:
                                                     it may have run, a blind retry may repeat it

    ExecutorFailed (not a PetriError: not for the caller's eyes) a call to a sandbox's executor
    ended without its answer; the sandboxes layer judges what it means and raises one of the
    above. One that escapes is an internal error, like any other exception.

Every message is meant for the caller: it says what was wrong and what to do. Errors of the
user's code are not here: they are execution results. Foreign errors (podman, OS, gRPC to the
executor) are translated where they happen, with `raise ... from exc`. A `reason` (with its
`metadata`) tells programs which case it is, e.g. NotFound with SANDBOX_EXPIRED {expire_time}.
"""

import grpc
from google.protobuf import any_pb2

from petri.v1 import error_details_pb2

# AIP-193 rich error details: a google.rpc.Status, serialized, in this trailing metadata.
STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN = "petri"


class PetriError(Exception):
    """Base of the controller's errors; its message is shown to the caller. `reason` (an
    UPPER_SNAKE_CASE word, e.g. SANDBOX_EXPIRED) and `metadata` are sent with it as AIP-193
    error details (an ErrorInfo), for programs to act on."""

    status = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, *, reason: str = "", metadata: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


def status_details(exc: PetriError) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata of a call that fails with `exc`: its status, message and (with a
    reason) an ErrorInfo, as google.rpc.Status (petri.v1.Status is wire-identical)."""
    status = error_details_pb2.Status(code=exc.status.value[0], message=str(exc))
    if exc.reason:
        info = error_details_pb2.ErrorInfo(
            reason=exc.reason, domain=ERROR_DOMAIN, metadata=exc.metadata
        )
        status.details.append(
            any_pb2.Any(type_url=ERROR_INFO_TYPE_URL, value=info.SerializeToString())
        )
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


class Unauthenticated(PetriError):
    status = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(PetriError):
    status = grpc.StatusCode.PERMISSION_DENIED


class InvalidArgument(PetriError):
    status = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PetriError):
    status = grpc.StatusCode.NOT_FOUND


class AlreadyExists(PetriError):
    status = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PetriError):
    status = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(PetriError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class QuotaExceeded(ResourceExhausted):
    """A project has as many sandboxes as max_sandboxes_per_project allows: raised by the
    quota checks, and by the registry, which counts and adds a sandbox atomically."""

    def __init__(self, project: str, live: int, limit: int, starting: int = 0) -> None:
        more = f" and {starting} more being created" if starting else ""
        super().__init__(
            f"project {project!r} has {live} sandboxes{more}, its quota of {limit}: "
            "delete some first",
            reason="QUOTA_EXCEEDED",
            metadata={"quota": "max_sandboxes_per_project", "limit": str(limit)},
        )


class DeadlineExceeded(PetriError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PetriError):
    status = grpc.StatusCode.CANCELLED


class Unavailable(PetriError):
    status = grpc.StatusCode.UNAVAILABLE


class OutcomeUnknown(PetriError):
    status = grpc.StatusCode.UNKNOWN


class ExecutorFailed(Exception):
    """A call to a sandbox's executor ended without its answer (runtime.executor_client).
    Carries what the caller needs to decide what it means, without gRPC's types."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        # The name of the call's gRPC status code, e.g. "UNAVAILABLE"; `details`, bounded.
        self.code = code
        self.details = details

    @property
    def refused(self) -> bool:
        """The executor refused the call before it read a message (no or a wrong key)."""
        return self.code == "PERMISSION_DENIED"

    @property
    def timed_out(self) -> bool:
        """No answer within the call's deadline: the executor may be stuck."""
        return self.code == "DEADLINE_EXCEEDED"
