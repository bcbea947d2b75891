"""Finding a sandbox by name, and the NOT_FOUND that says what became of one that is gone."""

from controller.errors import NotFound
from controller.names import SandboxName
from controller.records import SandboxRecord
from controller.store.registry import Registry


class Lookup:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def __repr__(self) -> str:
        return f"<Lookup {self._registry!r}>"

    async def get(self, name: SandboxName) -> SandboxRecord:
        """The live sandbox of that name (any state but DELETED); NotFound otherwise."""
        record = await self._registry.get_live(name.project, name.sandbox_id)
        if record is None:
            raise await self.not_found(name)
        return record

    async def not_found(self, name: SandboxName) -> NotFound:
        """NotFound, saying when and why the sandbox went if it left a tombstone."""
        tombstone = await self._registry.get_latest_tombstone(name.project, name.sandbox_id)
        if tombstone is not None and tombstone.delete_time is not None:
            return NotFound(
                f"sandbox {name} was {tombstone.delete_reason} at "
                f"{tombstone.delete_time.isoformat()}"
            )
        return NotFound(f"sandbox {name} does not exist")
