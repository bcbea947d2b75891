"""The sandbox manager: the domain's façade, which the API layer and the reaper call.

It creates, finds, updates, deletes and expires sandboxes and runs code in them, by handing
each call to the noun that owns it:

    specs        the policy: effective spec and resources, expiry, timeouts
    images       the image catalogue
    provisioner  containers, sockets, executor keys and clients, worker uids
    lifecycle    every state transition (docs/lifecycle.md)
    creation     CreateSandbox: request_id replays, the warm pool, or a new container
    warm_pool    the whole pool
    execution    each sandbox's queue of executions, their deadlines and bookkeeping
    reconciler   adoption at start, containers that died
    lookup       a sandbox by name, and what became of one that is gone
    hibernation  pause, resume, and the idle sandboxes' checkpoints
    moves        a draining node's sandboxes moved to other nodes, and taken over there
    queues       each sandbox's executions, pauses and checkpoints, one at a time
    files        the files API outside executions, in the same queue
"""

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta

from controller.clock import utcnow
from controller.config import Config
from controller.metrics import Metrics
from controller.names import SandboxName
from controller.records import SandboxRecord, Spec
from controller.runtime.container import ContainerRuntime, HostCapabilities
from controller.sandboxes.creation import Creation
from controller.sandboxes.execution import Executions
from controller.sandboxes.files import Files
from controller.sandboxes.hibernation import Hibernation
from controller.sandboxes.images import ImageCatalogue, ImageProfile
from controller.sandboxes.labels import validate_display_name, validate_labels
from controller.sandboxes.lifecycle import POOL_STATES, Lifecycle
from controller.sandboxes.lookup import Lookup, check_held
from controller.sandboxes.moves import MoveLedger, Mover, NodeBook, Transfer
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.queues import Queues
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.reconciler import Reconciler
from controller.sandboxes.specs import CreateParams, SpecPolicy, UpdateParams
from controller.sandboxes.warm_pool import WarmPool
from controller.store.checkpoints import CheckpointStore
from controller.store.registry import ListQuery, Registry
from petri.v1 import execution_pb2, executor_pb2, files_pb2

__all__ = ["CreateParams", "ImageProfile", "SandboxManager", "UpdateParams", "utcnow"]


