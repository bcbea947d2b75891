"""Two controller processes in role node on one PostgreSQL and one podman: a sandbox created
on one is listed through the other, whose start leaves it alone; the first killed with
SIGKILL, the second marks its sandbox TERMINATED, naming the node, once its heartbeat is
older than --node-timeout."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

from controller.config import Config
from controller.runtime.container import LABEL_UID
from petri.v1 import sandbox_pb2
from tests.e2e.cluster import NODE_TIMEOUT_SECONDS, REAP_SECONDS, Node, remove_containers
from tests.e2e.helpers import PARENT, podman, value_of


async def test_a_node_killed_has_its_sandbox_terminated_by_the_other_which_left_it_alone(
    e2e_config: Config, database: str, podman_socket: Path
) -> None:
    suffix = uuid.uuid4().hex[:6]
    a = Node(f"e2e-a-{suffix}", e2e_config, database, podman_socket)
    b = Node(f"e2e-b-{suffix}", e2e_config, database, podman_socket)
    try:
        await a.start()
        async with a.stub() as stub_a:
            sandbox = await stub_a.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id=f"n-{suffix}")
            )
        await b.start()
        async with b.stub() as stub_b:
            # B's start adopted nothing of A's: the sandbox runs on, and B lists it.
            got = await stub_b.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
            assert got.state == sandbox_pb2.Sandbox.RUNNING
            listed = await stub_b.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
            assert sandbox.name in [s.name for s in listed.sandboxes]
            running = podman("ps", "--filter", f"label={LABEL_UID}={sandbox.uid}", "-q")
            assert running.strip(), "B's start removed A's container"
            async with a.stub() as stub_a:
                response = await stub_a.ExecuteCode(
                    sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="6 * 7")
                )
                assert value_of(response) == "42", response

            await a.stop(signal.SIGKILL)
            killed = asyncio.get_running_loop().time()
            while True:
                got = await stub_b.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
                if got.state == sandbox_pb2.Sandbox.TERMINATED:
                    break
                waited = asyncio.get_running_loop().time() - killed
                # Its last heartbeat was at most one interval before the kill.
                assert waited < NODE_TIMEOUT_SECONDS + REAP_SECONDS + 5, b.log.read_text()
                await asyncio.sleep(0.1)
            assert got.state_message.startswith(f"node {a.name} stopped answering at ")
            assert got.state_message.endswith("; its sandbox's process is gone")
    finally:
        await a.stop(signal.SIGKILL)
        await b.stop()
        remove_containers([a.name])
