"""Warm pool targets: how many sandboxes of which kind to keep ready (--warm-pool)."""

from dataclasses import dataclass

from controller.records import Resources
from controller.units import parse_size


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
