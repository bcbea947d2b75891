"""The SDK's exceptions: every failed call raises one of these, never a bare grpc.RpcError.

    PetriError                 any status code not listed below
    ├── InvalidArgument        INVALID_ARGUMENT    a bad name, path, filter, ttl, ...
    ├── NotFound               NOT_FOUND           no such sandbox or file
    │   ├── Expired            NOT_FOUND           the sandbox expired (reason SANDBOX_EXPIRED)
    │   └── Deleted            NOT_FOUND           the sandbox was deleted (SANDBOX_DELETED)
    ├── AlreadyExists          ALREADY_EXISTS      the sandbox_id is taken in the project
    ├── FailedPrecondition     FAILED_PRECONDITION the sandbox cannot do that in its state
    │   └── Terminated         FAILED_PRECONDITION its runtime died (SANDBOX_TERMINATED)
    ├── ResourceExhausted      RESOURCE_EXHAUSTED  over a size limit or the server's capacity
    │   └── QuotaExceeded      RESOURCE_EXHAUSTED  over a project quota (QUOTA_EXCEEDED)
    ├── PermissionDenied       PERMISSION_DENIED
    ├── Unauthenticated        UNAUTHENTICATED
    ├── Unavailable            UNAVAILABLE         nothing ran: a retry is safe
    ├── DeadlineExceeded       DEADLINE_EXCEEDED
    ├── Cancelled              CANCELLED
    └── OutcomeUnknown         UNKNOWN             the code may have run: check before re-running

The server attaches AIP-193 details (a google.rpc.Status with one ErrorInfo) in the trailing
metadata `grpc-status-details-bin`; :func:`error_from_status` decodes them into ``reason`` and
``metadata``, and picks the subclass by reason. Without details (or with undecodable ones) the
status code alone decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import ClassVar

import grpc
from google.protobuf.message import DecodeError

from petri.v1 import error_details_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"
ERROR_INFO_TYPE_URL = "type.googleapis.com/google.rpc.ErrorInfo"
ERROR_DOMAIN = "petri"
# Bounds on what a server may make the client keep: its words are shown, not trusted.
_MAX_DETAILS_BYTES = 64 * 1024

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
    "error_from_status",
]


class PetriError(Exception):
    """A call to the petri service failed.

    Attributes:
        code: the gRPC status code.
        message: the server's message, meant for a person.
        reason: the machine-readable reason (e.g. ``"SANDBOX_EXPIRED"``), ``""`` if none.
        metadata: facts about the failure that come with the reason (e.g. ``expire_time``).
    """

    default_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        reason = f", reason={self.reason!r}" if self.reason else ""
        return f"{type(self).__name__}({self.message!r}{reason})"


class InvalidArgument(PetriError):
    """The request was malformed: a bad name, path, filter, ttl... Fix it before retrying."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(PetriError):
    """No such sandbox (or file). :class:`Expired` and :class:`Deleted` say what became of it."""

    default_code = grpc.StatusCode.NOT_FOUND


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class Expired(NotFound):
    """The sandbox reached its expire time and was reaped. ``at``: when, if the server said."""

    @property
    def at(self) -> datetime | None:
        return _parse_time(self.metadata.get("expire_time"))


class Deleted(NotFound):
    """The sandbox was deleted. ``at``: when, if the server said."""

    @property
    def at(self) -> datetime | None:
        return _parse_time(self.metadata.get("delete_time"))


class AlreadyExists(PetriError):
    """The sandbox_id is taken in the project."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(PetriError):
    """The sandbox (or file) is not in a state that allows the call."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Terminated(FailedPrecondition):
    """The sandbox's runtime died underneath the service; ``why`` says how. Create a new one."""

    @property
    def why(self) -> str:
        return self.metadata.get("state_message", "")

    @property
    def reason_text(self) -> str:
        """The same as :attr:`why`."""
        return self.why


class ResourceExhausted(PetriError):
    """Over a size limit (e.g. 100 MiB of files) or the server's capacity."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QuotaExceeded(ResourceExhausted):
    """Over a project quota: ``quota`` names it, ``limit`` is its value if the server said."""

    @property
    def quota(self) -> str:
        return self.metadata.get("quota", "")

    @property
    def limit(self) -> int | None:
        try:
            return int(self.metadata["limit"])
        except (KeyError, ValueError):
            return None


class PermissionDenied(PetriError):
    """The token may not use that project."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(PetriError):
    """No token, or one the server does not know (set PETRI_TOKEN)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(PetriError):
    """The service (or the sandbox's executor) could not be reached: nothing ran, retry."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(PetriError):
    """The call ran past its deadline."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(PetriError):
    """The call was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class OutcomeUnknown(PetriError):
    """The call failed after the code was sent: it may have run. Check before running it again."""

    default_code = grpc.StatusCode.UNKNOWN


_BY_CODE: dict[grpc.StatusCode, type[PetriError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        OutcomeUnknown,
    )
}

# A reason picks a subclass only under the status code it belongs to.
_BY_REASON: dict[str, type[PetriError]] = {
    "SANDBOX_EXPIRED": Expired,
    "SANDBOX_DELETED": Deleted,
    "SANDBOX_TERMINATED": Terminated,
    "QUOTA_EXCEEDED": QuotaExceeded,
}


def decode_error_info(details: bytes) -> tuple[str, dict[str, str]]:
    """The (reason, metadata) of a serialized petri.v1.Status (google.rpc.Status); ("", {})
    when it is missing, too large, undecodable, or carries no ErrorInfo of petri's domain."""
    if not details or len(details) > _MAX_DETAILS_BYTES:
        return "", {}
    try:
        status = error_details_pb2.Status.FromString(details)
        for any_detail in status.details:
            if any_detail.type_url != ERROR_INFO_TYPE_URL:
                continue
            info = error_details_pb2.ErrorInfo.FromString(any_detail.value)
            if info.domain == ERROR_DOMAIN:
                return info.reason, dict(info.metadata)
    except (DecodeError, ValueError):
        pass
    return "", {}


def error_from_status(
    code: grpc.StatusCode | None,
    message: str | None,
    trailing_metadata: Iterable[tuple[str, str | bytes]] | None = None,
) -> PetriError:
    """The exception for a failed call: its class from the status code and, within it, the
    reason of the call's rich error details, if it carries any."""
    status_code = code if code is not None else grpc.StatusCode.UNKNOWN
    reason, metadata = "", dict[str, str]()
    for key, value in trailing_metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            reason, metadata = decode_error_info(value)
            break
    cls = _BY_CODE.get(status_code, PetriError)
    special = _BY_REASON.get(reason)
    if special is not None and issubclass(special, cls):
        cls = special
    return cls(message or "", code=status_code, reason=reason, metadata=metadata)


def error_from_rpc(error: grpc.RpcError) -> PetriError:
    """:func:`error_from_status` for a grpc.RpcError raised by a sync or an asyncio call."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error_from_status(error.code(), error.details(), error.trailing_metadata())
    if isinstance(error, grpc.Call):
        return error_from_status(error.code(), error.details(), error.trailing_metadata())
    return error_from_status(grpc.StatusCode.UNKNOWN, str(error))
