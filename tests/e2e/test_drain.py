"""Draining a node, end to end: two node processes and two gateways on one real PostgreSQL, all
under the service user's podman. `python -m controller drain A` moves A's sandboxes to B (a
running one keeps its variables and files and runs on; a paused one resumes there on its next
call), a call racing the move gets the moved sandbox's answer, never a stale one, A keeps no
container or checkpoint of them, and creates avoid A. The node-to-node transfer refuses a caller
without the move's token, or whose call or checkpoint names another sandbox, and changes
nothing then."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.config import Config
from petri.v1 import sandbox_pb2
from tests.e2e.cluster import (
    ROOT,
    GatewayProcess,
    Node,
    containers_of,
    holder,
    podman_service,
    remove_containers,
    rows,
)
from tests.e2e.helpers import podman, value_of
from tests.postgres import fresh_database

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e

WAIT_SECONDS = 60.0
TAKE_OVER = "/petri.internal.v1.NodeTransfer/TakeOver"
# An execution that holds its sandbox until the test lets it go.
HELD_UNTIL_RELEASED = (
    "import os, time\n"
    "open('/workspace/started', 'w').close()\n"
    "while not os.path.exists('/workspace/release'):\n"
    "    time.sleep(0.02)\n"
    "v += 1\n"
)


@dataclass
class Pair:
    database: str
    a: Node  # the node drained
    b: Node
    gateways: list[GatewayProcess]


@pytest.fixture(scope="module")
def module_database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@pytest.fixture(scope="module")
async def pair(e2e_config: Config, module_database: str) -> AsyncIterator[Pair]:
    suffix = uuid.uuid4().hex[:6]
    async with podman_service(e2e_config) as socket_path:
        a, b = (Node(f"dr-{n}-{suffix}", e2e_config, module_database, socket_path) for n in "ab")
        gateways = [
            GatewayProcess(f"dr-gw{n}-{suffix}", e2e_config, module_database) for n in range(2)
        ]
        try:
            await asyncio.gather(a.start(), b.start())
            await asyncio.gather(*(gateway.start() for gateway in gateways))
            yield Pair(module_database, a, b, gateways)
        finally:
            await asyncio.gather(*(p.stop() for p in [*gateways, a, b]))
            remove_containers([a.name, b.name])


def project() -> str:
    return f"d-{uuid.uuid4().hex[:10]}"


def checkpoint_of(node: Node, uid: str) -> Path:
    return Path(node.environ["PETRI_STATE_DIR"]) / "checkpoints" / f"{uid}.ckpt"


async def run(stub: Stub, name: str, code: str) -> str | None:
    response = await stub.ExecuteCode(
        sandbox_pb2.ExecuteCodeRequest(name=name, code=code), timeout=120
    )
    assert not response.HasField("error"), response
    return value_of(response)


def where(name: str) -> tuple[str, str]:
    parts = name.split("/")
    return parts[1], parts[3]


async def drain_command(database: str, node: str, *flags: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "drain", node, *flags, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PETRI_DATABASE_URL": database},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def in_container(container: str, script: str) -> None:
    """Runs a shell script in a sandbox's container from outside, as its root."""
    await asyncio.wait_for(asyncio.to_thread(podman, "exec", container, "sh", "-c", script), 60)


