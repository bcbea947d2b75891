"""Hibernation: a sandbox saved to disk and brought back, its state outliving its process.

A checkpoint is the executor's: the interpreter's namespace (serialised by the sandbox's own
worker) and its files (archived by user code's uid), streamed in chunks to one file per
sandbox (controller.store.checkpoints); the controller moves those bytes and never reads them.

    pause       save, then RUNNING -> PAUSED: the container goes, the sandbox costs no memory
    resume      PAUSED -> RUNNING: into a warm pool member of its spec when one is ready (a
                claim and a restore), else a new container; a new interpreter (incarnation)
    checkpoint  save a RUNNING sandbox that has been idle a while, so that it comes back from
                its checkpoint if its container is lost (a crash, a reboot)

Each step runs in the sandbox's queue (controller.sandboxes.queues): after the executions sent
before it. A failed save leaves the sandbox RUNNING and untouched; a failed resume leaves it
PAUSED, unless its checkpoint cannot be restored at all (then TERMINATED, saying why).
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta

import structlog

from controller.config import Config
from controller.errors import (
    ExecutorFailed,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from controller.metrics import Metrics
from controller.names import SandboxName
from controller.records import CheckpointInfo, LostName, SandboxRecord, State
from controller.runtime.container import ContainerRuntime
from controller.sandboxes.images import ImageCatalogue
from controller.sandboxes.lifecycle import Lifecycle
from controller.sandboxes.lookup import Lookup, terminated_reason
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.queues import Queues
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.shielding import shielded
from controller.sandboxes.warm_pool import WarmPool
from controller.store.checkpoints import (
    CheckpointIncomplete,
    CheckpointStore,
    CheckpointUnreadable,
)
from controller.store.registry import Registry
from controller.units import format_duration
from petri.v1 import execution_pb2

log = structlog.get_logger()

# Beyond the namespace limit and the workspace's size: the archive's headers and the framing.
CHECKPOINT_SLACK_BYTES = 64 << 20
# At most this many lost names are kept with a checkpoint (the rest are counted in one more).
MAX_LOST_KEPT = 100
MAX_LOST_TEXT = 300
# Background saves (idle checkpoints, auto-pauses) at once: they must not starve executions.
CONCURRENT_SAVES = 2
# Sandboxes taken per background round; the rest wait for the next round.
ROUND_BATCH = 100
# A sandbox whose background save failed (a file it cannot read...) is not tried again until
# it has run code since, or this long: each try pickles its whole namespace, and it must not
# take the round's places from the sandboxes that can be saved.
BACKGROUND_RETRY_AFTER = timedelta(minutes=10)


def lost_names(lost: tuple[LostName, ...]) -> list[execution_pb2.LostName]:
    return [execution_pb2.LostName(name=entry.name, reason=entry.reason) for entry in lost]


def _kept(lost: "list[execution_pb2.LostName]") -> tuple[LostName, ...]:
    """The executor's list, bounded: its words are the sandbox's."""
    kept = [LostName(e.name[:MAX_LOST_TEXT], e.reason[:MAX_LOST_TEXT]) for e in lost]
    if len(kept) > MAX_LOST_KEPT:
        more = len(kept) - MAX_LOST_KEPT + 1
        kept = [*kept[: MAX_LOST_KEPT - 1], LostName("...", f"and {more} more names not kept")]
    return tuple(kept)


class Hibernation:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        containers: ContainerRuntime,
        images: ImageCatalogue,
        checkpoints: CheckpointStore,
        provisioner: Provisioner,
        lifecycle: Lifecycle,
        pool: WarmPool,
        lookup: Lookup,
        queues: Queues,
        quotas: Quotas,
        clock: Callable[[], datetime],
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._registry = registry
        self._containers = containers
        self._images = images
        self._checkpoints = checkpoints
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._pool = pool
        self._lookup = lookup
        self._queues = queues
        self._quotas = quotas
        self._clock = clock
        self._metrics = metrics
        # Resumes under way, by sandbox uid: a caller that left does not stop one, and the
        # next caller waits for it rather than starting another.
        self._resuming: dict[str, asyncio.Future[SandboxRecord]] = {}
        self._saves = asyncio.Semaphore(CONCURRENT_SAVES)
        # Failed background saves, by uid: the sandbox's last_active_time then, and when to
        # try again regardless.
        self._failed_saves: dict[str, tuple[datetime, datetime]] = {}
        # Background saves started and not ended, by uid: a round starts them and does not
        # wait for them (one slow save must not hold up every other sandbox's).
        self._background: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<Hibernation {self._checkpoints!r} resuming={len(self._resuming)}>"

    # --- the API's calls ------------------------------------------------------------------

    async def pause(self, name: SandboxName) -> SandboxRecord:
        """PauseSandbox: after the executions queued before it."""
        record = await self._lookup.held(name)
        async with self._queues.of(record.uid):
            record = await self._lookup.held(name)  # moved to another node while it waited?
            if record.state is State.RUNNING:
                await self.pause_queued(record)
            elif record.state is not State.PAUSED:
                raise _not_running(record, "paused")
        return await self._lookup.get(name)

    async def resume(self, name: SandboxName) -> SandboxRecord:
        """ResumeSandbox: after the executions queued before it."""
        record = await self._lookup.held(name)
        async with self._queues.of(record.uid):
            record = await self._lookup.held(name)  # moved to another node while it waited?
            if record.state is State.PAUSED:
                await self.resume_queued(record)
            elif record.state is not State.RUNNING:
                raise _not_running(record, "resumed")
        return await self._lookup.get(name)

    # --- in the sandbox's queue ------------------------------------------------------------

    async def pause_queued(self, record: SandboxRecord) -> None:
        """Pauses the RUNNING sandbox `record` (the caller holds its queue)."""
        with self._metrics.timing(self._metrics.pauses, self._metrics.pause_seconds):
            checkpoint = await self._save(record)
            if not await shielded(self._lifecycle.pause(record, checkpoint)):
                await shielded(self._drop_if_deleted(record))
                raise FailedPrecondition(
                    f"sandbox {record.name} was deleted or terminated meanwhile"
                )

    async def _drop_if_deleted(self, record: SandboxRecord) -> None:
        """After a save that ended once its sandbox was being deleted: the delete removed the
        checkpoint before this one was written, so this one goes too (never kept for ever)."""
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.uid != record.uid or current.state is State.DEPROVISIONING:
            await self._checkpoints.remove(record.uid)

    def resume_under_way(self, uid: str) -> "asyncio.Future[SandboxRecord] | None":
        """The resume of sandbox `uid` running on after its caller left, if any."""
        return self._resuming.get(uid)

    def resume_queued(self, record: SandboxRecord) -> "asyncio.Future[SandboxRecord]":
        """Resumes the PAUSED sandbox `record` (the caller holds its queue); the future runs
        on if the caller leaves, and a resume already under way is joined, not repeated."""
        future = self._resuming.get(record.uid)
        if future is None:
            future = asyncio.ensure_future(self._resume(record))
            self._resuming[record.uid] = future
            future.add_done_callback(lambda _: self._resuming.pop(record.uid, None))
        return future

    async def _save(self, record: SandboxRecord) -> CheckpointInfo:
        """Saves a RUNNING sandbox to its checkpoint file, replacing the previous one only
        once the new one is whole; the sandbox runs on, untouched, whatever happens."""
        started = self._clock()
        disk = record.spec.resources.disk_bytes or self._config.workspace_size
        limit = self._config.max_namespace_bytes + disk + CHECKPOINT_SLACK_BYTES
        client = self._provisioner.client_for(record)
        chunks = client.checkpoint(
            self._config.max_namespace_bytes, self._config.checkpoint_timeout.total_seconds()
        )
        untouched = f"sandbox {record.name} is still RUNNING, untouched"
        try:
            async with contextlib.aclosing(chunks):
                summary, size = await self._checkpoints.write(record.uid, chunks, limit)
        except ResourceExhausted as exc:
            raise ResourceExhausted(f"{exc}; {untouched}") from exc
        except FailedPrecondition as exc:  # the executor's words: a file it cannot save
            raise FailedPrecondition(
                f"sandbox {record.name} cannot be saved whole: {exc}; it is still RUNNING, "
                "untouched"
            ) from exc
        except ExecutorFailed as exc:
            if exc.code == "INTERNAL":  # its worker died or hung saving: it was replaced
                raise Unavailable(
                    f"could not save sandbox {record.name}: its interpreter failed while "
                    f"saving its variables ({exc.details}) and was replaced: its variables are "
                    "gone (a new incarnation), its files are kept; it is still RUNNING"
                ) from exc
            raise Unavailable(
                f"could not save sandbox {record.name}: its executor did not complete the "
                f"checkpoint ({exc}); {untouched}: retry"
            ) from exc
        except CheckpointIncomplete as exc:
            raise Unavailable(
                f"could not save sandbox {record.name}: its executor did not complete the "
                f"checkpoint ({exc}); {untouched}: retry"
            ) from exc
        lost = _kept(list(summary.lost))
        self._metrics.checkpoint_bytes.observe(size)
        log.info(
            "sandbox saved",
            sandbox=record.name,
            bytes=size,
            lost=len(lost),
            seconds=round((self._clock() - started).total_seconds(), 3),
        )
        return CheckpointInfo(
            create_time=started,
            size_bytes=size,
            lost=lost,
            execution_count=summary.execution_count,
        )

    async def _resume(self, record: SandboxRecord) -> SandboxRecord:
        """PAUSED -> RUNNING from its checkpoint; the record as it is now. An executor that
        refuses the checkpoint gets a second chance in another container before the sandbox
        is given up as unrestorable: the fault may have been that container's."""
        with self._metrics.timing(self._metrics.resumes, self._metrics.resume_seconds):
            try:
                return await self._resume_into_a_container(record, last_try=False)
            except InvalidArgument as exc:
                log.warning("a restore was refused; trying another container", error=str(exc))
            return await self._resume_into_a_container(record, last_try=True)

    async def _resume_into_a_container(
        self, record: SandboxRecord, last_try: bool
    ) -> SandboxRecord:
        started = self._clock()
        member = await self._pool.take(record.spec)
        if member is not None:
            into = replace(
                record, container_name=member.container_name, socket_dir=member.socket_dir
            )
            self._provisioner.transfer(member.uid, record.uid)
        else:
            try:  # an operator's doing: retrying cannot help
                await self._images.require(record.spec.image_profile)
            except FailedPrecondition as exc:
                raise FailedPrecondition(
                    f"could not resume sandbox {record.name}: {exc}; it is still PAUSED"
                ) from exc
            # A container start like a create's: in line for the server's limit of them at
            # once (a caller that leaves, e.g. at its deadline, leaves the line).
            slots = self._quotas.create_slots
            waited = await slots.take(None, project=record.project)
            self._metrics.create_queue_seconds.labels("resume").observe(waited)
            if waited > 0:
                log.info(
                    "a resume waited for a start slot",
                    sandbox=record.name,
                    seconds=round(waited, 3),
                    still_waiting=slots.waiting,
                )
            try:
                into = await self._start_container(record)
            finally:
                slots.release()
        try:
            restored = await self._provisioner.client_for(into).restore(
                self._checkpoints.read(record.uid),
                self._config.checkpoint_timeout.total_seconds(),
            )
        except BaseException as exc:
            final = last_try or not isinstance(exc, InvalidArgument)
            await shielded(self._give_up(record, into, member, exc, final))
            if not final:
                raise
            mapped = _resume_error(record, exc)
            if mapped is exc:
                raise
            raise mapped from exc
        if member is not None:
            await self._registry.forget(member.uid)  # its container is the sandbox's now
        checkpoint_lost = record.checkpoint.lost if record.checkpoint is not None else ()
        report = checkpoint_lost + _kept(list(restored.lost))
        resumed = await shielded(
            self._lifecycle.resume(
                record, into, restored.incarnation, restored.execution_count, report
            )
        )
        if not resumed:  # deleted while it resumed
            await shielded(self._provisioner.release(into))
            raise FailedPrecondition(f"sandbox {record.name} was deleted while it resumed")
        log.info(
            "sandbox resumed",
            sandbox=record.name,
            into="warm pool" if member is not None else "new container",
            lost=len(report),
            seconds=round((self._clock() - started).total_seconds(), 3),
        )
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None:
            raise FailedPrecondition(f"sandbox {record.name} was deleted while it resumed")
        return current

    async def _start_container(self, record: SandboxRecord) -> SandboxRecord:
        container_name, socket_dir = self._provisioner.place(record.uid)
        into = replace(record, container_name=container_name, socket_dir=socket_dir)
        with contextlib.suppress(Exception):  # a container left by a crash, if any
            await self._containers.remove(container_name)
        try:
            await shielded(self._provisioner.provision(into))
        except Exception as exc:
            raise Unavailable(
                f"could not resume sandbox {record.name}: its container did not start "
                f"({exc}); it is still PAUSED: retry"
            ) from exc
        return into

    async def _give_up(
        self,
        record: SandboxRecord,
        into: SandboxRecord,
        member: SandboxRecord | None,
        error: BaseException,
        final: bool,
    ) -> None:
        """After a failed restore: the container goes; a checkpoint that can never be
        restored (unreadable, or refused on the last try) makes the sandbox TERMINATED,
        anything else leaves it PAUSED."""
        await self._provisioner.release(into)
        if member is not None:
            await self._registry.forget(member.uid)
        if final and isinstance(error, CheckpointUnreadable | InvalidArgument):
            await self._lifecycle.unrestorable(
                record, f"its checkpoint cannot be restored: {error}"
            )

    # --- in the background -----------------------------------------------------------------

    async def hibernate_idle(self) -> None:
        """One round: pauses the sandboxes whose auto_pause_after has passed, then saves
        those idle for checkpoint_idle_after since their last checkpoint."""
        now = self._clock()
        self._failed_saves = {
            uid: failed for uid, failed in self._failed_saves.items() if failed[1] > now
        }
        held: dict[str, datetime | None] = {
            uid: active for uid, (active, _) in self._failed_saves.items()
        }
        # Those in use, or with a save started, are left out: not to take the round's places.
        held.update(dict.fromkeys(self._queues.busy()))
        held.update(dict.fromkeys(self._background))
        for record in await self._registry.list_auto_pause_due(now, ROUND_BATCH, held):
            self._start_in_background(self._auto_pause, record)
        idle_after = self._config.checkpoint_idle_after
        if idle_after:
            held.update(dict.fromkeys(self._background))
            idle = await self._registry.list_unsaved_idle(now - idle_after, ROUND_BATCH, held)
            for record in idle:
                self._start_in_background(self._checkpoint_idle, record)

    def _start_in_background(
        self, step: Callable[[SandboxRecord], Awaitable[None]], record: SandboxRecord
    ) -> None:
        if record.uid in self._background:
            return
        task = asyncio.ensure_future(self._in_background(step, record))
        self._background[record.uid] = task
        task.add_done_callback(lambda _: self._background.pop(record.uid, None))

    async def stop_background(self) -> None:
        """Cancels the background saves under way (at shutdown): a cancelled save leaves
        the previous checkpoint, and the sandbox, as they were."""
        tasks = list(self._background.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _in_background(
        self, step: Callable[[SandboxRecord], Awaitable[None]], record: SandboxRecord
    ) -> None:
        async with self._saves:
            try:
                await step(record)
            except Exception as exc:  # one sandbox's failure is its own: it stays RUNNING
                retry = self._clock() + BACKGROUND_RETRY_AFTER
                self._failed_saves[record.uid] = (record.last_active_time, retry)
                log.warning(
                    "saving an idle sandbox failed; tried again once it has run code",
                    sandbox=record.name,
                    error=str(exc),
                    or_at=retry.isoformat(timespec="seconds"),
                )

    async def _auto_pause(self, record: SandboxRecord) -> None:
        queue = self._queues.of(record.uid)
        if queue.locked():
            return  # in use (an execution that may last an hour): not idle, and not waited for
        async with queue:
            current = await self._registry.get_live(record.project, record.sandbox_id)
            if current is None or current.state is not State.RUNNING:
                return
            if current.node != self._lookup.node:  # moved to another node meanwhile
                return
            if not current.auto_pause_after or (
                current.last_active_time + current.auto_pause_after > self._clock()
            ):
                return  # it ran code meanwhile, or its setting changed
            log.info(
                "pausing an idle sandbox",
                sandbox=current.name,
                idle_for=format_duration(self._clock() - current.last_active_time),
            )
            await self.pause_queued(current)

    async def _checkpoint_idle(self, record: SandboxRecord) -> None:
        queue = self._queues.of(record.uid)
        if queue.locked():
            return  # in use: waiting would hold up the round, every sandbox's saves, with it
        async with queue:
            current = await self._registry.get_live(record.project, record.sandbox_id)
            if current is None or current.state is not State.RUNNING:
                return
            if current.node != self._lookup.node:  # moved to another node meanwhile
                return
            saved = current.checkpoint
            if saved is not None and saved.create_time >= current.last_active_time:
                return  # saved since its last execution
            checkpoint = await self._save(current)
            if not await self._registry.set_fields_in(
                current.uid, State.RUNNING, checkpoint=checkpoint
            ):
                await shielded(self._drop_if_deleted(current))

    async def pause_all(self, within: float) -> None:
        """At shutdown: pauses every RUNNING sandbox, CONCURRENT_SAVES at a time, for at most
        `within` seconds in all; those left stay running, for the next controller to adopt."""
        await self.stop_background()
        running = [r for r in await self._registry.list_live() if r.state is State.RUNNING]
        if not running:
            return
        log.info("pausing the running sandboxes before stopping", count=len(running))
        done = 0

        async def one(record: SandboxRecord) -> None:
            nonlocal done
            async with self._saves:
                try:
                    async with self._queues.of(record.uid):
                        current = await self._registry.get_live(record.project, record.sandbox_id)
                        mine = current is not None and current.node == self._lookup.node
                        if current is not None and mine and current.state is State.RUNNING:
                            await self.pause_queued(current)
                except Exception as exc:
                    log.warning("could not pause a sandbox", sandbox=record.name, error=str(exc))
                    return
            done += 1
            if done % 10 == 0 or done == len(running):
                log.info("paused before stopping", done=done, of=len(running))

        tasks = [asyncio.ensure_future(one(record)) for record in running]
        _, pending = await asyncio.wait(tasks, timeout=within)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if pending:
            log.warning(
                "stopped before every sandbox was paused: the rest stay running",
                paused=done,
                left=len(running) - done,
            )


def _not_running(record: SandboxRecord, verb: str) -> FailedPrecondition:
    detail = f": {record.state_message}" if record.state_message else ""
    return FailedPrecondition(
        f"sandbox {record.name} is {record.state.name}{detail}; it cannot be {verb}",
        **terminated_reason(record),
    )


def _resume_error(record: SandboxRecord, error: BaseException) -> BaseException:
    if isinstance(error, CheckpointUnreadable | InvalidArgument):
        return FailedPrecondition(
            f"sandbox {record.name} cannot be resumed: its checkpoint cannot be restored "
            f"({error}); it is TERMINATED. Nothing ran"
        )
    if isinstance(error, ResourceExhausted | Unavailable):
        return type(error)(f"could not resume sandbox {record.name}: {error}; it is still PAUSED")
    if isinstance(error, ExecutorFailed):
        return Unavailable(
            f"could not resume sandbox {record.name}: its new container's executor failed "
            f"({error}); it is still PAUSED and nothing ran: retry"
        )
    return error
