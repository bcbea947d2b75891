"""100 MiB through the gateway, both ways, with the memory flat: streams are pumped a message at a
time, never gathered.

What is measured: the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of this
whole process, which runs the client, the gateway and the fake node. The node sends one shared
1 MiB buffer and counts what it receives; the client does the same the other way; so a gateway
that held the file, or let one side run ahead of the other, would add its 100 MiB to the peak.
The bound, 40 MiB (9 to 23 MiB measured; a gateway gathering the stream first: 108 to 120), leaves
room for gRPC's transport buffers and flow-control windows on two connections.
"""

import gc
from collections.abc import AsyncIterator
from pathlib import Path

from petri.v1 import execution_pb2, files_pb2
from tests.unit.gateway.fakes import CHUNK, MemoryNodes, MiB, node_record, running_node
from tests.unit.gateway.harness import name_of, running_gateway

FILE_MIB = 100
GROWTH_BOUND = 40 * MiB


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def _start_measuring() -> int:
    """Resets the peak resident memory to the current one, which it returns."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


async def _chunks(mib: int) -> AsyncIterator[files_pb2.WriteFileRequest]:
    for index in range(mib):
        yield files_pb2.WriteFileRequest(
            name=name_of("s1") if index == 0 else "",
            chunk=execution_pb2.FileChunk(path="big.bin", data=CHUNK, final=index == mib - 1),
        )


async def test_a_100_mib_read_file_passes_with_the_memory_flat(tmp_path: Path) -> None:
    async with running_node("node-a") as (node, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            async for _ in stub.ReadFile(
                files_pb2.ReadFileRequest(name=name_of("s1"), path="16.bin")
            ):
                pass  # the connections and their buffers exist before the measurement
            before = _start_measuring()
            received = 0
            async for chunk in stub.ReadFile(
                files_pb2.ReadFileRequest(name=name_of("s1"), path=f"{FILE_MIB}.bin")
            ):
                received += len(chunk.data)
                del chunk
            growth = _status("VmHWM") - before
    assert received == FILE_MIB * MiB
    assert node.read_chunks == 16 + FILE_MIB
    assert growth < GROWTH_BOUND, f"peak memory grew {growth / MiB:.0f} MiB"


async def test_a_100_mib_write_file_passes_with_the_memory_flat(tmp_path: Path) -> None:
    async with running_node("node-a") as (node, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            await stub.WriteFile(_chunks(16))
            node.written = 0
            before = _start_measuring()
            info = await stub.WriteFile(_chunks(FILE_MIB))
            growth = _status("VmHWM") - before
    assert info.size == node.written == FILE_MIB * MiB
    assert growth < GROWTH_BOUND, f"peak memory grew {growth / MiB:.0f} MiB"