async def logged(node: Node, *words: str) -> None:
    """Waits for a line of the node's log that has all `words`."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not any(all(w in line for w in words) for line in node.log.read_text().splitlines()):
        assert asyncio.get_running_loop().time() < deadline, f"{node.name} never logged {words}"
        await asyncio.sleep(0.1)


async def test_a_drained_node_s_sandboxes_move_with_their_state_and_creates_avoid_it(
    pair: Pair,
) -> None:
    a, b = pair.a, pair.b
    async with a.stub() as on_a, pair.gateways[0].stub() as gw1, pair.gateways[1].stub() as gw2:
        running = await on_a.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(parent=f"projects/{project()}"), timeout=120
        )
        paused = await on_a.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(parent=f"projects/{project()}"), timeout=120
        )
        code = "v = 41\n_ = open('/workspace/kept.txt', 'w').write('kept')"
        assert await run(gw2, running.name, code) is None  # gw2 routes it to A
        assert await run(gw1, paused.name, "w = 7") is None
        await on_a.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=paused.name), timeout=120)
        assert checkpoint_of(a, paused.uid).is_file()

        # An execution is under way when the drain starts: the move waits for it, and a call
        # sent once the move is under way, through the gateway that routed the sandbox to A
        # before, waits for the move and is refused by A and sent on to B, or goes to B: it
        # gets the moved sandbox's answer, never a stale one.
        container = containers_of([a.name])[running.uid]
        first = asyncio.ensure_future(run(gw1, running.name, HELD_UNTIL_RELEASED))
        await in_container(container, "until [ -e /workspace/started ]; do sleep 0.05; done")
        drain = await drain_command(pair.database, a.name)
        await logged(a, "moving a sandbox", running.name, "after_its_queue=True")
        second = asyncio.ensure_future(run(gw2, running.name, "v"))
        await in_container(container, "touch /workspace/release")
        assert await first is None
        assert await second == "42"
        output, _ = await asyncio.wait_for(drain.communicate(), WAIT_SECONDS)
        assert drain.returncode == 0, output
        lines = output.decode().splitlines()
        assert lines[0] == f"node {a.name}: draining" and lines[-1] == f"node {a.name}: drained"

        for sandbox in (running, paused):
            assert await holder(pair.database, *where(sandbox.name)) == b.name
            assert not checkpoint_of(a, sandbox.uid).exists()
        assert not {running.uid, paused.uid} & set(containers_of([a.name]))
        got = await gw1.GetSandbox(sandbox_pb2.GetSandboxRequest(name=running.name))
        assert got.state == sandbox_pb2.Sandbox.RUNNING
        assert running.uid in containers_of([b.name])
        assert await run(gw1, running.name, "v") == "42"
        assert await run(gw2, running.name, "open('/workspace/kept.txt').read()") == "'kept'"
        got = await gw2.GetSandbox(sandbox_pb2.GetSandboxRequest(name=paused.name))
        assert got.state == sandbox_pb2.Sandbox.PAUSED  # stays paused until called
        assert checkpoint_of(b, paused.uid).is_file()
        assert await run(gw1, paused.name, "w * 6") == "42"  # resumed on B
        got = await gw1.GetSandbox(sandbox_pb2.GetSandboxRequest(name=paused.name))
        assert got.state == sandbox_pb2.Sandbox.RUNNING

        # Creates avoid the drained node; undone, it takes them again.
        for _ in range(3):
            made = await gw1.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent=f"projects/{project()}"), timeout=120
            )
            assert await holder(pair.database, *where(made.name)) == b.name
            await gw2.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name))
        undo = await drain_command(pair.database, a.name, "--undo")
        output, _ = await undo.communicate()
        assert output.decode().strip() == f"node {a.name}: no longer draining"
        for sandbox in (running, paused):
            await gw1.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


async def take_over(
    node: Node, metadata: tuple[tuple[str, str], ...], data: list[bytes]
) -> grpc.StatusCode:
    """A TakeOver call straight to `node`, as another node would make it: its status."""

    async def chunks() -> AsyncIterator[bytes]:
        for piece in data:
            yield piece

    async with grpc.aio.insecure_channel(node.address) as channel:
        method: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(TAKE_OVER)
        try:
            await method(chunks(), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            return error.code()
    return grpc.StatusCode.OK


async def test_a_forged_transfer_is_refused_and_changes_nothing(pair: Pair) -> None:
    a, b = pair.a, pair.b
    async with a.stub() as on_a, pair.gateways[0].stub() as gw1:
        made = [
            await on_a.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(parent=f"projects/{project()}"), timeout=120
            )
            for _ in range(2)
        ]
        for sandbox in made:
            assert await run(gw1, sandbox.name, f"mine = {sandbox.uid!r}") is None
            await on_a.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=sandbox.name))
        victim, other = made
        victims_file = checkpoint_of(a, victim.uid).read_bytes()
        others_file = checkpoint_of(a, other.uid).read_bytes()

        def meta(name: str, token: str | None) -> tuple[tuple[str, str], ...]:
            fields = [("petri-move-uid", victim.uid), ("petri-move-sandbox", name)]
            return tuple(fields + ([("petri-move-token", token)] if token is not None else []))

        token = "f" * 43
        # No move recorded: no token, or any token, is refused.
        assert await take_over(b, meta(victim.name, None), [victims_file]) is (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await take_over(b, meta(victim.name, token), [victims_file]) is (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # A move of the victim to B with a known token (as A would record it): the wrong token,
        # or the right one for another node, is still refused.
        await rows(
            pair.database,
            "INSERT INTO moves (uid, source, target, token_hash, resume) "
            "VALUES (%s, %s, %s, %s, true) RETURNING uid",
            victim.uid, a.name, b.name, hashlib.sha256(token.encode()).hexdigest(),
        )  # fmt: skip
        assert await take_over(b, meta(victim.name, "g" * 43), [victims_file]) is (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert await take_over(a, meta(victim.name, token), [victims_file]) is (
            grpc.StatusCode.PERMISSION_DENIED
        )
        # The right token, but the call names another sandbox, or the checkpoint is another's.
        assert await take_over(b, meta(other.name, token), [victims_file]) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert await take_over(b, meta(victim.name, token), [others_file]) is (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        # A gateway does not relay the transfer.
        async with grpc.aio.insecure_channel(pair.gateways[0].address) as channel:
            relayed: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(
                TAKE_OVER
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await relayed(iter([victims_file]), metadata=meta(victim.name, token), timeout=30)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED

        # Nothing changed: both are A's, PAUSED, with their checkpoints; B has no copy.
        for sandbox in made:
            assert await holder(pair.database, *where(sandbox.name)) == a.name
            assert not checkpoint_of(b, sandbox.uid).exists()
        assert checkpoint_of(a, victim.uid).read_bytes() == victims_file
        for sandbox in made:
            assert await run(gw1, sandbox.name, "mine") == repr(sandbox.uid)
            await gw1.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
