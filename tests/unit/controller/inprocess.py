"""The fast tier's controller: the real one (start_controller, its gRPC API on a loopback port,
its registry on disk), with podman replaced by FakeRuntime and its executors by stand-ins."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import pytest

from controller.app import Controller, start_controller
from controller.config import Config, validate
from controller.sandboxes import worker_uids
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.standin_executor import StandInExecutor

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PROJECT = "fast"
PARENT = f"projects/{PROJECT}"
PROFILE = "test"
REPOSITORY = "localhost/petri-sandbox"
WAIT_SECONDS = 5.0
TEST_SECONDS = 20.0
POLL_SECONDS = 0.005
T = TypeVar("T")


def fast_config(state_dir: Path, runtime_dir: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "image_repository": REPOSITORY,
        "default_image_profile": PROFILE,
        "warm_pool": (),
        "preload": (),
        "kill_grace": timedelta(milliseconds=200),
        **overrides,
    }
    config = Config(state_dir=state_dir, runtime_dir=runtime_dir, **values)
    assert validate(config) == [], validate(config)
    return config


@dataclass
class Petri:
    """A running controller and what a test needs to drive and watch it."""

    config: Config
    controller: Controller
    runtime: FakeRuntime
    stub: Stub

    async def create(
        self, sandbox_id: str = "", request_id: str = "", **fields: Any
    ) -> sandbox_pb2.Sandbox:
        sandbox: sandbox_pb2.Sandbox = await self.stub.CreateSandbox(
            create_request(sandbox_id, request_id, **fields)
        )
        return sandbox

    async def names(self) -> list[str]:
        """The sandboxes ListSandboxes shows."""
        listed = await self.stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
        return sorted(sandbox.name for sandbox in listed.sandboxes)

    async def delete(self, name: str) -> None:
        await self.stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))

    async def get(self, name: str) -> sandbox_pb2.Sandbox:
        sandbox: sandbox_pb2.Sandbox = await self.stub.GetSandbox(
            sandbox_pb2.GetSandboxRequest(name=name)
        )
        return sandbox

    async def executor(self, name: str) -> StandInExecutor:
        """The stand-in executor in the container the registry gives the sandbox now (after a
        resume into a warm pool member, that container's labels name the member)."""
        sandbox = await self.get(name)
        record = await self.controller.registry.get_live(PROJECT, sandbox.name.rpartition("/")[2])
        assert record is not None, name
        container = self.runtime.containers.get(record.container_name)
        assert container is not None and container.executor is not None, f"{name}: no executor"
        return container.executor

    async def execute(self, name: str, code: str, **fields: Any) -> sandbox_pb2.ExecuteCodeResponse:
        response: sandbox_pb2.ExecuteCodeResponse = await self.stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=name, code=code, **fields)
        )
        return response


def create_request(
    sandbox_id: str = "", request_id: str = "", **fields: Any
) -> sandbox_pb2.CreateSandboxRequest:
    return sandbox_pb2.CreateSandboxRequest(
        parent=PARENT,
        sandbox_id=sandbox_id,
        request_id=request_id,
        sandbox=sandbox_pb2.Sandbox(**fields),
    )


@contextlib.asynccontextmanager
async def serving(config: Config, runtime: FakeRuntime) -> AsyncIterator[Petri]:
    """A controller on `config` and `runtime`; several may run one after another on the same
    state (a restart)."""
    with pytest.MonkeyPatch.context() as patch:
        # Worker uid reservations are host-wide (the user's home): keep the test's apart, and
        # out of reach of a reconcile that knows only the fake's containers.
        home = config.state_dir / "home"
        patch.setattr(
            worker_uids, "pwd", types.SimpleNamespace(getpwuid=lambda _: _Passwd(str(home)))
        )
        assert worker_uids.shared_directory().is_relative_to(config.state_dir)
        controller = await start_controller(config, runtime=runtime)
        try:
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{controller.port}",
                options=[("grpc.max_receive_message_length", 256 << 20)],
            ) as channel:
                # A call the controller never answers fails the test rather than hangs the tier.
                async with asyncio.timeout(TEST_SECONDS):
                    stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
                    yield Petri(config, controller, runtime, stub)
        finally:
            await controller.stop(grace=0.5)


@dataclass
class _Passwd:
    pw_dir: str


@contextlib.asynccontextmanager
async def fast_petri(tmp_path: Path, **overrides: Any) -> AsyncIterator[Petri]:
    """A controller on fresh state with a fake runtime that has the test image."""
    with short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir, **overrides)
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as petri:
                yield petri
        finally:
            await runtime.shutdown()


@contextlib.contextmanager
def short_runtime_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="petri-fast-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def eventually(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """What `check` answers once it answers something: for what the controller does in the
    background (a reaper round, a container check, a refill)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        answer = await check()
        if answer is not None:
            return answer
        if loop.time() > deadline:
            raise AssertionError(f"waited {WAIT_SECONDS} s for {what}")
        await asyncio.sleep(POLL_SECONDS)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    async def check() -> bool | None:
        return True if condition() else None

    await eventually(check, what)


async def wait_for_state(
    petri: Petri, name: str, state: sandbox_pb2.Sandbox.State.ValueType
) -> sandbox_pb2.Sandbox:
    """The sandbox once GetSandbox shows it in `state`."""

    async def check() -> sandbox_pb2.Sandbox | None:
        sandbox = await petri.get(name)
        return sandbox if sandbox.state == state else None

    return await eventually(check, f"{name} to be {sandbox_pb2.Sandbox.State.Name(state)}")


async def wait_gone(petri: Petri, name: str) -> str:
    """The NOT_FOUND message of a sandbox once it is gone."""

    async def check() -> str | None:
        try:
            await petri.get(name)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
            return exc.details() or ""
        return None

    return await eventually(check, f"{name} to be gone")


async def expect(call: Any, code: grpc.StatusCode, *fragments: str) -> str:
    """The details of a call that must fail with `code`, each fragment in them."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    details = caught.value.details() or ""
    assert caught.value.code() == code, f"{caught.value.code()}: {details[:1000]}"
    for fragment in fragments:
        assert fragment in details, details[:1000]
    return details
