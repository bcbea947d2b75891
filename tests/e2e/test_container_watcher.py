"""The container watcher against real podman (issue 16): a container killed from outside is
found through podman's event stream, on a controller whose slow poll is set so long (10 min)
that nothing else could find it; with a checkpoint, the sandbox comes back PAUSED (the
lost-container rule of docs/hibernation.md); and a restarted podman service leaves the watcher
working."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from bench.harness import ControllerDirs
from controller.app import Controller, start_controller
from controller.config import Config
from controller.sandboxes.reconciler import Reconciler
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
RUNNING, PAUSED = sandbox_pb2.Sandbox.RUNNING, sandbox_pb2.Sandbox.PAUSED
TERMINATED = sandbox_pb2.Sandbox.TERMINATED
SLOW_POLL = timedelta(minutes=10)  # never within a test: only events find a dead container
# A dead container is found within a second on an idle machine; the bound leaves room for a
# loaded one, and stays far below the slow poll.
FOUND_WITHIN = 10.0


@contextlib.asynccontextmanager
async def watching(e2e_config: Config, **overrides: Any) -> AsyncIterator[tuple[Controller, Stub]]:
    """A controller of its own (its podman service, registry and sockets) whose slow poll
    never comes."""
    dirs = ControllerDirs.fresh()
    config = dataclasses.replace(
        e2e_config,
        state_dir=dirs.state_dir,
        runtime_dir=dirs.runtime_dir,
        container_check_interval=SLOW_POLL,
        **overrides,
    )
    running = await start_controller(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield running, sandbox_pb2_grpc.SandboxServiceStub(channel)
    finally:
        await running.stop(grace=1)
        label = f"label=io.petri.registry={running.manager.registry_label}"
        names = podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split()
        if names:
            podman("rm", "-f", *names)
        dirs.remove()


def reconciler(running: Controller) -> Reconciler:
    found: Reconciler = running.manager._reconciler
    return found


async def create(stub: Stub, spec: sandbox_pb2.SandboxSpec | None = None) -> sandbox_pb2.Sandbox:
    sandbox: sandbox_pb2.Sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox_pb2.Sandbox(spec=spec))
    )
    return sandbox


async def found(
    stub: Stub, name: str, state: sandbox_pb2.Sandbox.State.ValueType, since: float
) -> sandbox_pb2.Sandbox:
    """The sandbox once GetSandbox shows it in `state`, within FOUND_WITHIN of `since`."""
    while True:
        got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
        if got.state == state:
            print(
                f"{name}: {sandbox_pb2.Sandbox.State.Name(state)} after "
                f"{time.monotonic() - since:.2f} s"
            )
            return got
        if time.monotonic() - since > FOUND_WITHIN:
            pytest.fail(f"{name} is still {sandbox_pb2.Sandbox.State.Name(got.state)}")
        await asyncio.sleep(0.05)


async def wait_for(condition: Any, what: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"waited {within} s for {what}"
        await asyncio.sleep(0.05)


async def test_a_killed_container_is_found_terminated_by_its_event(e2e_config: Config) -> None:
    async with watching(e2e_config) as (_, stub):
        victim, bystander = await create(stub), await create(stub)
        killed = time.monotonic()
        podman("kill", f"petri-{victim.uid}")
        got = await found(stub, victim.name, TERMINATED, killed)
        assert got.state_message == (
            "its container was killed by signal 9, and it had no checkpoint"
        )
        assert (
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=bystander.name))
        ).state == (RUNNING)
        assert value_of(await execute(stub, bystander.name, "6 * 7")) == "42"
        # The controller's own delete makes events too, and terminates nothing else.
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=bystander.name))


async def test_a_killed_container_with_a_checkpoint_comes_back_paused(e2e_config: Config) -> None:
    async with watching(
        e2e_config,
        hibernate_interval=timedelta(milliseconds=200),
        checkpoint_idle_after=timedelta(seconds=1),
    ) as (_, stub):
        sandbox = await create(stub)
        await execute(stub, sandbox.name, "x = 41")
        deadline = time.monotonic() + 60
        while not (
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
        ).HasField("checkpoint"):
            assert time.monotonic() < deadline, "no idle checkpoint"
            await asyncio.sleep(0.1)
        killed = time.monotonic()
        podman("kill", f"petri-{sandbox.uid}")
        got = await found(stub, sandbox.name, PAUSED, killed)
        assert "its container was killed by signal 9; it resumes from its checkpoint of" in (
            got.state_message
        )
        answer = await execute(stub, sandbox.name, "x + 1")
        assert answer.namespace_restored and value_of(answer) == "42"


async def test_the_watcher_outlives_a_restart_of_the_podman_service(e2e_config: Config) -> None:
    async with watching(e2e_config) as (running, stub):
        service = running.podman_service
        assert service is not None and service.pid is not None
        during, after = await create(stub), await create(stub)
        assert reconciler(running).subscriptions == 1
        os.kill(service.pid, signal.SIGKILL)
        killed = time.monotonic()
        # Killed around the restart: found by the new stream or by the check after subscribing.
        podman("kill", f"petri-{during.uid}")
        await found(stub, during.name, TERMINATED, killed)
        await wait_for(lambda: service.restarts == 1, "the service's restart")
        await wait_for(lambda: reconciler(running).subscriptions == 2, "a new subscription")
        killed = time.monotonic()
        podman("kill", f"petri-{after.uid}")  # only the new stream can find it now
        await found(stub, after.name, TERMINATED, killed)
        assert reconciler(running).subscriptions == 2


async def test_a_killed_gvisor_container_is_found_too(e2e_config: Config) -> None:
    """gVisor's containers come from a podman service of their own; the events of the same
    user's podman are one stream, which the watcher follows on runc's service."""
    async with watching(e2e_config) as (running, stub):
        if running.gvisor_service is None:
            if os.environ.get("PETRI_REQUIRE_GVISOR"):
                pytest.fail("PETRI_REQUIRE_GVISOR is set but runsc is not installed")
            pytest.skip("gVisor's runsc is not installed on this host (apt-get install runsc)")
        spec = sandbox_pb2.SandboxSpec(runtime=sandbox_pb2.SandboxSpec.GVISOR)
        victim = await create(stub, spec)
        killed = time.monotonic()
        podman("kill", f"petri-{victim.uid}")
        got = await found(stub, victim.name, TERMINATED, killed)
        assert got.state_message.startswith("its container ")