class SandboxManager:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        containers: ContainerRuntime,
        quotas: Quotas,
        clock: Callable[[], datetime] = utcnow,
        gvisor_containers: ContainerRuntime | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`containers` runs every sandbox's container; `gvisor_containers`, when gVisor is
        installed, creates those of GVISOR sandboxes (everything else about them goes through
        `containers`, which shares the same podman storage)."""
        self._registry = registry
        self._containers = containers
        self._clock = clock
        # Recorded into whether or not they are served: cheaper than asking each time.
        self.metrics = metrics or Metrics()
        self._policy = SpecPolicy(config, gvisor_available=gvisor_containers is not None)
        self._images = ImageCatalogue(config, containers)
        self._provisioner = Provisioner(config, containers, gvisor_containers, self._policy)
        self._checkpoints = CheckpointStore(config.checkpoint_path)
        self._lifecycle = Lifecycle(registry, self._provisioner, quotas, clock, self._checkpoints)
        self._queues = Queues()
        self._lookup = Lookup(registry, config.node_name if config.role == "node" else "")
        self._pool = WarmPool(
            config,
            registry,
            self._policy,
            self._images,
            self._provisioner,
            self._lifecycle,
            quotas,
            clock,
            self.metrics,
        )
        # The server's starts at once, and those waiting for one (read by tests and metrics).
        self.create_slots = quotas.create_slots
        self.metrics.watch_create_queue(lambda: self.create_slots.waiting)
        self._creation = Creation(
            registry,
            self._policy,
            self._images,
            self._provisioner,
            self._lifecycle,
            self._pool,
            quotas,
            clock,
            self.metrics,
        )
        self._hibernation = Hibernation(
            config,
            registry,
            containers,
            self._images,
            self._checkpoints,
            self._provisioner,
            self._lifecycle,
            self._pool,
            self._lookup,
            self._queues,
            quotas,
            clock,
            self.metrics,
        )
        self._executions = Executions(
            config,
            registry,
            containers,
            self._policy,
            self._provisioner,
            self._lifecycle,
            self._lookup,
            quotas,
            clock,
            self._queues,
            self._hibernation,
            self.metrics,
        )
        self._files = Files(
            config,
            registry,
            containers,
            self._provisioner,
            self._lifecycle,
            self._lookup,
            self._queues,
            self._hibernation,
            clock,
        )
        self._mover = Mover(
            config,
            registry,
            self._checkpoints,
            self._hibernation,
            self._queues,
            self._pool,
            clock,
            self._check_runnable,
            self._provisioner,
        )
        self._reconciler = Reconciler(
            registry, containers, self._provisioner, self._lifecycle, self._pool, self._checkpoints
        )
        # Tells this controller's containers from those of another registry on the same podman.
        self.registry_label = self._provisioner.registry_label

    def __repr__(self) -> str:
        return f"<SandboxManager {self._provisioner!r} {self._pool!r}>"

    @property
    def host(self) -> HostCapabilities:
        return self._policy.host

    @property
    def warm_pool(self) -> WarmPool:
        return self._pool

    # --- startup and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        """Checks the container runtime, adopts the sandboxes that survived a controller
        restart, and starts filling the warm pool."""
        self._policy.host = await self._containers.check()
        self._provisioner.open()
        self._checkpoints.open()
        await self._reconciler.adopt()
        await self._provisioner.reconcile_worker_uids()
        self._reconciler.start_watching()
        self._pool.start()

    async def pause_all(self, within: float) -> None:
        """Pauses every RUNNING sandbox, for at most `within` seconds (at shutdown)."""
        await self._hibernation.pause_all(within)

    async def hibernate_idle(self) -> None:
        """Auto-pauses and idle checkpoints: one round (the reaper's call)."""
        await self._hibernation.hibernate_idle()

    async def close(self) -> None:
        """Stops the background checks and discards the warm pool; every other sandbox
        outlives the controller (paused by pause_all, or running for the next one to
        adopt)."""
        await self._mover.stop()
        await self._reconciler.stop_watching()
        await self._hibernation.stop_background()
        await self._executions.close()
        await self._pool.close()
        await self._provisioner.close()

    # --- a node's drain (role node) ---------------------------------------------------------

    def connect_moves(self, ledger: MoveLedger, nodes: NodeBook, transfer: Transfer) -> None:
        """Lets this node move its sandboxes to other nodes, and take theirs over."""
        self._mover.connect(ledger, nodes, transfer)

    async def stop_moves(self) -> None:
        """At shutdown: no more moves start; the one under way finishes."""
        await self._mover.stop()

    def set_draining(self, draining: bool) -> None:
        """What the node's heartbeat read of its `draining` (see Mover.set_draining)."""
        self._mover.set_draining(draining)

    async def receive_move(
        self, uid: str, name: str, token: str, data: AsyncIterator[bytes]
    ) -> None:
        """Takes over a sandbox another node moves here (see Mover.receive)."""
        await self._mover.receive(uid, name, token, data)

    async def _check_runnable(self, spec: Spec) -> None:
        """That this node can run a sandbox of `spec` that another node made."""
        self._policy.check_runnable(spec)
        await self._images.require(spec.image_profile)

    async def check_containers(self) -> None:
        await self._reconciler.check_containers()

    # --- the resource ---------------------------------------------------------------------

    async def create(self, params: CreateParams) -> SandboxRecord:
        return await self._creation.create(params)

    async def get(self, name: SandboxName) -> SandboxRecord:
        return await self._lookup.get(name)

    async def list_page(self, query: ListQuery) -> list[SandboxRecord]:
        return await self._registry.list_page(query)

    async def update(self, name: SandboxName, params: UpdateParams) -> SandboxRecord:
        record = await self._lookup.get(name)
        now = self._clock()
        fields: dict[str, object] = {"update_time": now}
        if params.display_name is not None:
            fields["display_name"] = validate_display_name(params.display_name)
        if params.labels is not None:
            fields["labels"] = validate_labels(params.labels)
        if params.expire_time is not None or params.ttl is not None:
            fields["expire_time"] = self._policy.expiry(now, params.expire_time, params.ttl)
        if params.auto_pause_after is not None:
            fields["auto_pause_after"] = self._policy.auto_pause_after(params.auto_pause_after)
        if not await self._registry.set_fields(record.uid, **fields):
            raise await self._lookup.not_found(name)  # deleted meanwhile
        return await self._lookup.get(name)

    async def delete(self, name: SandboxName, allow_missing: bool) -> None:
        """DeleteSandbox: after its creation ends if it is being created (that may fail)."""
        record = await self._registry.get_live(name.project, name.sandbox_id)
        pending = self._lifecycle.provisioning(record.uid) if record is not None else None
        if pending is not None:
            with contextlib.suppress(Exception):  # failed: the lookup below finds nothing
                await asyncio.shield(pending)
            record = await self._registry.get_live(name.project, name.sandbox_id)
        if record is None:
            if allow_missing:
                return
            raise await self._lookup.not_found(name)
        if not record.given_up:  # one given up has nothing left on its node: any may end it
            check_held(record, self._lookup.node)
        if not await asyncio.shield(asyncio.ensure_future(self._end(record, "deleted"))):
            # Deleted meanwhile (done), or moved to another node by a drain: that node ends it.
            current = await self._registry.get_live(name.project, name.sandbox_id)
            if current is not None and current.uid == record.uid:
                check_held(current, record.node)

    async def expire(self, record: SandboxRecord) -> None:
        """Ends a sandbox whose time is up (the reaper's call): its tombstone says so; a warm
        pool member is discarded and the pool starts a fresh one."""
        if self._lifecycle.provisioning(record.uid) is not None:
            return  # its Create is still running; the next round takes it
        if record.state in POOL_STATES:
            await self._pool.remove(record, "expired")
            return
        await asyncio.shield(asyncio.ensure_future(self._end(record, "expired")))

    async def _end(self, record: SandboxRecord, reason: str) -> bool:
        if not await self._lifecycle.deprovision(record, reason):
            return False
        self._queues.forget(record.uid)
        return True

    async def pause(self, name: SandboxName) -> SandboxRecord:
        return await self._hibernation.pause(name)

    async def resume(self, name: SandboxName) -> SandboxRecord:
        return await self._hibernation.resume(name)

    # --- running code and policy -----------------------------------------------------------

    def execute(
        self,
        name: SandboxName,
        code: str,
        timeout: timedelta | None,
        inputs: AsyncIterator[execution_pb2.FileChunk] | None = None,
    ) -> AsyncGenerator[executor_pb2.ExecuteEvent, None]:
        """ExecuteCode: see Executions.execute."""
        return self._executions.execute(name, code, timeout, inputs)

    # --- files outside executions (see Files) ---------------------------------------------

    async def list_files(
        self, name: SandboxName, request: files_pb2.ListFilesRequest
    ) -> files_pb2.ListFilesResponse:
        return await self._files.list(name, request)

    async def read_file(
        self,
        name: SandboxName,
        path: str,
        send: Callable[[execution_pb2.FileChunk], Awaitable[None]],
    ) -> None:
        await self._files.read(name, path, send)

    async def write_file(
        self, name: SandboxName, path: str, chunks: AsyncIterator[execution_pb2.FileChunk]
    ) -> files_pb2.FileInfo:
        return await self._files.write(name, path, chunks)

    async def delete_file(self, name: SandboxName, request: files_pb2.DeleteFileRequest) -> None:
        await self._files.delete(name, request)

    def auto_pause_after(self, requested: timedelta | None) -> timedelta:
        """A sandbox's auto_pause_after: the server's default for None; InvalidArgument
        beyond the bounds."""
        return self._policy.auto_pause_after(requested)

    def execution_timeout(self, requested: timedelta | None) -> timedelta:
        return self._policy.execution_timeout(requested)

    def expiry(
        self, now: datetime, expire_time: datetime | None, ttl: timedelta | None
    ) -> datetime:
        """The expire_time for a create or an update; InvalidArgument beyond the maximum."""
        return self._policy.expiry(now, expire_time, ttl)

    async def image_profiles(self) -> list[ImageProfile]:
        """The profiles built on this server, with their manifests (the images' labels)."""
        return await self._images.profiles()
