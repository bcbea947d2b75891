"""The controller's errors carry their reason and metadata as AIP-193 details that the SDK reads."""

from __future__ import annotations

import grpc

from controller import errors
from petri.sdk.errors import Expired, NotFound, error_from_status
from petri.v1 import error_details_pb2


def test_status_details_round_trip_into_the_sdk() -> None:
    exc = errors.NotFound(
        "sandbox x was expired at 2026-01-01T00:00:00+00:00",
        reason="SANDBOX_EXPIRED",
        metadata={"expire_time": "2026-01-01T00:00:00+00:00"},
    )
    ((key, value),) = errors.status_details(exc)
    status = error_details_pb2.Status.FromString(value)
    assert (key, status.code, status.message) == (
        "grpc-status-details-bin",
        grpc.StatusCode.NOT_FOUND.value[0],
        str(exc),
    )
    (detail,) = status.details
    assert detail.type_url == "type.googleapis.com/google.rpc.ErrorInfo"
    info = error_details_pb2.ErrorInfo.FromString(detail.value)
    assert (info.reason, info.domain) == ("SANDBOX_EXPIRED", "petri")

    sdk_error = error_from_status(exc.status, str(exc), [(key, value)])
    assert isinstance(sdk_error, Expired)
    assert sdk_error.at is not None and sdk_error.at.year == 2026


def test_an_error_without_a_reason_sends_a_status_without_details() -> None:
    ((_, value),) = errors.status_details(errors.NotFound("no such sandbox"))
    status = error_details_pb2.Status.FromString(value)
    assert status.message == "no such sandbox" and not status.details
    assert type(error_from_status(grpc.StatusCode.NOT_FOUND, "x", [("k", value)])) is NotFound
