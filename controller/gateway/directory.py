"""The petri nodes a gateway knows of (from the shared registry's membership table), one
channel per node address, and where a new sandbox goes."""

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from typing import Protocol

import grpc
import structlog

log = structlog.get_logger()

# A node whose last heartbeat is older than this is not live: calls do not go to it (the
# nodes' --node-timeout, which is when they give its sandboxes up).
DEFAULT_STALE_AFTER = timedelta(seconds=15)
# How long a channel to a node that left stays open for the calls still on it.
CLOSE_GRACE_SECONDS = 30.0


class NodeInfo(Protocol):
    """What the gateway reads of a node (controller.store.nodes.NodeRecord)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def age(self) -> timedelta:
        """How long ago it last heartbeated, by the database's clock (not this host's)."""

    @property
    def draining(self) -> bool: ...
    @property
    def sandboxes(self) -> int: ...
    @property
    def max_sandboxes(self) -> int: ...
    @property
    def free_memory(self) -> int: ...
    @property
    def warm(self) -> Mapping[str, int]: ...


class NodeList(Protocol):
    """The part of controller.store.nodes.Nodes the gateway uses."""

    async def list_nodes(self) -> Sequence[NodeInfo]: ...


def has_room(node: NodeInfo) -> bool:
    return not node.max_sandboxes or node.sandboxes < node.max_sandboxes


def _better(kind: str) -> Callable[[NodeInfo], tuple[bool, int, int]]:
    """Sort key, smallest best: a ready warm member of the kind, then fewer sandboxes, then
    more free memory."""
    return lambda node: (node.warm.get(kind, 0) <= 0, node.sandboxes, -node.free_memory)


def placement_order(
    nodes: Sequence[NodeInfo],
    kind: str,
    choose: Callable[[Sequence[NodeInfo], int], list[NodeInfo]],
) -> list[NodeInfo]:
    """Where to try a create of `kind` ("profile/runtime"), first choice first: the best of two
    nodes drawn at random among those not draining and with room (the power of two choices
    spreads load without a herd on the one best node), then the rest, best first."""
    candidates = [node for node in nodes if not node.draining and has_room(node)]
    if not candidates:
        return []
    drawn = choose(candidates, min(2, len(candidates)))
    first = min(drawn, key=_better(kind))
    rest = sorted((node for node in candidates if node is not first), key=_better(kind))
    return [first, *rest]


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
        return placement_order(list(self._live.values()), kind, self._rng.sample)

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
