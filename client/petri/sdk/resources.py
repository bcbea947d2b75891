"""Resource limits asked for at a sandbox's creation."""

from __future__ import annotations

from dataclasses import dataclass

from petri.v1 import sandbox_pb2

__all__ = ["Resources"]


@dataclass(frozen=True)
class Resources:
    """Limits for a new sandbox; None takes the server's default (its maxima apply).

    Attributes:
        cpus: CPU cores, e.g. 0.5 (only where the host delegates the cpu cgroup).
        memory_bytes: memory.
        disk_bytes: size of the writable /workspace.
        pids: processes and threads.
    """

    cpus: float | None = None
    memory_bytes: int | None = None
    disk_bytes: int | None = None
    pids: int | None = None

    def to_proto(self) -> sandbox_pb2.Resources:
        return sandbox_pb2.Resources(
            cpu_millis=round(self.cpus * 1000) if self.cpus is not None else 0,
            memory_bytes=self.memory_bytes or 0,
            disk_bytes=self.disk_bytes or 0,
            max_processes=self.pids or 0,
        )
