"""Settings from the environment, and the retry of calls that are safe to repeat."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from petri.sdk import connection
from petri.sdk.connection import Client, Settings
from petri.sdk.errors import InvalidArgument, Unavailable
from petri.sdk.requests import create_request, run_deadline, sandbox_name, update_request


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETRI_ADDR", "petri.example:443")
    monkeypatch.setenv("PETRI_TOKEN", "secret")
    monkeypatch.setenv("PETRI_PROJECT", "team")
    monkeypatch.setenv("PETRI_TLS_CA", "/ca.pem")
    settings = Settings.resolve()
    assert (settings.addr, settings.project, settings.token) == (
        "petri.example:443",
        "team",
        "secret",
    )
    assert settings.tls and settings.tls_ca == Path("/ca.pem")
    assert settings.metadata() == (("authorization", "Bearer secret"),)
    assert Settings.resolve(addr="other:1", project="p").addr == "other:1"


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "PETRI_ADDR",
        "PETRI_TOKEN",
        "PETRI_PROJECT",
        "PETRI_TLS_CA",
        "PETRI_TLS_CERT",
        "PETRI_TLS_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    settings = Settings.resolve()
    assert (settings.addr, settings.project, settings.token, settings.tls) == (
        "127.0.0.1:50051",
        "default",
        None,
        False,
    )
    assert settings.metadata() == ()
    with pytest.raises(ValueError, match="needs its key"):
        Settings.resolve(tls_cert="/cert.pem")


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connect failed"
    )


def test_a_retried_call_repeats_the_same_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "RETRY_DELAYS", (0.0, 0.0, 0.0))
    seen: list[Any] = []

    def method(request: Any, **kwargs: Any) -> str:
        seen.append(request)
        if len(seen) < 3:
            raise unavailable()
        return "created"

    request = create_request("p")
    with Client(addr="127.0.0.1:1") as client:
        assert client.call(method, request, retry=True) == "created"
    assert len(seen) == 3 and all(r is request for r in seen)
    assert request.request_id  # one id, made once


def test_retries_give_up_with_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "RETRY_DELAYS", (0.0, 0.0))
    calls = 0

    def method(request: Any, **kwargs: Any) -> str:
        nonlocal calls
        calls += 1
        raise unavailable()

    with Client(addr="127.0.0.1:1") as client:
        with pytest.raises(Unavailable):
            client.call(method, None, retry=True)
        assert calls == 3
        with pytest.raises(Unavailable):
            client.call(method, None)  # not retried unless safe
        assert calls == 4


def test_other_errors_are_not_retried() -> None:
    calls = 0

    def method(request: Any, **kwargs: Any) -> str:
        nonlocal calls
        calls += 1
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(), "bad"
        )

    with Client(addr="127.0.0.1:1") as client, pytest.raises(InvalidArgument):
        client.call(method, None, retry=True)
    assert calls == 1


def test_request_builders() -> None:
    assert sandbox_name("p", "x") == "projects/p/sandboxes/x"
    assert sandbox_name("p", "projects/q/sandboxes/y") == "projects/q/sandboxes/y"
    a, b = create_request("p", runtime="gvisor", ttl=90, labels={"k": "v"}), create_request("p")
    assert a.request_id != b.request_id and a.parent == "projects/p"
    assert a.sandbox.ttl.seconds == 90 and a.sandbox.labels["k"] == "v"
    with pytest.raises(ValueError):
        create_request("p", runtime="docker")
    update = update_request("n", labels={}, ttl=5)
    assert list(update.update_mask.paths) == ["labels", "ttl"]
    with pytest.raises(ValueError):
        update_request("n")
    assert run_deadline(None) is None
    assert run_deadline(10) == 10 + connection.RUN_MARGIN
