"""The warm pool: sandboxes started and preloaded ahead of any request, per kind of sandbox.

A CreateSandbox whose effective spec (image profile, runtime, resources) matches a pool key
takes a member instead of starting a container; one background task refills the pool, one
sandbox at a time. Members belong to no project until claimed (see SandboxManager), so they
are invisible to List and count toward no quota. A member is handed out at most once: `take`
removes it, and nothing ever puts a used sandbox back.
"""

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog

from controller.records import Resources, SandboxRecord, Spec
from controller.units import parse_size

log = structlog.get_logger()

# After a failed refill of a key, the first pause before the next try; it doubles up to the
# longest, so a missing image does not make the service spin.
RETRY_FIRST = 1.0
RETRY_LONGEST = 60.0


@dataclass(frozen=True)
class PoolTarget:
    """How many sandboxes of one kind to keep ready. Empty profile and runtime, and zero
    resources, mean the server's defaults, as in a CreateSandbox that leaves them unset."""

    size: int
    profile: str = ""
    runtime: str = ""
    resources: Resources = Resources()

    def __str__(self) -> str:
        parts = [f"size={self.size}"]
        if self.profile:
            parts.append(f"profile={self.profile}")
        if self.runtime:
            parts.append(f"runtime={self.runtime}")
        for key, value in (
            ("memory", self.resources.memory_bytes),
            ("disk", self.resources.disk_bytes),
            ("processes", self.resources.max_processes),
            ("cpu", self.resources.cpu_millis),
        ):
            if value:
                parts.append(f"{key}={value}")
        return ",".join(parts)


def parse_pool(text: str) -> tuple[PoolTarget, ...]:
    """Parses `size=2,profile=full; size=1,profile=test,runtime=gvisor,memory=1GiB`:
    entries separated by ';', each of key=value pairs separated by ','. Keys: size (required),
    profile, runtime (runc or gvisor), memory and disk (sizes), processes, cpu (millicores)."""
    targets = []
    for entry in text.split(";"):
        if not entry.strip():
            continue
        values: dict[str, str] = {}
        for pair in entry.split(","):
            key, sep, value = pair.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"pool entry {entry.strip()!r}: {pair.strip()!r} is not key=value")
            if key in values:
                raise ValueError(f"pool entry {entry.strip()!r} sets {key} twice")
            values[key] = value
        unknown = set(values) - {"size", "profile", "runtime", "memory", "disk", "processes", "cpu"}
        if unknown:
            raise ValueError(f"pool entry {entry.strip()!r}: unknown keys {sorted(unknown)}")
        if "size" not in values:
            raise ValueError(f"pool entry {entry.strip()!r} has no size")
        size = int(values["size"])
        if size < 0:
            raise ValueError(f"pool entry {entry.strip()!r}: size must not be negative")
        runtime = values.get("runtime", "")
        if runtime not in ("", "runc", "gvisor"):
            raise ValueError(f"pool entry {entry.strip()!r}: runtime must be runc or gvisor")
        resources = Resources(
            cpu_millis=int(values.get("cpu", "0")),
            memory_bytes=parse_size(values["memory"]) if "memory" in values else 0,
            disk_bytes=parse_size(values["disk"]) if "disk" in values else 0,
            max_processes=int(values.get("processes", "0")),
        )
        targets.append(PoolTarget(size, values.get("profile", ""), runtime, resources))
    return tuple(targets)


class WarmPool:
    """Ready members by spec, and the task that keeps each spec at its size."""

    def __init__(
        self,
        sizes: Mapping[Spec, int],
        start_member: Callable[[Spec], Awaitable[SandboxRecord]],
    ) -> None:
        self._sizes = dict(sizes)
        self._start_member = start_member
        self._ready: dict[Spec, collections.deque[SandboxRecord]] = {
            spec: collections.deque() for spec in self._sizes
        }
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        counts = {spec.image_profile: len(ready) for spec, ready in self._ready.items()}
        return f"<WarmPool ready={counts}>"

    def start(self) -> None:
        if self._sizes and self._task is None:
            self._task = asyncio.create_task(self._refill_forever(), name="warm-pool")
            self._wanted.set()

    async def close(self) -> list[SandboxRecord]:
        """Stops refilling; returns the members left, for the caller to delete."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = [member for ready in self._ready.values() for member in ready]
        for ready in self._ready.values():
            ready.clear()
        return left

    def take(self, spec: Spec) -> SandboxRecord | None:
        """Removes and returns a ready member of this spec, if any; the refill follows."""
        ready = self._ready.get(spec)
        if not ready:
            return None
        self._wanted.set()
        return ready.popleft()

    def give_back(self, member: SandboxRecord) -> None:
        """Returns a member that `take` gave out but that was not claimed (its caller's
        request failed before the claim): it is still unused."""
        self._ready[member.spec].appendleft(member)

    def drop(self, uid: str) -> None:
        """Forgets a member that is gone (deleted, expired, its container died)."""
        for ready in self._ready.values():
            for member in list(ready):
                if member.uid == uid:
                    ready.remove(member)
                    self._wanted.set()

    def count(self, spec: Spec) -> int:
        return len(self._ready.get(spec, ()))

    @property
    def keys(self) -> list[Spec]:
        return list(self._sizes)

    def ready_uids(self) -> set[str]:
        return {member.uid for ready in self._ready.values() for member in ready}

    async def _refill_forever(self) -> None:
        retry_at: dict[Spec, float] = {}
        pause: dict[Spec, float] = {}
        loop = asyncio.get_running_loop()
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            for spec, size in self._sizes.items():
                while len(self._ready[spec]) < size and loop.time() >= retry_at.get(spec, 0.0):
                    try:
                        member = await self._start_member(spec)
                    except Exception as exc:
                        wait = pause.get(spec, RETRY_FIRST)
                        pause[spec] = min(RETRY_LONGEST, wait * 2)
                        retry_at[spec] = loop.time() + wait
                        log.warning(
                            "could not start a warm pool sandbox",
                            profile=spec.image_profile,
                            runtime=spec.runtime.name,
                            error=str(exc),
                            retry_in_seconds=wait,
                        )
                        loop.call_later(wait, self._wanted.set)
                        break
                    pause.pop(spec, None)
                    self._ready[spec].append(member)
