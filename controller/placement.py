"""Where a sandbox goes among the nodes: a gateway placing a create, and a draining node moving
its sandboxes, pick by the same rule (both read the nodes' heartbeated figures)."""

from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Protocol, TypeVar


class NodeFigures(Protocol):
    """What placement reads of a node (controller.store.nodes.NodeRecord)."""

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


class NodeInfo(NodeFigures, Protocol):
    """A node as gateways and movers read it (controller.store.nodes.NodeRecord)."""

    @property
    def name(self) -> str: ...
    @property
    def address(self) -> str: ...
    @property
    def age(self) -> timedelta:
        """How long ago it last heartbeated, by the database's clock (not this host's)."""


N = TypeVar("N", bound=NodeFigures)


def has_room(node: NodeFigures) -> bool:
    return not node.max_sandboxes or node.sandboxes < node.max_sandboxes


def _better(kind: str) -> Callable[[NodeFigures], tuple[bool, int, int]]:
    """Sort key, smallest best: a ready warm member of the kind, then fewer sandboxes, then
    more free memory."""
    return lambda node: (node.warm.get(kind, 0) <= 0, node.sandboxes, -node.free_memory)


def placement_order(
    nodes: Sequence[N], kind: str, choose: Callable[[Sequence[N], int], list[N]]
) -> list[N]:
    """Where to try a sandbox of `kind` ("profile/runtime"), first choice first: the best of two
    nodes drawn at random among those not draining and with room (the power of two choices
    spreads load without a herd on the one best node), then the rest, best first."""
    candidates = [node for node in nodes if not node.draining and has_room(node)]
    if not candidates:
        return []
    drawn = choose(candidates, min(2, len(candidates)))
    first = min(drawn, key=_better(kind))
    rest = sorted((node for node in candidates if node is not first), key=_better(kind))
    return [first, *rest]
