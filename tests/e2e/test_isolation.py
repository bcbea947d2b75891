"""A sandbox cannot reach into another through the host side of its socket directory."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.server import Controller
from petri.v1 import sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.helpers import execute, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


async def test_a_socket_redirected_to_a_neighbour_does_not_reach_it(
    stub: Stub, create_sandbox: CreateSandbox, controller: Controller
) -> None:
    attacker, victim = await create_sandbox(), await create_sandbox()
    await execute(stub, victim.name, "visits = 0")
    victim_socket = controller.config.runtime_dir / "s" / victim.uid / "executor.sock"
    # The attacker points its own socket path at the victim's, then kills its executor so
    # that the controller has to connect again.
    attack = (
        "import os, signal\n"
        "os.remove('/run/petri/executor.sock')\n"
        f"os.symlink({str(victim_socket)!r}, '/run/petri/executor.sock')\n"
        "os.kill(os.getppid(), signal.SIGKILL)"
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await execute(stub, attacker.name, attack)

    for _ in range(20):  # each call must fail; none may run in the victim
        try:
            response = await execute(stub, attacker.name, "visits += 1\nvisits")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION,
            ), exc.details()
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                break
        else:
            pytest.fail(f"the attacker's code ran somewhere: {response}")
        await asyncio.sleep(0.2)
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=attacker.name))
    assert got.state == sandbox_pb2.Sandbox.TERMINATED
    assert value_of(await execute(stub, victim.name, "visits")) == "0"
