"""The container runtime, as the controller needs it: a small protocol with podman behind it."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

# Labels on every container the controller creates, so it can find its own.
LABEL_MANAGED = "io.petri.managed"
LABEL_REGISTRY = "io.petri.registry"  # which registry (controller instance) owns it
# The sandbox's uid (its Sandbox.uid), not its name: a warm pool member gets its name when a
# CreateSandbox claims it, and a container's labels cannot change.
LABEL_UID = "io.petri.uid"
# The uid user code runs as in the sandbox (controller.sandboxes.worker_uids), for a restarted
# controller.
LABEL_WORKER_UID = "io.petri.worker-uid"
# The secret the sandbox's executor wants with every call, for a restarted controller: labels
# are not visible inside the container.
LABEL_EXECUTOR_KEY = "io.petri.executor-key"

# Inside the container: where the socket directory is mounted, and the executor's socket.
CONTAINER_SOCKET_DIR = "/run/petri"
SOCKET_NAME = "executor.sock"
# In the socket directory before the container starts: the executor's key, readable by the
# sandbox's root only (0600, and the directory is given to it); the executor reads and removes it.
KEY_FILE_NAME = "executor.key"


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    image: str
    labels: dict[str, str]
    socket_dir: Path  # host directory mounted at CONTAINER_SOCKET_DIR
    workspace_bytes: int
    tmp_bytes: int
    open_files: int
    # /dev/shm (POSIX shared memory and semaphores: multiprocessing's locks and queues).
    shm_bytes: int = 64 << 20
    # The user namespace: container uids 0..userns_size-1 on the service user's subordinate
    # ids from the first; 0 for the service's own (gVisor: its gofer opens the socket
    # directory on the host as the service user). The same for every sandbox, so all share
    # one ID-mapped copy of an image (rootless overlay cannot map ids at mount time).
    userns_size: int = 65536
    memory_bytes: int = 0  # 0: not limited by the runtime
    cpu_millis: int = 0
    max_processes: int = 0
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerStatus:
    name: str
    running: bool
    exit_code: int | None
    oom_killed: bool
    labels: dict[str, str]
    error: str = ""

    def describe(self) -> str:
        if self.running:
            return "is running"
        if self.oom_killed:
            return "was killed for using too much memory"
        if self.exit_code is not None and self.exit_code > 128:
            return f"was killed by signal {self.exit_code - 128}"
        text = f"exited with status {self.exit_code}"
        return f"{text}: {self.error}" if self.error else text


# The container events that may mean a container stopped running: what the watcher asks for.
WATCHED_EVENTS = ("died", "oom", "remove")


@dataclass(frozen=True)
class ContainerEvent:
    """One of WATCHED_EVENTS, of the container `name`."""

    name: str
    action: str


class ContainerEvents(Protocol):
    """A subscription to container events: iterate it; the iteration ends (or raises
    Unavailable) when the stream breaks, e.g. the podman service restarted."""

    def __aiter__(self) -> Self: ...

    async def __anext__(self) -> ContainerEvent: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class HostCapabilities:
    """What the host's cgroups let the runtime enforce for a rootless container."""

    cgroup_version: str
    memory: bool
    cpu: bool
    pids: bool


@dataclass(frozen=True)
class ImageInfo:
    tag: str
    labels: dict[str, str]
    size_bytes: int
    created: float  # seconds since the epoch


class ContainerRuntime(Protocol):
    async def check(self) -> HostCapabilities:
        """Answers when the runtime is reachable; raises Unavailable otherwise."""
        ...

    async def image_exists(self, image: str) -> bool: ...

    async def list_images(self, repository: str) -> list[ImageInfo]:
        """The tagged images of a repository (e.g. localhost/petri-sandbox)."""
        ...

    async def start(self, spec: ContainerSpec) -> None:
        """Creates and starts a container; raises Unavailable or FailedPrecondition."""
        ...

    async def status(self, name: str) -> ContainerStatus | None:
        """The container's status, None when it does not exist."""
        ...

    async def remove(self, name: str) -> None:
        """Kills and removes a container; a missing one is not an error."""
        ...

    async def list_managed(self, registry_label: str | None) -> list[ContainerStatus]:
        """The containers of one registry, or of every registry (None) on this podman."""
        ...

    async def events(self, registry_label: str) -> ContainerEvents:
        """Subscribes to the WATCHED_EVENTS of one registry's containers; returns once
        subscribed, so that nothing after the return is missed. Raises Unavailable."""
        ...

    async def logs_tail(self, name: str, lines: int) -> str: ...

    async def close(self) -> None: ...
