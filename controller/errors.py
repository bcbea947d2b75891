"""The controller's exception tree, and its one mapping to gRPC status codes.

    PetriError                    INTERNAL (abstract: only its subclasses are raised)
    ├── Unauthenticated           UNAUTHENTICATED    no, malformed or unknown bearer token
    ├── PermissionDenied          PERMISSION_DENIED  the token may not use that project
    ├── InvalidArgument           INVALID_ARGUMENT   bad name, filter, page token, ttl, ...
    ├── NotFound                  NOT_FOUND          no such sandbox (or it expired / was deleted)
    ├── AlreadyExists             ALREADY_EXISTS     sandbox_id taken in the project
    ├── FailedPrecondition        FAILED_PRECONDITION  sandbox not RUNNING, limit not enforceable
    ├── ResourceExhausted         RESOURCE_EXHAUSTED over a size limit or a quota (named)
    ├── DeadlineExceeded          DEADLINE_EXCEEDED  an execution's input files did not all arrive
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
executor) are translated where they happen, with `raise ... from exc`.
"""

import grpc


class PetriError(Exception):
    """Base of the controller's errors; its message is shown to the caller."""

    status = grpc.StatusCode.INTERNAL


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
