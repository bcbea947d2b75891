"""The reconciler: makes the registry and podman agree, at start and while the service runs.

At start it adopts what a previous controller left: RUNNING sandboxes whose container runs
get a client again; anything half-done is finished (a deletion) or discarded (a create that
never answered, warm pool members, which may not match this controller's settings); containers
the registry does not know are removed. While the service runs, it finds the sandboxes whose
container died underneath us: at once from podman's event stream (`start_watching`), and with
`check_containers`, a slow poll of every container, as a safety net. Such a sandbox comes back
from its checkpoint (PAUSED: its next execution resumes it) when it has one, and is
TERMINATED, saying why, when it has none: never silently gone.

The controller's own creates, pauses and deletes make events too: a container is judged by
its record's state when the event is handled (only RUNNING and POOLED ones are watched, and
not while being provisioned) and by an inspection, never by the event alone.
"""

import asyncio
import contextlib

import structlog

from controller.errors import PetriError
from controller.records import SandboxRecord, State
from controller.runtime.container import (
    LABEL_UID,
    ContainerEvents,
    ContainerRuntime,
    ContainerStatus,
)
from controller.sandboxes.lifecycle import UNOWNED_STATES, Lifecycle
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.shielding import shielded
from controller.sandboxes.warm_pool import WarmPool
from controller.store.checkpoints import CheckpointStore
from controller.store.registry import Registry

log = structlog.get_logger()

