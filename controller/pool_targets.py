"""Warm pool targets: how many sandboxes of which kind to keep ready (--warm-pool), and how
a kind that learns sets its target from recent demand."""

import collections
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from controller.records import Resources
from controller.units import parse_size

K = TypeVar("K", bound=Hashable)

# A kind's demand is its creates (and resumes), pool hits and misses alike, within this many
# seconds: about a cold start's time, so it counts what arrives while one member refills
# (a burst of 20 counts 20; a steady 4 a second counts 20 too, what the refills must cover).
DEMAND_WINDOW = 5.0
# The learned level is the highest demand seen, kept for DEMAND_HOLD seconds (a burst that
# comes back within minutes finds the pool as large as the last one), then halved for every
# DEMAND_HALF_LIFE seconds: after a burst of 20, 20 for 10 minutes, 10 at 15, 5 at 20, the
# kind's minimum within the hour.
DEMAND_HOLD = 600.0
DEMAND_HALF_LIFE = 300.0


@dataclass(frozen=True)
class PoolTarget:
    """How many sandboxes of one kind to keep ready: `size` of them (`size=N`), or, when it
    `learns` (`min=N[,max=M]`), between `size` and `maximum` (0: up to --warm-pool-max) as
    recent demand asks. Empty profile and runtime, and zero resources, mean the server's
    defaults, as in a CreateSandbox that leaves them unset."""

    size: int
    profile: str = ""
    runtime: str = ""
    resources: Resources = Resources()
    learns: bool = False
    maximum: int = 0

    def __str__(self) -> str:
        parts = [f"min={self.size}" if self.learns else f"size={self.size}"]
        if self.learns and self.maximum:
            parts.append(f"max={self.maximum}")
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


@dataclass(frozen=True)
class KindBounds:
    """A pool kind's target bounds: fixed when minimum == maximum."""

    minimum: int
    maximum: int

    @property
    def learns(self) -> bool:
        return self.maximum > self.minimum


class Demand(Generic[K]):
    """Each kind's learned level: the peak of its demand within DEMAND_WINDOW, held for
    DEMAND_HOLD, then halved every DEMAND_HALF_LIFE. Times are the caller's clock's seconds
    (monotonic)."""

    def __init__(self) -> None:
        self._recent: dict[K, collections.deque[float]] = {}
        self._peak: dict[K, tuple[float, float]] = {}  # level, when

    def __repr__(self) -> str:
        return f"<Demand kinds={len(self._peak)}>"

    def record(self, kind: K, now: float) -> None:
        recent = self._recent.setdefault(kind, collections.deque())
        recent.append(now)
        while recent[0] <= now - DEMAND_WINDOW:
            recent.popleft()
        if len(recent) >= self.level(kind, now):
            self._peak[kind] = (float(len(recent)), now)

    def level(self, kind: K, now: float) -> float:
        peak, at = self._peak.get(kind, (0.0, now))
        decay: float = 0.5 ** (max(0.0, now - at - DEMAND_HOLD) / DEMAND_HALF_LIFE)
        return peak * decay


def pool_targets(
    bounds: Mapping[K, KindBounds], levels: Mapping[K, float], total_max: int
) -> dict[K, int]:
    """Each kind's target: its minimum, plus for a kind that learns what its level asks
    beyond it (rounded, up to its maximum), while the pool's total stays within total_max
    (the minimums first, then the kinds in their configured order)."""
    left = total_max - sum(bound.minimum for bound in bounds.values())
    targets: dict[K, int] = {}
    for kind, bound in bounds.items():
        wanted = min(bound.maximum, math.floor(levels.get(kind, 0.0) + 0.5))
        extra = max(0, min(wanted - bound.minimum, left)) if bound.learns else 0
        left -= extra
        targets[kind] = bound.minimum + extra
    return targets


_KEYS = {"size", "min", "max", "profile", "runtime", "memory", "disk", "processes", "cpu"}


def parse_pool(text: str) -> tuple[PoolTarget, ...]:
    """Parses `min=2,profile=full; size=1,profile=test,runtime=gvisor,memory=1GiB`: entries
    separated by ';', each of key=value pairs separated by ','. Keys: size (a fixed size) or
    min (a size that learns from demand, never below min) with an optional max, profile,
    runtime (runc or gvisor), memory and disk (sizes), processes, cpu (millicores)."""
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
        unknown = set(values) - _KEYS
        if unknown:
            raise ValueError(f"pool entry {entry.strip()!r}: unknown keys {sorted(unknown)}")
        if ("size" in values) == ("min" in values):
            raise ValueError(
                f"pool entry {entry.strip()!r} has no size: size=N for a fixed one, or "
                "min=N for one that learns from demand (not both)"
            )
        if "size" in values and "max" in values:
            raise ValueError(f"pool entry {entry.strip()!r}: max goes with min, not size")
        learns = "min" in values
        size = int(values["min" if learns else "size"])
        maximum = int(values.get("max", "0"))
        if size < 0 or maximum < 0:
            raise ValueError(f"pool entry {entry.strip()!r}: sizes must not be negative")
        if "max" in values and maximum < size:
            raise ValueError(f"pool entry {entry.strip()!r}: max must be at least min")
        runtime = values.get("runtime", "")
        if runtime not in ("", "runc", "gvisor"):
            raise ValueError(f"pool entry {entry.strip()!r}: runtime must be runc or gvisor")
        resources = Resources(
            cpu_millis=int(values.get("cpu", "0")),
            memory_bytes=parse_size(values["memory"]) if "memory" in values else 0,
            disk_bytes=parse_size(values["disk"]) if "disk" in values else 0,
            max_processes=int(values.get("processes", "0")),
        )
        targets.append(
            PoolTarget(size, values.get("profile", ""), runtime, resources, learns, maximum)
        )
    return tuple(targets)
