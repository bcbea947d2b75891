"""A create whose caller's deadline passes while its container starts, through the real API
into real podman (issue 16: "DEADLINE_EXCEEDED leaves nothing behind"): the sandbox is
discarded once started, not left RUNNING in the project's quota for a caller that saw an
error; the start it made teaches the estimate, which refuses the next such create at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from bench.harness import ControllerDirs
from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, podman

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
# Deadlines shorter than a cold start here (the first that a start outlives is the one that
# tests: a shorter one may pass before the create is let in, and leave nothing for that).
SHORT_DEADLINES = (0.05, 0.1, 0.2, 0.4, 0.8)


@contextlib.asynccontextmanager
async def fresh_controller(e2e_config: Config) -> AsyncIterator[tuple[Controller, Stub]]:
    """A controller of its own, with no start measured yet (so no create is refused for its
    deadline before one is)."""
    dirs = ControllerDirs.fresh()
    config = dataclasses.replace(e2e_config, state_dir=dirs.state_dir, runtime_dir=dirs.runtime_dir)
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


def failed_creates(running: Controller) -> float:
    """Creates that ended in an error (a caller that left among them), as the metrics say."""
    value: float = running.manager.metrics.creates.labels("cold", "error")._value.get()
    return value


async def starts_ended(running: Controller, failed_before: float | None = None) -> None:
    """Waits until the server has ended the failed create's call (when `failed_before` is
    given) and every start has ended."""
    manager = running.manager
    async with asyncio.timeout(60):
        while True:
            handled = failed_before is None or failed_creates(running) > failed_before
            if handled and not manager.create_slots.taken and not manager._lifecycle._provisioning:
                return
            await asyncio.sleep(0.02)


async def test_a_create_whose_deadline_passes_during_its_start_leaves_nothing(
    e2e_config: Config,
) -> None:
    async with fresh_controller(e2e_config) as (running, stub):
        creation = running.manager._creation
        request = sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id="late")
        for timeout in SHORT_DEADLINES:
            measured, failed = creation._starts_measured, failed_creates(running)
            try:
                made = await stub.CreateSandbox(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc.details()
                await starts_ended(running, failed)
                if creation._starts_measured > measured:
                    break  # a container was started for it
            else:  # this machine started it within the deadline: try a shorter one's effect
                await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name))
                await starts_ended(running)
        else:
            pytest.fail(f"no create of deadline {SHORT_DEADLINES} got as far as its start")
        listed = await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
        label = f"label=io.petri.registry={running.manager.registry_label}"
        assert [sandbox.name for sandbox in listed.sandboxes] == []
        assert podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split() == []
        assert [r.sandbox_id for r in await running.registry.list_live()] == []
        # The start was measured: a create whose deadline is shorter is refused at once.
        estimate = creation._current_estimate(asyncio.get_running_loop().time())
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateSandbox(request, timeout=max(0.05, estimate / 2))
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no time to start a sandbox" in (caught.value.details() or "")
        # The name is free: the create with time enough makes it.
        made = await stub.CreateSandbox(request)
        assert made.state == sandbox_pb2.Sandbox.RUNNING
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name))
