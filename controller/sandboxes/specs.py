"""Spec policy: what a request may ask for on this server, and what it gets.

Pure rules over the config and the host's capabilities: no registry, no containers, no clock
of its own. The effective spec of a create is also the warm pool's key, so a create and a pool
target that ask for the same thing land on the same Spec.
"""

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from controller.config import Config
from controller.errors import FailedPrecondition, InvalidArgument
from controller.quoting import quote
from controller.records import Resources, Runtime, Spec
from controller.runtime.container import HostCapabilities
from controller.units import format_duration

_PROFILE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# The least of each resource a sandbox may ask for (memory: Config.min_memory): below these,
# the executor, its worker and the preloaded interpreter cannot start or do nothing useful.
MIN_CPU_MILLIS = 100
MIN_DISK_BYTES = 16 << 20
MIN_PROCESSES = 32


@dataclass(frozen=True)
class CreateParams:
    project: str
    sandbox_id: str
    display_name: str
    labels: dict[str, str]
    image_profile: str
    runtime: Runtime | None
    resources: Resources
    expire_time: datetime | None
    ttl: timedelta | None
    request_id: str
    # None: the server's default.
    auto_pause_after: timedelta | None = None
    # When the caller stops waiting, on the event loop's clock (loop.time()); None: never.
    # A create waiting for a slot past it fails, leaving nothing behind.
    deadline: float | None = None


@dataclass(frozen=True)
class UpdateParams:
    display_name: str | None = None
    labels: dict[str, str] | None = None
    expire_time: datetime | None = None
    ttl: timedelta | None = None
    auto_pause_after: timedelta | None = None


def create_request_json(params: CreateParams) -> str:
    """The fields of a Create that a retry with its request_id must repeat, as JSON."""
    resources = params.resources
    fields: dict[str, object] = {
        "sandbox_id": params.sandbox_id,
        "sandbox.display_name": params.display_name,
        "sandbox.labels": dict(sorted(params.labels.items())),
        "sandbox.spec.image_profile": params.image_profile,
        "sandbox.spec.runtime": params.runtime.name if params.runtime else "",
        "sandbox.spec.resources.cpu_millis": resources.cpu_millis,
        "sandbox.spec.resources.memory_bytes": resources.memory_bytes,
        "sandbox.spec.resources.disk_bytes": resources.disk_bytes,
        "sandbox.spec.resources.max_processes": resources.max_processes,
        "sandbox.ttl": params.ttl.total_seconds() if params.ttl is not None else None,
        "sandbox.expire_time": params.expire_time.isoformat() if params.expire_time else None,
        "sandbox.auto_pause_after": (
            params.auto_pause_after.total_seconds() if params.auto_pause_after is not None else None
        ),
    }
    return json.dumps(fields, sort_keys=True)


def differing_fields(first: str, retry: str) -> list[str]:
    """The fields in which two create_request_json values differ."""
    before, after = json.loads(first), json.loads(retry)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


