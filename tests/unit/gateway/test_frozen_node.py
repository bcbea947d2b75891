"""A node that freezes (SIGSTOP here; a hung host, a partition that sends no reset) behind a
gateway: its TCP connection looks fine, so only the gateway's keepalive pings (node_keepalive)
find it. The calls in flight to it, and new ones, end within a bound with an answer that says
what happened; a long healthy call that sends nothing is not cut off by the pings.

The node is a process of its own (tests/unit/gateway/node_process.py: the real service in role
node, a fake podman), on a real PostgreSQL; the gateway runs in the test.
"""

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.gateway.forward import locate_in
from controller.gateway.server import Gateway, start_gateway
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.postgres import fresh_database
from tests.unit.controller.inprocess import (
    PARENT,
    create_request,
    eventually,
    fast_config,
    short_runtime_dir,
)
from tests.unit.gateway.node_process import WAIT

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

KEEPALIVE = timedelta(milliseconds=500)
# How soon a frozen node's calls end: two keepalive periods, grpc's one second at least between
# pings, and room for a loaded machine.
BOUND = 8.0
# The callers' own deadline: far beyond the bound, so that a call the keepalive does not end
# fails the test by it (DEADLINE_EXCEEDED), not by hanging.
DEADLINE = 40.0
NAME = f"{PARENT}/sandboxes/s1"


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Setup:
    node: asyncio.subprocess.Process
    address: str
    state: Path
    gateway: Gateway
    stub: "Stub"

    def freeze(self) -> None:
        os.kill(self.node.pid, signal.SIGSTOP)


async def _serving(address: str, node: asyncio.subprocess.Process) -> None:
    """Waits until the node process serves (its start takes seconds on a loaded machine)."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(60):
            while True:
                assert node.returncode is None, "the node exited"
                with contextlib.suppress(grpc.aio.AioRpcError):
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def frozen_node_setup(
    tmp_path: Path, database: str, wait_seconds: float
) -> AsyncIterator[Setup]:
    """A node process holding sandbox s1, and a gateway in front of it that keeps it live
    however long it stays silent (so that calls go to it, frozen or not). The node is let go
    on (SIGCONT) and stopped at the end, whatever happened."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    state = tmp_path / "node"
    log = (tmp_path / "node.log").open("wb")
    registry = PostgresRegistry(database)
    with short_runtime_dir() as runtime_dir:
        node = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.unit.gateway.node_process",
            database,
            str(state),
            str(runtime_dir),
            str(port),
            str(int(KEEPALIVE.total_seconds() * 1000)),
            str(wait_seconds),
            stdout=log,
            stderr=log,
        )
        gateway = None
        try:
            await _serving(address, node)
            await registry.open()
            config = fast_config(
                tmp_path / "gateway",
                runtime_dir,
                database_url=database,
                role="gateway",
                node_keepalive=KEEPALIVE,
            )
            gateway = await start_gateway(
                config,
                PostgresNodes(registry),
                locate_in(registry),
                stale_after=timedelta(minutes=5),
                refresh_interval=0.05,
                connect_timeout=0.5,
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = sandbox_pb2_grpc.SandboxServiceStub(channel)

                async def seen() -> bool | None:
                    assert gateway is not None
                    return gateway.directory.live("frozen") is not None or None

                await eventually(seen, "the gateway to see the node")
                await stub.CreateSandbox(create_request("s1"), timeout=DEADLINE)
                yield Setup(node, address, state, gateway, stub)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGCONT)
                node.terminate()
            try:
                await asyncio.wait_for(node.wait(), 15)
            except TimeoutError:
                node.kill()
                await node.wait()
            if gateway is not None:
                await gateway.stop(0)
            await registry.close()
            log.close()


async def _ended(call: object) -> tuple[grpc.aio.AioRpcError, float]:
    """The error a call ends with, and how long after now it came."""
    began = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value, time.monotonic() - began


