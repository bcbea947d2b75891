"""WriteFile and StreamExecuteCode through a gateway in front of two real nodes (the fast tier's
controllers in role node) on a real PostgreSQL, the gateway having read where the sandbox was
just before it moved (a drain) or was deleted and made again on the other node: the old node
refuses the call (SANDBOX_ON_ANOTHER_NODE) having had only its first message, which the gateway
still holds, and the call goes again to the new node, whole, from its first message; a call
whose first message is its last too. A node's other early answer is the caller's."""

import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.gateway.forward import locate_in
from controller.gateway.server import start_gateway
from controller.records import SandboxRecord, State
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.postgres import fresh_database
from tests.unit.controller.inprocess import eventually, expect, fast_config
from tests.unit.gateway.test_drain_races import Pair, live, two_nodes

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

KiB = 1024


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@contextlib.asynccontextmanager
async def stale_gateway(pair: Pair, tmp_path: Path) -> AsyncIterator["Stub"]:
    """A gateway that read where the sandbox was just before it moved: A, the first time it
    looks for it (and remembers that); the registry after."""
    registry = locate_in(pair.registry)
    looked = False

    async def locate(project: str, sandbox_id: str) -> str | None:
        nonlocal looked
        if not looked:
            looked = True
            return "a"
        return await registry(project, sandbox_id)

    config = fast_config(
        tmp_path / "gateway",
        pair.a.config.runtime_dir,
        database_url=pair.a.config.database_url,
        role="gateway",
    )
    gateway = await start_gateway(
        config,
        pair.nodes,
        locate,
        stale_after=timedelta(seconds=1),
        refresh_interval=0.05,
        connect_timeout=0.5,
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    try:
        yield sandbox_pb2_grpc.SandboxServiceStub(channel)
        assert looked
    finally:
        await channel.close()
        await gateway.stop(0)


async def chunks(
    name: str, path: str, pieces: list[bytes]
) -> AsyncIterator[files_pb2.WriteFileRequest]:
    for index, piece in enumerate(pieces):
        chunk = execution_pb2.FileChunk(path=path, data=piece, final=index == len(pieces) - 1)
        yield files_pb2.WriteFileRequest(name=name if index == 0 else "", chunk=chunk)


async def inputs(
    name: str, code: str, files: dict[str, list[bytes]]
) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
    yield sandbox_pb2.StreamExecuteCodeRequest(
        start=sandbox_pb2.ExecuteCodeStart(name=name, code=code)
    )
    for path, pieces in files.items():
        for index, piece in enumerate(pieces):
            chunk = execution_pb2.FileChunk(path=path, data=piece, final=index == len(pieces) - 1)
            yield sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk)


async def calls_reach_the_new_node(pair: Pair, tmp_path: Path, on_b: SandboxRecord) -> None:
    """Each call, sent first to A by a stale gateway, ends on B as if sent there."""
    name, executor = on_b.name, pair.runtime.executor_of(on_b.uid)
    pieces = [bytes([n]) * (64 * KiB) for n in range(1, 4)]  # several chunks

    async with stale_gateway(pair, tmp_path) as stub:
        info = await stub.WriteFile(chunks(name, "several.bin", pieces))
    assert info.size == sum(map(len, pieces))
    assert executor.files["several.bin"] == b"".join(pieces)

    async with stale_gateway(pair, tmp_path) as stub:  # the first message is the last
        info = await stub.WriteFile(chunks(name, "one.bin", [b"only chunk"]))
    assert info.size == len(b"only chunk") and executor.files["one.bin"] == b"only chunk"

    async with stale_gateway(pair, tmp_path) as stub:
        call = stub.StreamExecuteCode(inputs(name, "x = 1", {"in.bin": pieces}))
        replies = [reply async for reply in call]
    assert [r.stdout for r in replies if r.stdout] == ["ran x = 1\n"]
    assert replies[-1].HasField("result")
    assert executor.executions[-1].files == {"in.bin": b"".join(pieces)}

    async with stale_gateway(pair, tmp_path) as stub:  # `start` alone
        replies = [reply async for reply in stub.StreamExecuteCode(inputs(name, "y = 2", {}))]
    assert [r.stdout for r in replies if r.stdout] == ["ran y = 2\n"]
    assert executor.executions[-1].files == {} and len(executor.executions) == 2

    # Another early answer of a node (A: the path is not one) is the caller's, not sent on.
    async with stale_gateway(pair, tmp_path) as stub:
        await expect(
            stub.WriteFile(chunks(name, "../out", pieces)), grpc.StatusCode.INVALID_ARGUMENT
        )
    assert executor.file_calls == ["WriteFile", "WriteFile"]


async def test_client_streams_that_reach_a_sandbox_s_old_node_go_on_to_the_node_it_moved_to(
    tmp_path: Path, database: str
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        await pair.a.create("s")
        assert await pair.nodes.set_draining("a", True)

        async def on_b() -> SandboxRecord | None:
            record = await live(pair.registry, "s")
            return record if (record.node, record.state) == ("b", State.RUNNING) else None

        moved = await eventually(on_b, "the sandbox to run on B")
        assert await pair.nodes.set_draining("a", False)
        await calls_reach_the_new_node(pair, tmp_path, moved)


async def test_client_streams_for_a_sandbox_made_again_on_another_node_reach_it_there(
    tmp_path: Path, database: str
) -> None:
    async with two_nodes(tmp_path, database) as pair:
        first = await pair.a.create("s")
        await pair.a.delete(first.name)
        await pair.b.create("s")
        again = await live(pair.registry, "s")
        assert again.node == "b" and again.uid != first.uid
        await calls_reach_the_new_node(pair, tmp_path, again)