# The states whose containers must be running.
WATCHED_STATES = (State.RUNNING, State.POOLED)
# Pauses between subscriptions to podman's events while it does not answer, or its stream
# keeps ending at once (doubling up to the longest).
SUBSCRIBE_PAUSE_FIRST = 0.25
SUBSCRIBE_PAUSE_LONGEST = 4.0
# How long a container of this node's podman may go unnamed by any of its live rows, at every
# check, before it is removed (see Reconciler._remove_unnamed).
UNNAMED_GRACE_SECONDS = 10.0


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
        # The containers events named, not yet checked; the checker is woken for them.
        self._named: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.subscriptions = 0  # how many times the event stream was subscribed to
        self.named_checked = 0  # how many containers events named were checked
        # The PROVISIONING rows with no start under way that the last check found.
        self._unstarted: set[str] = set()
        # The containers no live row named at the last check, and since when (loop time).
        self._unnamed: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"<Reconciler registry={self._provisioner.registry_label} "
            f"subscriptions={self.subscriptions}>"
        )

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
        # Left by a crash during a drain's move: a target's copy never switched to it, or a
        # source's copy of a sandbox that its target took over.
        held = {record.uid for record in records}
        for uid in await asyncio.to_thread(self._checkpoints.uids):
            if uid not in held:
                log.info("removing a checkpoint of no sandbox of this node", uid=uid)
                await self._checkpoints.remove(uid)
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
        elif record.given_up and container is not None:
            # Another node declared this one dead meanwhile and terminated the sandbox: its
            # caller was told it is gone, so what is left of it goes.
            await self._provisioner.release(record)
        elif record.state is State.PAUSED and container is not None:
            # Left by a crash during its pause or its resume: the checkpoint is the sandbox;
            # the container goes, with what it held (its socket directory, its worker uid).
            await self._provisioner.release(record)

    def start_watching(self) -> None:
        """Follows podman's events of this registry's containers until stop_watching."""
        self._tasks = [
            asyncio.create_task(self._follow_events(), name="container-events"),
            asyncio.create_task(self._check_named(), name="container-events-check"),
        ]

    async def stop_watching(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow_events(self) -> None:
        """Subscribes, checks every container once (what happened while not subscribed), then
        hands each event's container to _check_named; subscribes again when the stream ends
        (the podman service restarted) or breaks."""
        loop = asyncio.get_running_loop()
        label = self._provisioner.registry_label
        pause = SUBSCRIBE_PAUSE_FIRST
        while True:
            subscribed = loop.time()
            try:
                events = await self._containers.events(label)
            except PetriError as exc:
                log.warning("cannot follow podman's container events", error=str(exc))
            else:
                self.subscriptions += 1
                await self._follow(events)
            if loop.time() - subscribed < SUBSCRIBE_PAUSE_LONGEST:
                await asyncio.sleep(pause)  # not a hot loop on a podman that keeps failing
                pause = min(SUBSCRIBE_PAUSE_LONGEST, pause * 2)
            else:
                pause = SUBSCRIBE_PAUSE_FIRST

    async def _follow(self, events: ContainerEvents) -> None:
        try:
            try:
                await self.check_containers()
            except Exception:  # the events still come; the slow poll catches up
                log.exception("checking every container after subscribing failed")
            async for event in events:
                self._named.add(event.name)
                self._wake.set()
            log.info("podman's container event stream ended: subscribing again")
        except PetriError as exc:
            log.warning("podman's container event stream broke: subscribing again", error=str(exc))
        except Exception:  # the watcher must outlive any surprise; subscribing again retries
            log.exception("following podman's container events failed: subscribing again")
        finally:
            await events.aclose()

    async def _check_named(self) -> None:
        """Checks the containers events named, all of a burst's at once."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            names, self._named = self._named, set()
            try:
                records = await self._registry.list_live()
            except Exception:  # the slow poll finds what this missed
                log.exception("checking containers that events named failed")
                records = []
            for record in records:
                if record.state not in WATCHED_STATES or record.container_name not in names:
                    continue
                try:
                    # A check that terminates or recovers finishes even when the controller
                    # stops meanwhile.
                    await shielded(self._check(record, None))
                except Exception:  # the others are still checked; the slow poll retries
                    log.exception("checking a container an event named failed", uid=record.uid)
            self.named_checked += len(names)

    async def check_containers(self) -> None:
        """Marks TERMINATED the RUNNING sandboxes whose container died or vanished underneath
        us (killed from outside, OOM, the executor killed inside it, podman lost it), and
        discards such warm pool members: every container, in one listing. Removes the
        containers of sandboxes another node gave up (SandboxRecord.given_up), and those that
        no sandbox of this node has named for UNNAMED_GRACE_SECONDS (_remove_unnamed)."""
        live = await self._registry.list_live()
        await self._discard_unstarted(live)
        records = [r for r in live if r.state in WATCHED_STATES]
        given_up = [r for r in live if r.given_up]
        label = self._provisioner.registry_label
        containers = {c.name: c for c in await self._containers.list_managed(label)}
        for record in records:
            await self._check(record, containers.get(record.container_name))
        for record in given_up:
            if record.container_name in containers:
                # Another node declared this one dead (its heartbeats did not reach the
                # database) and terminated the sandbox: what is left of it goes.
                await self._provisioner.release(record)
        await self._remove_unnamed(live, containers)

    async def _remove_unnamed(
        self, live: list[SandboxRecord], containers: dict[str, ContainerStatus]
    ) -> None:
        """Removes the containers that no live sandbox of this node has named (by container
        name or uid) at every check for UNNAMED_GRACE_SECONDS: what another node ended while
        this one missed its heartbeats (frozen, cut off from the database) and came back
        still holding. A given-up sandbox that a caller deleted through another node, or
        whose expiry came, leaves a tombstone only; a warm pool member's row the sweep
        forgot leaves nothing. A restart removes such containers (adopt); a node that came
        back without one must too. A container made but not yet recorded (a resume into a
        warm pool member between its two writes) is named again within the grace."""
        now = asyncio.get_running_loop().time()
        named = {r.container_name for r in live}
        uids = {r.uid for r in live}
        unnamed = {
            name
            for name, container in containers.items()
            if name not in named and container.labels.get(LABEL_UID) not in uids
        }
        seen = self._unnamed
        self._unnamed = {name: seen.get(name, now) for name in unnamed}
        for name, since in list(self._unnamed.items()):
            if now - since < UNNAMED_GRACE_SECONDS:
                continue
            container = containers[name]
            uid = container.labels.get(LABEL_UID, "")
            log.warning(
                "removing a container no sandbox of this node names any more", container=name
            )
            if uid and uid in self._pool.ready_uids():
                await shielded(self._pool.remove_uid(uid, "its row was forgotten"))
            else:
                await shielded(self._provisioner.release_unnamed(container))
            self._unnamed.pop(name, None)

    async def _discard_unstarted(self, live: list[SandboxRecord]) -> None:
        """Discards, as a restart would, the sandboxes whose row is PROVISIONING with no start
        under way at two checks in a row: their start ended, but the database was out of
        reach to be told (its caller was answered UNAVAILABLE). Else each would hold a place
        in its project's quota, and its request_id's retries would wait, for ever."""
        unstarted = {
            r.uid: r
            for r in live
            if r.state is State.PROVISIONING and self._lifecycle.provisioning(r.uid) is None
        }
        seen_before, self._unstarted = self._unstarted, set(unstarted)
        for uid in seen_before & set(unstarted):
            await shielded(self._lifecycle.discard(unstarted[uid], "its start ended unrecorded"))
            self._unstarted.discard(uid)

    async def _check(self, record: SandboxRecord, listed: ContainerStatus | None) -> None:
        """Handles the container of a RUNNING or POOLED record that may have died (`listed`:
        what a listing said of it, if one did)."""
        if listed is not None and listed.running:
            return
        if self._lifecycle.provisioning(record.uid) is not None:
            return  # its container is being started: its provisioning judges it
        # Inspect for the reason (exit code, OOM), and to be sure it is not just starting.
        status = await self._containers.status(record.container_name)
        if status is not None and status.running:
            return
        if record.state is State.POOLED:
            await self._pool.remove(record, f"it died: {_gone(status)}")
        else:
            await self._lost(record, _gone(status))

    async def _lost(self, record: SandboxRecord, why: str) -> None:
        """A RUNNING sandbox whose container is gone: back from its checkpoint (PAUSED) when
        it has one, else TERMINATED; `why` says what happened, and which."""
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or (current.uid, current.node, current.container_name) != (
            record.uid,
            record.node,
            record.container_name,
        ):
            return  # read before it was resumed elsewhere or moved: not this container's
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
