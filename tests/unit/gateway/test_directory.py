"""The gateway's view of the nodes: live ones only, one channel per address, closed when its
node leaves."""

import asyncio
import contextlib
import random
from dataclasses import dataclass
from datetime import timedelta

import grpc

from controller.gateway.directory import Directory
from controller.gateway.forward import locate_in
from tests.unit.gateway.fakes import MemoryNodes, node_record


class Channels:
    """Makes real (lazy) channels and remembers them."""

    def __init__(self) -> None:
        self.made: dict[str, grpc.aio.Channel] = {}

    def __call__(self, address: str) -> grpc.aio.Channel:
        channel = self.made[address] = grpc.aio.insecure_channel(address)
        return channel


async def test_only_nodes_with_a_recent_heartbeat_are_live() -> None:
    nodes = MemoryNodes(
        [
            node_record("fresh", "127.0.0.1:1", age=timedelta(seconds=5)),
            node_record("stale", "127.0.0.1:2", age=timedelta(seconds=20)),
        ]
    )
    directory = Directory(nodes, Channels(), stale_after=timedelta(seconds=15))
    await directory.refresh()
    assert directory.live("fresh") is not None
    assert directory.live("stale") is None
    assert [node.name for node in directory.any_order()] == ["fresh"]
    assert [node.name for node in directory.placement("full/runc")] == ["fresh"]
    await directory.close()


async def test_one_channel_per_address_reused_and_closed_when_its_node_leaves() -> None:
    nodes = MemoryNodes([node_record("a", "127.0.0.1:1"), node_record("b", "127.0.0.1:2")])
    channels = Channels()
    directory = Directory(nodes, channels)
    await directory.refresh()
    first = directory.channel("127.0.0.1:1")
    assert directory.channel("127.0.0.1:1") is first
    other = directory.channel("127.0.0.1:2")
    nodes.nodes = [node_record("b", "127.0.0.1:2")]
    await directory.refresh()
    # Closing, in a task: wait for the state to leave IDLE (a watch the close ends raises).
    with contextlib.suppress(Exception):
        await asyncio.wait_for(first.wait_for_state_change(grpc.ChannelConnectivity.IDLE), 10)
    assert first.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert other.get_state() is grpc.ChannelConnectivity.IDLE  # b is still there
    assert directory.channel("127.0.0.1:1") is not first  # a new node there gets a new one
    await directory.close()
    assert other.get_state() is grpc.ChannelConnectivity.SHUTDOWN


@dataclass(frozen=True)
class Row:
    node: str
    given_up: bool = False  # terminated by the sweep of its dead node


class Registry:
    """get_live as the shared registry answers it: live rows by (project, sandbox id)."""

    def __init__(self, rows: dict[tuple[str, str], Row]) -> None:
        self.rows = rows

    async def get_live(self, project: str, sandbox_id: str) -> Row | None:
        return self.rows.get((project, sandbox_id))


async def test_the_registry_locates_a_sandbox_by_its_rows_node() -> None:
    rows = {
        ("alpha", "s1"): Row("node-a"),
        ("alpha", "old"): Row(""),
        ("alpha", "swept"): Row("node-b", given_up=True),
    }
    locate = locate_in(Registry(rows))
    assert await locate("alpha", "s1") == "node-a"
    assert await locate("beta", "s1") is None  # live nowhere: any node answers
    assert await locate("alpha", "old") is None  # a row of no node (one controller's)
    assert await locate("alpha", "swept") is None  # its node may never come back


async def test_creates_in_a_row_between_two_heartbeats_spread_over_equal_nodes() -> None:
    """The nodes' figures are seconds old: creates placed meanwhile count where they went, so
    a row of them does not all go to the node the last figures said was best (bench/gateway
    found 0/6 and 2/0/4 over equal nodes before)."""
    # "a" has a little more free memory: with figures that stay as they are, it wins every
    # draw it is in (two thirds of them), the herd bench/gateway saw.
    nodes = MemoryNodes(
        [
            node_record(name, f"127.0.0.1:{i}", free_memory=(8 << 30) + (name == "a"))
            for i, name in enumerate("abc")
        ]
    )
    for seed in range(20):
        directory = Directory(nodes, Channels(), rng=random.Random(seed))
        await directory.refresh()
        firsts = [directory.placement("full/runc")[0].name for _ in range(9)]
        counts = sorted(firsts.count(name) for name in "abc")
        assert counts[0] >= 2 and counts[-1] <= 4, (seed, firsts)
        await directory.close()


async def test_a_warm_member_the_gateway_just_used_is_not_counted_twice() -> None:
    """One warm member on one node: the first create goes there, the next ones do not count
    on that member any more."""
    nodes = MemoryNodes(
        [
            node_record("warm", "127.0.0.1:1", warm={"full/runc": 1}),
            node_record("cold", "127.0.0.1:2", sandboxes=0),
        ]
    )
    directory = Directory(nodes, Channels())
    await directory.refresh()
    assert directory.placement("full/runc")[0].name == "warm"
    assert directory.placement("full/runc")[0].name == "cold"  # fewer sandboxes now
    await directory.close()
