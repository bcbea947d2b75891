"""Finding a sandbox by name, and the NOT_FOUND that says what became of one that is gone
(with the reason SANDBOX_EXPIRED, SANDBOX_DELETED or SANDBOX_NOT_FOUND)."""

from typing import Any

from controller.errors import FailedPrecondition, NotFound
from controller.names import SandboxName
from controller.records import SandboxRecord, State
from controller.store.registry import Registry


class Lookup:
    def __init__(self, registry: Registry, node: str = "") -> None:
        self._registry = registry
        # This controller's node name ("" in role single): whose containers it holds.
        self.node = node

    def __repr__(self) -> str:
        return f"<Lookup {self._registry!r}>"

    async def get(self, name: SandboxName) -> SandboxRecord:
        """The live sandbox of that name (any state but DELETED); NotFound otherwise."""
        record = await self._registry.get_live(name.project, name.sandbox_id)
        if record is None:
            raise await self.not_found(name)
        return record

    async def held(self, name: SandboxName) -> SandboxRecord:
        """get(), for a call that needs the sandbox's container or checkpoint: only one that
        this node holds (FailedPrecondition naming the node that does)."""
        record = await self.get(name)
        check_held(record, self.node)
        return record

    async def not_found(self, name: SandboxName) -> NotFound:
        """NotFound, saying when and why the sandbox went if it left a tombstone."""
        tombstone = await self._registry.get_latest_tombstone(name.project, name.sandbox_id)
        if tombstone is not None and tombstone.delete_time is not None:
            when = tombstone.delete_time.isoformat()
            expired = tombstone.delete_reason == "expired"
            return NotFound(
                f"sandbox {name} was {tombstone.delete_reason} at {when}",
                reason="SANDBOX_EXPIRED" if expired else "SANDBOX_DELETED",
                metadata={"expire_time" if expired else "delete_time": when},
            )
        return NotFound(f"sandbox {name} does not exist", reason="SANDBOX_NOT_FOUND")


def check_held(record: SandboxRecord, node: str) -> None:
    """FailedPrecondition unless the sandbox is `node`'s: its container is on another host,
    out of this controller's reach (a gateway sends each call to the sandbox's node). Raised
    before the call changes anything: calling again is safe, a drain may just have moved it.
    One that its dead node's sweep terminated is TERMINATED, whichever node is asked."""
    if record.given_up and record.node != node:
        raise FailedPrecondition(
            f"sandbox {record.name} is TERMINATED: {record.state_message}",
            **terminated_reason(record),
        )
    if record.node != node:
        holder = f"node {record.node}" if record.node else "a controller that is no node"
        raise FailedPrecondition(
            f"sandbox {record.name} is held by {holder}, not this one ({node or 'single'}), "
            "maybe moved there by a drain: nothing was done, and calling again through a "
            "gateway is safe",
            reason="SANDBOX_ON_ANOTHER_NODE",
            metadata={"node": record.node},
        )


def terminated_reason(record: SandboxRecord) -> dict[str, Any]:
    """The error details (reason, metadata) of a sandbox that cannot do something because it
    is TERMINATED, to pass to its error; none for the other states."""
    if record.state is not State.TERMINATED:
        return {}
    return {"reason": "SANDBOX_TERMINATED", "metadata": {"state_message": record.state_message}}
