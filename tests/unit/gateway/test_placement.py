"""Where a create goes: the best of two live nodes with room, a warm member of its kind first."""

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import grpc

from controller.gateway.directory import NodeInfo, placement_order
from petri.v1 import sandbox_pb2
from tests.unit.gateway.fakes import MemoryNodes, node_record, running_node
from tests.unit.gateway.harness import PARENT, running_gateway


def _first_two(nodes: Sequence[NodeInfo], count: int) -> list[NodeInfo]:
    return list(nodes[:count])


def _names(nodes: Sequence[NodeInfo]) -> list[str]:
    return [node.name for node in nodes]


def test_placement_skips_draining_and_full_nodes() -> None:
    nodes: list[NodeInfo] = [
        node_record("draining", "h:1", draining=True),
        node_record("full", "h:2", sandboxes=4, max_sandboxes=4),
        node_record("room", "h:3", sandboxes=3, max_sandboxes=4),
        node_record("no-limit", "h:4", sandboxes=500),
    ]
    assert sorted(_names(placement_order(nodes, "full/runc", _first_two))) == ["no-limit", "room"]
    assert placement_order(nodes[:2], "full/runc", _first_two) == []


def test_of_the_two_drawn_a_warm_member_wins_then_fewer_sandboxes_then_more_memory() -> None:
    warm = node_record("warm", "h:1", sandboxes=9, warm={"full/runc": 1})
    cold = node_record("cold", "h:2", sandboxes=0, warm={"full/gvisor": 3})
    assert _names(placement_order([cold, warm], "full/runc", _first_two)) == ["warm", "cold"]
    assert _names(placement_order([warm, cold], "full/gvisor", _first_two)) == ["cold", "warm"]
    busy = node_record("busy", "h:1", sandboxes=5)
    idle = node_record("idle", "h:2", sandboxes=1)
    assert _names(placement_order([busy, idle], "full/runc", _first_two))[0] == "idle"
    low = node_record("low", "h:1", free_memory=1 << 30)
    high = node_record("high", "h:2", free_memory=4 << 30)
    assert _names(placement_order([low, high], "full/runc", _first_two))[0] == "high"


def test_only_the_two_drawn_compete_for_first_place() -> None:
    # The best node overall is not drawn: the better of the two drawn goes first, the rest after.
    best = node_record("best", "h:3", warm={"full/runc": 2})
    drawn = [node_record("a", "h:1", sandboxes=3), node_record("b", "h:2", sandboxes=1)]
    order = _names(placement_order([*drawn, best], "full/runc", _first_two))
    assert order == ["b", "best", "a"]


def test_placement_spreads_creates_over_equal_nodes() -> None:
    nodes = [node_record(f"n{i}", f"h:{i}") for i in range(4)]
    rng = random.Random(7)
    firsts = Counter(placement_order(nodes, "full/runc", rng.sample)[0].name for _ in range(400))
    assert set(firsts) == {"n0", "n1", "n2", "n3"}
    assert min(firsts.values()) > 50


async def test_a_create_goes_to_the_node_with_a_warm_member_of_its_kind(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, a_address), running_node("node-b") as (b, b_address):
        nodes = MemoryNodes(
            [
                # Four ready members each: one per create, as the gateway counts them.
                node_record("node-a", a_address, warm={"full/runc": 4}),
                node_record("node-b", b_address, warm={"slim/gvisor": 4}),
            ]
        )
        async with running_gateway(tmp_path, nodes) as (_, stub, _):
            for _ in range(4):  # no spec: the node's defaults, full/runc
                made = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
                assert made.display_name == "node-a"
            spec = sandbox_pb2.SandboxSpec(
                image_profile="slim", runtime=sandbox_pb2.SandboxSpec.GVISOR
            )
            request = sandbox_pb2.CreateSandboxRequest(
                parent=PARENT, sandbox=sandbox_pb2.Sandbox(spec=spec)
            )
            for _ in range(4):
                assert (await stub.CreateSandbox(request)).display_name == "node-b"
        assert a.methods() == ["CreateSandbox"] * 4
        assert b.methods() == ["CreateSandbox"] * 4


async def test_a_create_avoids_a_draining_node(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, a_address), running_node("node-b") as (b, b_address):
        nodes = MemoryNodes(
            [
                node_record("node-a", a_address, draining=True, warm={"full/runc": 5}),
                node_record("node-b", b_address),
            ]
        )
        async with running_gateway(tmp_path, nodes) as (_, stub, _):
            for _ in range(4):
                made = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
                assert made.display_name == "node-b"
        assert a.seen == []
        assert b.methods() == ["CreateSandbox"] * 4


async def _two_nodes_a_first(
    tmp_path: Path, request_id: str
) -> tuple[list[str], list[str], grpc.aio.AioRpcError | str]:
    async with running_node("node-a") as (a, a_address), running_node("node-b") as (b, b_address):
        a.create_status = grpc.StatusCode.UNAVAILABLE
        nodes = MemoryNodes(
            [
                node_record("node-a", a_address, warm={"full/runc": 1}),  # placed first
                node_record("node-b", b_address),
            ]
        )
        async with running_gateway(tmp_path, nodes) as (_, stub, _):
            request = sandbox_pb2.CreateSandboxRequest(parent=PARENT, request_id=request_id)
            try:
                outcome: grpc.aio.AioRpcError | str = (
                    await stub.CreateSandbox(request)
                ).display_name
            except grpc.aio.AioRpcError as error:
                outcome = error
        return a.methods(), b.methods(), outcome


async def test_a_create_with_a_request_id_is_retried_on_another_node(tmp_path: Path) -> None:
    on_a, on_b, outcome = await _two_nodes_a_first(tmp_path, "req-1")
    assert on_a == ["CreateSandbox"] and on_b == ["CreateSandbox"]
    assert outcome == "node-b"


async def test_a_create_without_a_request_id_is_not_retried(tmp_path: Path) -> None:
    on_a, on_b, outcome = await _two_nodes_a_first(tmp_path, "")
    assert on_a == ["CreateSandbox"] and on_b == []
    assert isinstance(outcome, grpc.aio.AioRpcError)
    assert outcome.code() is grpc.StatusCode.UNAVAILABLE
    assert outcome.details() == "node-a cannot create now"


async def test_a_create_goes_elsewhere_when_the_placed_node_does_not_answer(
    tmp_path: Path,
) -> None:
    async with running_node("node-gone") as (_, gone_address):
        pass
    async with running_node("node-b") as (b, b_address):
        nodes = MemoryNodes(
            [
                node_record("node-gone", gone_address, warm={"full/runc": 1}),  # placed first
                node_record("node-b", b_address),
            ]
        )
        async with running_gateway(tmp_path, nodes) as (_, stub, _):
            # Nothing reached node-gone: even without a request_id, trying another is safe.
            made = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
        assert made.display_name == "node-b"
        assert b.methods() == ["CreateSandbox"]
