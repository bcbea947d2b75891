"""What the controller knows about a sandbox, independent of the wire format."""

import enum
from dataclasses import dataclass, field
from datetime import datetime

# The project of warm pool members (no project name can be empty): invisible to List, counted
# toward no quota, until a CreateSandbox claims one for its project.
POOL_PROJECT = ""


class State(enum.IntEnum):
    """Where a sandbox is in its lifecycle (docs/lifecycle.md has the diagram). The first four
    mirror petri.v1.Sandbox.State, value for value; the others are never shown to a caller."""

    PROVISIONING = 1
    RUNNING = 2
    DEPROVISIONING = 3
    TERMINATED = 4
    # A warm pool member being started: no project yet, counted toward no quota.
    WARMING = 5
    # A warm pool member started and preloaded, waiting for a CreateSandbox to claim it.
    POOLED = 6
    # A tombstone: the sandbox is gone; the row says when and why until it is purged.
    DELETED = 7


# The states a caller may see and filter by; the others are the controller's own.
PUBLIC_STATES = (State.PROVISIONING, State.RUNNING, State.DEPROVISIONING, State.TERMINATED)


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

    @property
    def name(self) -> str:
        return f"projects/{self.project}/sandboxes/{self.sandbox_id}"