async def test_a_call_in_flight_to_a_node_that_froze_ends_saying_it_may_have_run(
    tmp_path: Path, database: str
) -> None:
    async with frozen_node_setup(tmp_path, database, wait_seconds=DEADLINE * 2) as setup:
        call = setup.stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=NAME, code=WAIT), timeout=DEADLINE
        )

        async def running() -> bool | None:
            return (setup.state / "waiting").exists() or None

        await eventually(running, "the code to reach the executor")
        setup.freeze()
        error, took = await _ended(call)
        assert error.code() is grpc.StatusCode.UNKNOWN, error
        details = error.details() or ""
        assert "node frozen stopped answering during the call" in details
        assert "it may have done its work" in details and "retry" not in details
        assert took < BOUND, took


async def test_a_call_in_flight_to_a_node_killed_ends_with_the_same_answer(
    tmp_path: Path, database: str
) -> None:
    async with frozen_node_setup(tmp_path, database, wait_seconds=DEADLINE * 2) as setup:
        call = setup.stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=NAME, code=WAIT), timeout=DEADLINE
        )

        async def running() -> bool | None:
            return (setup.state / "waiting").exists() or None

        await eventually(running, "the code to reach the executor")
        setup.node.kill()  # its connection reset, rather than silent
        error, _ = await _ended(call)
        assert error.code() is grpc.StatusCode.UNKNOWN, error
        details = error.details() or ""
        assert "node frozen stopped answering during the call" in details
        assert "it may have done its work" in details and "retry" not in details


async def test_a_new_call_to_a_frozen_node_whose_channel_was_ready_ends_within_the_bound(
    tmp_path: Path, database: str
) -> None:
    async with frozen_node_setup(tmp_path, database, wait_seconds=0) as setup:
        get = sandbox_pb2.GetSandboxRequest(name=NAME)
        await setup.stub.GetSandbox(get, timeout=DEADLINE)
        channel = setup.gateway.directory.channel(setup.address)
        assert channel.get_state() is grpc.ChannelConnectivity.READY
        setup.freeze()
        error, took = await _ended(setup.stub.GetSandbox(get, timeout=DEADLINE))
        # Whether the pings found the node before the call or during it, reading changes
        # nothing: the answer says to retry.
        assert error.code() is grpc.StatusCode.UNAVAILABLE, error
        details = error.details() or ""
        assert "node frozen" in details and details.endswith("retry"), details
        assert took < BOUND, took


async def test_a_long_call_that_sends_nothing_is_not_cut_off_by_the_pings(
    tmp_path: Path, database: str
) -> None:
    # Long enough for grpc's server, left at its defaults, to count three pings too many and
    # close the connection (GOAWAY too_many_pings).
    silent = 8.0
    async with frozen_node_setup(tmp_path, database, wait_seconds=silent) as setup:
        began = time.monotonic()
        ran = await setup.stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=NAME, code=WAIT), timeout=DEADLINE
        )
        assert ran.stdout == f"ran {WAIT}\n"
        assert time.monotonic() - began >= silent


async def test_a_caller_that_pings_the_gateway_is_not_cut_off_in_a_long_call(
    tmp_path: Path, database: str
) -> None:
    # Clients behind load balancers ping to keep their connections (and find dead ones): a
    # caller pinging every second through a silent 8 s call, which grpc's server defaults
    # (one ping per 5 minutes without data, 2 strikes) answer with GOAWAY too_many_pings.
    silent = 8.0
    pinging = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    async with frozen_node_setup(tmp_path, database, wait_seconds=silent) as setup:
        address = f"127.0.0.1:{setup.gateway.port}"
        async with grpc.aio.insecure_channel(address, options=pinging) as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            ran = await stub.ExecuteCode(
                sandbox_pb2.ExecuteCodeRequest(name=NAME, code=WAIT), timeout=DEADLINE
            )
            assert ran.stdout == f"ran {WAIT}\n"
            # The connection the call came on is still up: the next call needs no new one.
            assert channel.get_state() is grpc.ChannelConnectivity.READY
