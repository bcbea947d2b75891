"""Helpers for end-to-end tests: the real podman CLI and small readers of API responses."""

from __future__ import annotations

import dataclasses
import subprocess
from typing import TYPE_CHECKING, Any

from controller.app import Controller
from controller.config import Config
from petri.v1 import sandbox_pb2

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PROJECT = "e2e"
PARENT = f"projects/{PROJECT}"


def podman(*args: str) -> str:
    """The podman CLI of the same user, as an operator would use it."""
    done = subprocess.run(["podman", *args], capture_output=True, text=True, check=True)
    return done.stdout


def sibling_config(config: Config, controller: Controller, name: str, **overrides: Any) -> Config:
    """The config of another controller beside the session's: same podman service, a port,
    state and socket directory of its own (unless overridden)."""
    assert controller.podman_service is not None
    fields: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "runtime_dir": config.runtime_dir / name,
        "podman_socket": controller.podman_service.socket_path,
        **overrides,
    }
    return dataclasses.replace(config, **fields)


def kill_executor(container: str) -> None:
    """kill -9 a sandbox's executor from outside, as its root: what user code cannot do. The
    container then stops, which may take the shell doing it along (exit 137)."""
    done = subprocess.run(
        ["podman", "exec", container, "sh", "-c", "kill -9 $(cat /proc/1/task/1/children)"],
        capture_output=True,
        text=True,
    )
    assert done.returncode in (0, 137), done.stderr


async def execute(
    stub: Stub, name: str, code: str, **fields: object
) -> sandbox_pb2.ExecuteCodeResponse:
    response: sandbox_pb2.ExecuteCodeResponse = await stub.ExecuteCode(
        sandbox_pb2.ExecuteCodeRequest(name=name, code=code, **fields)  # type: ignore[arg-type]
    )
    return response


def value_of(response: sandbox_pb2.ExecuteCodeResponse) -> str | None:
    """The text/plain of the last expression's value, as a notebook's Out[n] shows it."""
    for output in response.outputs:
        if output.kind == output.RESULT:
            return output.text["text/plain"]
    return None
