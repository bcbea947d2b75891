"""The SDK's exceptions from status codes and the server's rich error details."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc
import pytest
from google.protobuf import any_pb2

from petri.sdk import errors
from petri.v1 import error_details_pb2


def details(reason: str, metadata: dict[str, str], domain: str = "petri") -> bytes:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)
    status = error_details_pb2.Status(
        code=5,
        message="gone",
        details=[
            any_pb2.Any(type_url="type.googleapis.com/other.Thing", value=b"\x01\x02"),
            any_pb2.Any(type_url=errors.ERROR_INFO_TYPE_URL, value=info.SerializeToString()),
        ],
    )
    return status.SerializeToString()


def trailing(value: bytes) -> list[tuple[str, str | bytes]]:
    return [("other", "x"), (errors.STATUS_DETAILS_KEY, value)]


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidArgument),
        (grpc.StatusCode.NOT_FOUND, errors.NotFound),
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExists),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.FailedPrecondition),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, errors.ResourceExhausted),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNAUTHENTICATED, errors.Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, errors.Unavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineExceeded),
        (grpc.StatusCode.CANCELLED, errors.Cancelled),
        (grpc.StatusCode.UNKNOWN, errors.OutcomeUnknown),
    ],
)
def test_without_details_the_status_code_picks_the_class(
    code: grpc.StatusCode, cls: type[errors.PetriError]
) -> None:
    error = errors.error_from_status(code, "what happened")
    assert type(error) is cls
    assert (error.code, error.message, error.reason, error.metadata) == (
        code,
        "what happened",
        "",
        {},
    )
    assert str(error) == f"{code.name}: what happened"


def test_an_unlisted_code_is_the_base_class() -> None:
    error = errors.error_from_status(grpc.StatusCode.INTERNAL, "internal error (reference 1)")
    assert type(error) is errors.PetriError
    assert error.code is grpc.StatusCode.INTERNAL


def test_expired_carries_when() -> None:
    error = errors.error_from_status(
        grpc.StatusCode.NOT_FOUND,
        "sandbox x was expired at ...",
        trailing(details("SANDBOX_EXPIRED", {"expire_time": "2026-11-30T10:00:00+00:00"})),
    )
    assert isinstance(error, errors.Expired) and isinstance(error, errors.NotFound)
    assert error.reason == "SANDBOX_EXPIRED"
    assert error.at == datetime(2026, 11, 30, 10, tzinfo=UTC)


def test_deleted_carries_when_and_a_zulu_time_parses() -> None:
    error = errors.error_from_status(
        grpc.StatusCode.NOT_FOUND,
        "deleted",
        trailing(details("SANDBOX_DELETED", {"delete_time": "2026-11-30T10:00:00Z"})),
    )
    assert isinstance(error, errors.Deleted)
    assert error.at == datetime(2026, 11, 30, 10, tzinfo=UTC)


def test_terminated_and_quota_exceeded() -> None:
    terminated = errors.error_from_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        "terminated",
        trailing(details("SANDBOX_TERMINATED", {"state_message": "its container is gone"})),
    )
    assert isinstance(terminated, errors.Terminated)
    assert terminated.why == terminated.reason_text == "its container is gone"
    quota = errors.error_from_status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "over",
        trailing(details("QUOTA_EXCEEDED", {"quota": "max_sandboxes_per_project", "limit": "2"})),
    )
    assert isinstance(quota, errors.QuotaExceeded)
    assert (quota.quota, quota.limit) == ("max_sandboxes_per_project", 2)


def test_a_reason_under_the_wrong_code_does_not_pick_a_subclass() -> None:
    error = errors.error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT, "bad", trailing(details("SANDBOX_EXPIRED", {}))
    )
    assert type(error) is errors.InvalidArgument
    assert error.reason == "SANDBOX_EXPIRED"  # still told


def test_an_unknown_reason_keeps_the_code_class_and_the_metadata() -> None:
    error = errors.error_from_status(
        grpc.StatusCode.NOT_FOUND, "no file", trailing(details("FILE_NOT_FOUND", {"path": "a"}))
    )
    assert type(error) is errors.NotFound
    assert (error.reason, error.metadata) == ("FILE_NOT_FOUND", {"path": "a"})


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"\xff\xff\xff\xff",  # not a protobuf message
        b"\x1a\x05\x0a\x03abc",  # an Any cut short
        error_details_pb2.Status(code=5, message="no details").SerializeToString(),
        details("SANDBOX_EXPIRED", {}, domain="someone.else"),
        b"\x00" * (1 << 20),  # beyond the size kept
    ],
)
def test_garbage_details_fall_back_to_the_status_code(garbage: bytes) -> None:
    error = errors.error_from_status(grpc.StatusCode.NOT_FOUND, "gone", trailing(garbage))
    assert type(error) is errors.NotFound
    assert (error.reason, error.metadata) == ("", {})


def test_an_expired_time_that_is_not_a_time_is_none() -> None:
    error = errors.error_from_status(
        grpc.StatusCode.NOT_FOUND, "x", trailing(details("SANDBOX_EXPIRED", {"expire_time": "?"}))
    )
    assert isinstance(error, errors.Expired) and error.at is None


def test_a_string_value_under_the_details_key_is_ignored() -> None:
    error = errors.error_from_status(
        grpc.StatusCode.NOT_FOUND, "x", [(errors.STATUS_DETAILS_KEY, "not bytes")]
    )
    assert type(error) is errors.NotFound


def test_error_from_rpc_reads_an_asyncio_error() -> None:
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata((errors.STATUS_DETAILS_KEY, details("SANDBOX_DELETED", {}))),
        "sandbox x was deleted at ...",
    )
    error = errors.error_from_rpc(rpc_error)
    assert isinstance(error, errors.Deleted)
    assert error.message == "sandbox x was deleted at ..."
