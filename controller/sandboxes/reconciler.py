"""The reconciler: makes the registry and podman agree, at start and while the service runs.

At start it adopts what a previous controller left: RUNNING sandboxes whose container runs
get a client again; anything half-done is finished (a deletion) or discarded (a create that
never answered, warm pool members, which may not match this controller's settings); containers
the registry does not know are removed. While the service runs, `check_containers` finds the
sandboxes whose container died underneath us. Such a sandbox comes back from its checkpoint
(PAUSED: its next execution resumes it) when it has one, and is TERMINATED, saying why, when it
has none: never silently gone.
"""

import structlog

from controller.records import SandboxRecord, State
from controller.runtime.container import ContainerRuntime, ContainerStatus
from controller.sandboxes.lifecycle import UNOWNED_STATES, Lifecycle
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.warm_pool import WarmPool
from controller.store.checkpoints import CheckpointStore
from controller.store.registry import Registry

log = structlog.get_logger()


def _gone(status: ContainerStatus | None) -> str:
    return "its container is gone" if status is None else f"its container {status.describe()}"


class Reconciler:
    def __init__(
        self,
        registry: Registry,
        containers: ContainerRuntime,
        provisioner: Provisioner,
        lifecycle: Lifecycle,
        pool: WarmPool,
        checkpoints: CheckpointStore,
    ) -> None:
        self._checkpoints = checkpoints
        self._registry = registry
        self._containers = containers
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._pool = pool

    def __repr__(self) -> str:
        return f"<Reconciler registry={self._provisioner.registry_label}>"

    async def adopt(self) -> None:
        """Takes over the sandboxes a previous controller of this registry left."""
        label = self._provisioner.registry_label
        records = await self._registry.list_live()
        containers = {c.name: c for c in await self._containers.list_managed(label)}
        for record in records:
            container = containers.pop(record.container_name, None)
            self._provisioner.adopt(record, container)
            try:
                await self._adopt_one(record, container)
            except Exception:  # one broken sandbox must not keep the service from starting
                log.exception("could not adopt a sandbox", sandbox=record.name)
        for orphan in containers.values():
            log.info("removing a container the registry does not know", container=orphan.name)
            await self._containers.remove(orphan.name)
        log.info("adopted sandboxes", count=self._provisioner.client_count)

    async def _adopt_one(self, record: SandboxRecord, container: ContainerStatus | None) -> None:
        if record.state in UNOWNED_STATES:
            # A warm pool member of the previous process (it may not match this one's
            # settings: preload, images; a new pool starts from nothing), or a sandbox whose
            # Create failed with the controller: it never existed for the caller.
            await self._lifecycle.discard(record, "found at controller start")
        elif record.state is State.DEPROVISIONING:
            await self._lifecycle.finish_deprovisioning(record, "deleted")
        elif record.state is State.RUNNING and (container is None or not container.running):
            await self._lost(record, f"found at controller start: {_gone(container)}")
        elif record.state is State.RUNNING:
            self._provisioner.client_for(record)
        elif record.state is State.PAUSED and container is not None:
            # Left by a crash during its pause or its resume: the checkpoint is the sandbox;
            # the container goes, with what it held (its socket directory, its worker uid).
            await self._provisioner.release(record)

    async def check_containers(self) -> None:
        """Marks TERMINATED the RUNNING sandboxes whose container died or vanished underneath
        us (killed from outside, OOM, the executor killed inside it, podman lost it), and
        discards such warm pool members."""
        watched = (State.RUNNING, State.POOLED)
        records = [r for r in await self._registry.list_live() if r.state in watched]
        if not records:
            return
        label = self._provisioner.registry_label
        containers = {c.name: c for c in await self._containers.list_managed(label)}
        for record in records:
            container = containers.get(record.container_name)
            if container is not None and container.running:
                continue
            if self._lifecycle.provisioning(record.uid) is not None:
                continue
            # Inspect for the reason (exit code, OOM), and to be sure it is not just starting.
            status = await self._containers.status(record.container_name)
            if status is not None and status.running:
                continue
            if record.state is State.POOLED:
                await self._pool.remove(record, f"it died: {_gone(status)}")
            else:
                await self._lost(record, _gone(status))

    async def _lost(self, record: SandboxRecord, why: str) -> None:
        """A RUNNING sandbox whose container is gone: back from its checkpoint (PAUSED) when
        it has one, else TERMINATED; `why` says what happened, and which."""
        checkpoint = record.checkpoint
        if checkpoint is not None and self._checkpoints.exists(record.uid):
            when = checkpoint.create_time.isoformat(timespec="seconds")
            await self._lifecycle.recover(
                record,
                f"{why}; it resumes from its checkpoint of {when} on first use (what changed "
                "after that is lost)",
            )
        else:
            await self._lifecycle.terminate(record, f"{why}, and it had no checkpoint")