class SpecPolicy:
    """The server's rules for specs, expiry and execution timeouts.

    `host` is what the host's cgroups enforce; it is known once the container runtime has
    been checked (SandboxManager.start), and `gvisor_available` whether gVisor sandboxes can
    be created at all.
    """

    def __init__(self, config: Config, gvisor_available: bool) -> None:
        self._config = config
        self._gvisor_available = gvisor_available
        self.host = HostCapabilities("unknown", memory=False, cpu=False, pids=False)

    def __repr__(self) -> str:
        return f"<SpecPolicy cgroups={self.host.cgroup_version} gvisor={self._gvisor_available}>"

    def profile_and_runtime(
        self, image_profile: str, runtime: Runtime | None
    ) -> tuple[str, Runtime]:
        """The image profile and the runtime a create gets: the server's defaults where it
        asked for none. Whether the profile's image exists is the image catalogue's to say."""
        profile = image_profile or self._config.default_image_profile
        if _PROFILE.fullmatch(profile) is None:
            raise InvalidArgument(
                f"invalid image_profile {quote(profile)}: lowercase letters, digits, '.', '_', '-'"
            )
        default = Runtime.GVISOR if self._config.default_runtime == "gvisor" else Runtime.RUNC
        chosen = runtime or default
        if chosen is Runtime.GVISOR and not self._gvisor_available:
            raise FailedPrecondition(
                "runtime GVISOR is not available on this server (gVisor's runsc is not "
                "installed); use RUNC or leave it unset"
            )
        return profile, chosen

    def check_runnable(self, spec: Spec) -> None:
        """That this server can run a sandbox of `spec` that another made (a drain moving it
        here): its runtime is available and its resources within this server's limits; the
        error that says why otherwise."""
        self.profile_and_runtime(spec.image_profile, spec.runtime)
        self.effective_resources(spec.resources, spec.runtime)

    def auto_pause_after(self, requested: timedelta | None) -> timedelta:
        """A sandbox's auto_pause_after: the server's default when unset; 0 (never) or a
        positive duration up to the maximum."""
        if requested is None:
            return self._config.default_auto_pause_after
        longest = self._config.max_auto_pause_after
        if requested < timedelta(0) or requested > longest:
            raise InvalidArgument(
                f"auto_pause_after must be 0s (never) or positive and at most "
                f"{format_duration(longest)} (got {format_duration(requested)})"
            )
        return requested

    def cgroups_for(self, runtime: Runtime) -> HostCapabilities:
        """What cgroups enforce for a sandbox of this runtime: runsc runs with
        --ignore-cgroups, so a gVisor sandbox gets none, whatever the host delegates."""
        if runtime is Runtime.GVISOR:
            return HostCapabilities(self.host.cgroup_version, memory=False, cpu=False, pids=False)
        return self.host

    def effective_resources(self, requested: Resources, runtime: Runtime) -> Resources:
        cgroups = self.cgroups_for(runtime)
        minimums = {
            "cpu_millis": MIN_CPU_MILLIS,
            "memory_bytes": self._config.min_memory,
            "disk_bytes": MIN_DISK_BYTES,
            "max_processes": MIN_PROCESSES,
        }
        for field_name, minimum in minimums.items():
            asked = getattr(requested, field_name)
            if asked < 0:
                raise InvalidArgument(f"resources.{field_name} must not be negative")
            if 0 < asked < minimum:
                raise InvalidArgument(
                    f"resources.{field_name} {asked} is below this server's minimum {minimum}: "
                    "ask for at least that much, or leave it unset for the default"
                )
        unenforceable = [
            name
            for name, asked, can in (("cpu_millis", requested.cpu_millis, cgroups.cpu),)
            if asked and not can
        ]
        if unenforceable:
            raise FailedPrecondition(
                f"this server cannot enforce resources.{', resources.'.join(unenforceable)} "
                f"for a {runtime.name} sandbox (no delegated cgroup controller: rootless "
                f"podman on cgroups {self.host.cgroup_version}, or gVisor, which runs without "
                "cgroups); leave them unset"
            )
        disk = requested.disk_bytes or self._config.workspace_size
        if disk > self._config.workspace_size:
            raise InvalidArgument(
                f"resources.disk_bytes {disk} exceeds this server's maximum "
                f"{self._config.workspace_size}"
            )
        memory = requested.memory_bytes or self._config.default_memory
        if memory > self._config.max_memory:
            raise InvalidArgument(
                f"resources.memory_bytes {memory} exceeds this server's maximum "
                f"{self._config.max_memory}"
            )
        processes = requested.max_processes or self._config.default_max_processes
        if processes > self._config.max_processes:
            raise InvalidArgument(
                f"resources.max_processes {processes} exceeds this server's maximum "
                f"{self._config.max_processes}"
            )
        return replace(requested, disk_bytes=disk, max_processes=processes, memory_bytes=memory)

    def expiry(
        self, now: datetime, expire_time: datetime | None, ttl: timedelta | None
    ) -> datetime:
        """The expire_time for a create or an update; InvalidArgument beyond the maximum."""
        maximum = self._config.max_ttl
        if ttl is not None:
            if ttl <= timedelta(0):
                raise InvalidArgument("ttl must be positive")
            if ttl > maximum:
                raise InvalidArgument(
                    f"ttl {format_duration(ttl)} exceeds the maximum of {format_duration(maximum)}"
                )
            return now + ttl
        if expire_time is not None:
            if expire_time <= now:
                raise InvalidArgument(f"expire_time {expire_time.isoformat()} is not in the future")
            if expire_time > now + maximum:
                raise InvalidArgument(
                    f"expire_time {expire_time.isoformat()} is more than the maximum of "
                    f"{format_duration(maximum)} from now"
                )
            return expire_time
        return now + self._config.default_ttl

    def execution_timeout(self, requested: timedelta | None) -> timedelta:
        if requested is None:
            return self._config.default_timeout
        if requested <= timedelta(0):
            raise InvalidArgument("timeout must be positive (or unset for the server default)")
        if requested > self._config.max_timeout:
            raise InvalidArgument(
                f"timeout {format_duration(requested)} exceeds the maximum of "
                f"{format_duration(self._config.max_timeout)}"
            )
        return requested

    def check_code(self, code: str) -> None:
        if not code:
            raise InvalidArgument("code is empty: send the Python source to run")
        if len(code.encode()) > self._config.max_code_bytes:
            raise InvalidArgument(
                f"code is {len(code.encode())} bytes, more than this server's maximum of "
                f"{self._config.max_code_bytes}"
            )
