"""The petri nodes a gateway knows of (from the shared registry's membership table), one
channel per node address, and where a new sandbox goes."""

import asyncio
import collections
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import grpc
import structlog

from controller.placement import NodeInfo as NodeInfo
from controller.placement import has_room as has_room  # re-exported: the tests name them here
from controller.placement import placement_order as placement_order

log = structlog.get_logger()

# A node whose last heartbeat is older than this is not live: calls do not go to it (the
# nodes' --node-timeout, which is when they give its sandboxes up).
DEFAULT_STALE_AFTER = timedelta(seconds=15)
# How long a channel to a node that left stays open for the calls still on it.
CLOSE_GRACE_SECONDS = 30.0
# How long the gateway counts a sandbox it placed on a node before the node's own figures are
# sure to include it (the nodes heartbeat every 2 s by default; the gateway reads them every
# second): without it, creates in a row all go where the last figures said was best.
RECENT_PLACEMENT_SECONDS = 5.0


@dataclass(frozen=True)
class _WithRecent:
    """A node's figures plus the sandboxes this gateway placed on it lately (NodeInfo)."""

    node: NodeInfo
    placed: int
    placed_of_kind: int
    kind: str

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def address(self) -> str:
        return self.node.address

    @property
    def age(self) -> timedelta:
        return self.node.age

    @property
    def draining(self) -> bool:
        return self.node.draining

    @property
    def sandboxes(self) -> int:
        return self.node.sandboxes + self.placed

    @property
    def max_sandboxes(self) -> int:
        return self.node.max_sandboxes

    @property
    def free_memory(self) -> int:
        return self.node.free_memory

    @property
    def warm(self) -> Mapping[str, int]:
        warm = dict(self.node.warm)
        if self.kind in warm:
            warm[self.kind] = max(0, warm[self.kind] - self.placed_of_kind)
        return warm


class NodeList(Protocol):
    """The part of controller.store.nodes.Nodes the gateway uses."""

    async def list_nodes(self) -> Sequence[NodeInfo]: ...


class Directory:
    """The live nodes, refreshed from the membership table, and a channel per address."""

    def __init__(
        self,
        nodes: NodeList,
        channel_for: Callable[[str], grpc.aio.Channel],
        stale_after: timedelta = DEFAULT_STALE_AFTER,
        rng: random.Random | None = None,
    ) -> None:
        self._nodes = nodes
        self._channel_for = channel_for
        self._stale_after = stale_after
        self._rng = rng or random.Random()
        self._live: dict[str, NodeInfo] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Placements lately made here, oldest first: (when, node, kind).
        self._recent: collections.deque[tuple[float, str, str]] = collections.deque()
        self._clock = time.monotonic

    def __repr__(self) -> str:
        return f"<Directory live={sorted(self._live)} channels={len(self._channels)}>"

    async def refresh(self) -> None:
        """Reads the membership table (raises what the database raises); closes the channels of
        addresses no node has any more."""
        listed = await self._nodes.list_nodes()
        self._live = {node.name: node for node in listed if node.age <= self._stale_after}
        addresses = {node.address for node in listed}
        for address in [a for a in self._channels if a not in addresses]:
            channel = self._channels.pop(address)
            log.info("node gone: closing its channel", address=address)
            task = asyncio.get_running_loop().create_task(channel.close(CLOSE_GRACE_SECONDS))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def live(self, name: str) -> NodeInfo | None:
        return self._live.get(name)

    def live_count(self) -> int:
        return len(self._live)

    def any_order(self) -> list[NodeInfo]:
        """The live nodes in a random order, for calls any node answers."""
        nodes = list(self._live.values())
        self._rng.shuffle(nodes)
        return nodes

    def placement(self, kind: str) -> list[NodeInfo]:
        """Where a create of `kind` goes, first choice first; the first is counted as placed
        there until the node's own figures include it."""
        now = self._clock()
        while self._recent and self._recent[0][0] < now - RECENT_PLACEMENT_SECONDS:
            self._recent.popleft()
        placed = collections.Counter(name for _, name, _ in self._recent)
        of_kind = collections.Counter(name for _, name, k in self._recent if k == kind)
        nodes: list[NodeInfo] = [
            _WithRecent(node, placed[node.name], of_kind[node.name], kind)
            for node in self._live.values()
        ]
        order = [
            node.node if isinstance(node, _WithRecent) else node
            for node in placement_order(nodes, kind, self._rng.sample)
        ]
        if order:
            self._recent.append((now, order[0].name, kind))
        return order

    def channel(self, address: str) -> grpc.aio.Channel:
        """The one channel to `address`, made on first use and reused."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._channel_for(address)
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        closing: list[Awaitable[None]] = [channel.close() for channel in channels]
        await asyncio.gather(*closing, *self._closing, return_exceptions=True)
