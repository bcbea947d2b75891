"""One sandbox per MCP session, created on first use and reused, its TTL kept ahead of use."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from petri import AsyncClient, AsyncSandbox, PetriError

# Every sandbox the MCP server creates carries this label (ListSandboxes: labels.created-by).
CREATED_BY = ("created-by", "petri-mcp")
_LABEL_UNSAFE = re.compile(r"[^a-z0-9_-]")


@dataclass(frozen=True)
class SandboxOptions:
    profile: str | None = None
    runtime: str | None = None
    ttl_seconds: float = 3600.0
    labels: dict[str, str] = field(default_factory=dict)


def session_label(key: str | None) -> str:
    """A label value naming the session: the transport's session id, cut to label rules."""
    return _LABEL_UNSAFE.sub("-", (key or "stdio").lower())[:63] or "session"


class Sessions:
    """The sandboxes of the server's MCP sessions, by session key (None: stdio, or a client
    without sessions). Creation is serialized per key, so concurrent first calls share one."""

    def __init__(self, client: AsyncClient, options: SandboxOptions) -> None:
        self.client = client
        self.options = options
        self._sandboxes: dict[str | None, AsyncSandbox] = {}
        self._locks: dict[str | None, asyncio.Lock] = {}

    def _lock(self, key: str | None) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    async def get(self, key: str | None) -> AsyncSandbox:
        async with self._lock(key):
            sandbox = self._sandboxes.get(key)
            if sandbox is None:
                sandbox = await AsyncSandbox.create(
                    profile=self.options.profile,
                    runtime=self.options.runtime,
                    ttl=self.options.ttl_seconds,
                    labels={
                        **self.options.labels,
                        CREATED_BY[0]: CREATED_BY[1],
                        "mcp-session": session_label(key),
                    },
                    keep=True,
                    client=self.client,
                )
                self._sandboxes[key] = sandbox
            else:
                await self._extend(sandbox)
            return sandbox

    def current(self, key: str | None) -> AsyncSandbox | None:
        return self._sandboxes.get(key)

    async def _extend(self, sandbox: AsyncSandbox) -> None:
        """Pushes the expiry a full TTL ahead once half of it is used: a session in use does not
        expire under its agent, and an abandoned one goes a TTL after its last call."""
        info = sandbox.info
        if not info.HasField("expire_time"):
            return
        left = (info.expire_time.ToDatetime(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
        if left < self.options.ttl_seconds / 2:
            await sandbox.update(ttl=self.options.ttl_seconds)

    def forget(self, key: str | None, sandbox: AsyncSandbox) -> None:
        """Drops the session's sandbox if it is still `sandbox`: a call that failed on an old
        one (e.g. after a reset during it) must not drop the fresh one made since."""
        if self._sandboxes.get(key) is sandbox:
            del self._sandboxes[key]

    async def reset(self, key: str | None) -> bool:
        """Deletes the session's sandbox, if it has one; the next get() creates a fresh one."""
        async with self._lock(key):
            sandbox = self._sandboxes.pop(key, None)
            if sandbox is None:
                return False
            await _delete(sandbox)
            return True

    async def close(self, keep: bool) -> list[str]:
        """At shutdown: deletes every session's sandbox unless `keep`; returns their names."""
        names = [s.name for s in self._sandboxes.values()]
        if not keep:
            await asyncio.gather(*(_delete(s) for s in self._sandboxes.values()))
        self._sandboxes.clear()
        return names


async def _delete(sandbox: AsyncSandbox) -> None:
    try:
        await sandbox.delete()
    except PetriError:
        pass  # already gone (expired, deleted), or the service is down: its TTL ends it
