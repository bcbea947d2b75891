"""What the controller knows about a sandbox, independent of the wire format."""

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta

# The project of warm pool members (no project name can be empty): invisible to List, counted
# toward no quota, until a CreateSandbox claims one for its project.
POOL_PROJECT = ""


def _given_up_prefix(node: str) -> str:
    return f"node {node} stopped answering at "


def given_up_message(node: str, last_seen: str) -> str:
    """The state_message of a sandbox whose node stopped heartbeating (controller.store.nodes)."""
    return f"{_given_up_prefix(node)}{last_seen}; its sandbox's process is gone"


class State(enum.IntEnum):
    """Where a sandbox is in its lifecycle (docs/lifecycle.md has the diagram). The first five
    mirror petri.v1.Sandbox.State, value for value; the others are never shown to a caller."""

    PROVISIONING = 1
    RUNNING = 2
    DEPROVISIONING = 3
    TERMINATED = 4
    # Saved to disk (its checkpoint) with no container: the next execution resumes it.
    PAUSED = 5
    # A warm pool member being started: no project yet, counted toward no quota.
    WARMING = 8
    # A warm pool member started and preloaded, waiting for a CreateSandbox to claim it.
    POOLED = 9
    # A tombstone: the sandbox is gone; the row says when and why until it is purged.
    DELETED = 10


# The states a caller may see and filter by; the others are the controller's own.
PUBLIC_STATES = (
    State.PROVISIONING,
    State.RUNNING,
    State.DEPROVISIONING,
    State.TERMINATED,
    State.PAUSED,
)


class Runtime(enum.IntEnum):
    """Mirrors petri.v1.SandboxSpec.Runtime."""

    RUNC = 1
    GVISOR = 2


@dataclass(frozen=True)
class Resources:
    """Limits in force for a sandbox; 0 means not enforced on this host."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0
    max_processes: int = 0


@dataclass(frozen=True)
class Spec:
    image_profile: str
    runtime: Runtime
    resources: Resources


@dataclass(frozen=True)
class LostName:
    """A global of the namespace that a checkpoint or a restore could not keep, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class CheckpointInfo:
    """A sandbox's latest checkpoint on disk (controller.store.checkpoints holds the bytes)."""

    create_time: datetime
    size_bytes: int
    # The globals it could not save.
    lost: tuple[LostName, ...] = ()
    # The execution count it saved.
    execution_count: int = 0


@dataclass
class SandboxRecord:
    uid: str
    project: str
    sandbox_id: str
    spec: Spec
    state: State
    create_time: datetime
    update_time: datetime
    expire_time: datetime
    last_active_time: datetime
    display_name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    state_message: str = ""
    execution_count: int = 0
    incarnation: str = ""
    request_id: str | None = None
    # The Create that request_id names (JSON of its fields), to tell a retry from a reuse.
    create_request: str | None = None
    container_name: str = ""
    # Host directory of the executor's socket, fixed when the container was created.
    socket_dir: str = ""
    # Tombstone: set when the sandbox is gone; the row stays so that Get can say when and why.
    delete_time: datetime | None = None
    delete_reason: str = ""
    # Pause after this long without an execution; zero: never.
    auto_pause_after: timedelta = timedelta(0)
    checkpoint: CheckpointInfo | None = None
    # After a resume, what the next execution's response reports (namespace_restored, with
    # the names not restored); None when there is nothing to report.
    restore_report: tuple[LostName, ...] | None = None
    # The node whose host holds its container, among controllers sharing one registry; ""
    # for a controller with a registry of its own (role single).
    node: str = ""

    @property
    def name(self) -> str:
        return f"projects/{self.project}/sandboxes/{self.sandbox_id}"

    @property
    def given_up(self) -> bool:
        """TERMINATED by another node because its own stopped heartbeating: whatever of it
        is still on its host (a container) is to be removed when that node comes back."""
        return (
            self.state is State.TERMINATED
            and self.node != ""
            and self.state_message.startswith(_given_up_prefix(self.node))
        )
