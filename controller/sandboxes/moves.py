"""Moving sandboxes off a draining node (role node), and taking them over on another.

The source, in the background while its node is draining, takes its RUNNING and PAUSED
sandboxes one at a time, each in its own queue (controller.sandboxes.queues) so that no call
runs on it meanwhile: a call that reaches it waits for the move, then, the sandbox being the
target's, is refused SANDBOX_ON_ANOTHER_NODE before it does anything (a gateway sends it on to
the target). Those running a call go last (a move waits for it). For each it

    1. pauses it if it is RUNNING (after the executions queued before the move), and waits
       for its container to go;
    2. picks a target among the live nodes, not draining, with room (controller.placement);
    3. records the move with a one-time token's hash (controller.store.moves) and streams the
       checkpoint file to the target with the token (the Transfer, node to node);
    4. the target checks the token against the move, the sandbox the call and the file's
       header name, that it can run the sandbox and has room for it (its own count), writes
       the file, and in one transaction makes the sandbox's row name itself if it still names
       the source and is PAUSED; then resumes it if it was RUNNING;
    5. the source removes its checkpoint file.

A move that fails at any step is given up: the move's row is deleted first (no target can take
the sandbox over after that), then the sandbox, still the source's, is resumed there if it was
RUNNING, and tried again later; why is logged and in the node's drain report. Never two owners
(the row names one node, switched only by that compare-and-set), never a lost checkpoint (the
source's is removed only once the row names the target, whose copy is whole and on disk).
"""

import asyncio
import random
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from controller.config import Config
from controller.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from controller.names import SandboxName, parse_sandbox_name
from controller.placement import NodeInfo, placement_order
from controller.records import PUBLIC_STATES, SandboxRecord, Spec, State
from controller.sandboxes.hibernation import CHECKPOINT_SLACK_BYTES, Hibernation
from controller.sandboxes.queues import Queues
from controller.sandboxes.shielding import shielded
from controller.sandboxes.warm_pool import WarmPool
from controller.store.checkpoints import CheckpointStore, CheckpointUnreadable
from controller.store.registry import Registry

log = structlog.get_logger()

# A sandbox whose move failed is tried again after this long (each try may pickle its whole
# namespace: a sandbox that cannot be saved must not be paused over and over).
MOVE_RETRY_AFTER = timedelta(seconds=30)
# The most failures a drain report lists (by sandbox), and the length of each reason.
REPORT_FAILURES = 20
REPORT_TEXT = 300
# What a token and a uid look like (secrets.token_urlsafe(32); secrets.token_hex(16)).
_TOKEN = re.compile(r"[A-Za-z0-9_-]{20,100}")
_UID = re.compile(r"[0-9a-f]{32}")
MOVABLE = (State.RUNNING, State.PAUSED)


class MoveSeen(Protocol):
    @property
    def source(self) -> str: ...
    @property
    def resume(self) -> bool: ...


class MoveLedger(Protocol):
    """The registry's moves (controller.store.moves.PostgresMoves)."""

    async def begin(self, uid: str, source: str, target: str, resume: bool, token: str) -> None:
        """Records a move of sandbox `uid` with the token's hash."""

    async def find(self, uid: str, token: str, target: str) -> MoveSeen | None: ...

    async def take_over(self, uid: str, token: str, target: str, now: datetime) -> bool:
        """Consumes the move, and switches the row to `target` if it still names the source
        and is PAUSED: whether it did."""

    async def give_up(self, uid: str, token: str) -> bool: ...


class NodeBook(Protocol):
    """The nodes (controller.store.nodes.PostgresNodes)."""

    async def list_nodes(self) -> Sequence[NodeInfo]: ...

    async def report_drain(self, name: str, report: Mapping[str, Any]) -> None: ...


class Transfer(Protocol):
    """Streams a checkpoint to another node (controller.api.node_transfer): returns once that
    node has taken the sandbox over; raises otherwise (whether it did is then the registry's
    to say)."""

    async def send(
        self, address: str, uid: str, name: str, token: str, data: AsyncIterator[bytes]
    ) -> None: ...


class Releases(Protocol):
    """controller.sandboxes.provisioner.Provisioner"""

    async def wait_released(self, uid: str) -> None: ...


class Mover:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        checkpoints: CheckpointStore,
        hibernation: Hibernation,
        queues: Queues,
        pool: WarmPool,
        clock: Callable[[], datetime],
        check_runnable: Callable[[Spec], Awaitable[None]],
        releases: Releases,
    ) -> None:
        """`check_runnable` raises when this node cannot run a sandbox of that spec (its
        runtime, its image, its resources)."""
        self._config = config
        self._releases = releases
        self._check_runnable = check_runnable
        self._node = config.node_name if config.role == "node" else ""
        self._registry = registry
        self._checkpoints = checkpoints
        self._hibernation = hibernation
        self._queues = queues
        self._pool = pool
        self._clock = clock
        self._ledger: MoveLedger | None = None
        self._nodes: NodeBook | None = None
        self._transfer: Transfer | None = None
        self.draining = False
        self._round: asyncio.Task[None] | None = None
        self._pool_change: asyncio.Task[None] | None = None
        self._stopping = False
        # Since the drain began: how many moved, and the last failure of each sandbox not
        # moved yet (by uid: its name, why, when to try again).
        self.moved = 0
        self._failed: dict[str, tuple[str, str, datetime]] = {}
        # The sandboxes this node is taking over now: one call per move (a replayed one
        # would write over the file, and remove it when its take-over fails).
        self._receiving: set[str] = set()

    def __repr__(self) -> str:
        return f"<Mover node={self._node!r} draining={self.draining} moved={self.moved}>"

    def connect(self, ledger: MoveLedger, nodes: NodeBook, transfer: Transfer) -> None:
        """Makes this node able to move sandboxes (role node: the shared registry's)."""
        self._ledger, self._nodes, self._transfer = ledger, nodes, transfer

    # --- the source: a drain ----------------------------------------------------------------

    def set_draining(self, draining: bool) -> None:
        """What the node's heartbeat read: while draining, its warm pool is emptied and kept
        empty, and a round of moves runs whenever none is under way."""
        if self._nodes is None or self._stopping:
            return
        if draining != self.draining:
            self.draining = draining
            log.info("drain started" if draining else "drain stopped", node=self._node)
            if draining:
                self.moved = 0
                self._failed.clear()
            self._change_pool(draining)
        if draining and (self._round is None or self._round.done()):
            self._round = asyncio.ensure_future(self._move_all())

    def _change_pool(self, draining: bool) -> None:
        previous = self._pool_change

        async def change() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            if draining:
                await self._pool.suspend()
            else:
                self._pool.start()

        self._pool_change = asyncio.ensure_future(change())

    async def stop(self) -> None:
        """At shutdown: no more moves; the one under way finishes."""
        self._stopping = True
        tasks = [task for task in (self._round, self._pool_change) if task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def report(self, left: int) -> dict[str, Any]:
        failed = sorted(self._failed.values())[:REPORT_FAILURES]
        return {
            "moved": self.moved,
            "left": left,
            "failed": {name: why for name, why, _ in failed},
        }

    async def _move_all(self) -> None:
        assert self._nodes is not None
        try:
            movable = [r for r in await self._registry.list_live() if r.state in MOVABLE]
            # Those running a call last: a move waits for it (maybe an hour's execution), and
            # the others need not wait as well.
            busy = set(self._queues.busy())
            movable.sort(key=lambda record: record.uid in busy)
            for record in movable:
                if not self.draining or self._stopping:
                    break
                failed = self._failed.get(record.uid)
                if failed is not None and failed[2] > self._clock():
                    continue
                try:
                    if await self._move(record):
                        self.moved += 1
                    self._failed.pop(record.uid, None)
                except Exception as exc:
                    why = str(exc)[:REPORT_TEXT]
                    retry = self._clock() + MOVE_RETRY_AFTER
                    self._failed[record.uid] = (str(record.name), why, retry)
                    log.warning(
                        "could not move a sandbox off this draining node; it stays here and is "
                        "tried again",
                        sandbox=record.name,
                        error=why,
                        at=retry.isoformat(timespec="seconds"),
                    )
            left = [r for r in await self._registry.list_live() if r.state in MOVABLE]
            live = {r.uid for r in left}
            self._failed = {uid: f for uid, f in self._failed.items() if uid in live}
            await self._nodes.report_drain(self._node, self.report(len(left)))
        except Exception:
            log.exception("a round of the drain failed; retrying next heartbeat")

    async def _move(self, record: SandboxRecord) -> bool:
        """Moves one sandbox; False when there was nothing to move (it ended meanwhile)."""
        queue = self._queues.of(record.uid)
        log.info("moving a sandbox", sandbox=record.name, after_its_queue=queue.locked())
        async with queue:
            resuming = self._hibernation.resume_under_way(record.uid)
            if resuming is not None:  # its caller left, and let the queue go: it ends first
                await asyncio.gather(resuming, return_exceptions=True)
            current = await self._registry.get_live(record.project, record.sandbox_id)
            if (
                current is None
                or current.uid != record.uid
                or current.node != self._node
                or current.state not in MOVABLE
            ):
                return False
            target = await self._target(current)
            log.info("moving a sandbox to a node", sandbox=current.name, to=target.name)
            was_running = current.state is State.RUNNING
            if was_running:
                await self._hibernation.pause_queued(current)
                current = await self._registry.get_live(record.project, record.sandbox_id)
                if (
                    current is None
                    or current.uid != record.uid
                    or current.state is not State.PAUSED
                ):
                    return False  # deleted or terminated while it was saved
            # Its container goes first: a target on the same podman (several nodes on one
            # host) starts one of the same name, which this release would remove.
            await self._releases.wait_released(record.uid)
            await self._send(current, target, was_running)
        self._queues.forget(record.uid)
        return True

    async def _target(self, record: SandboxRecord) -> NodeInfo:
        assert self._nodes is not None
        live = [
            node
            for node in await self._nodes.list_nodes()
            if node.name != self._node and node.age <= self._config.node_timeout
        ]
        spec = record.spec
        kind = f"{spec.image_profile}/{spec.runtime.name.lower()}"
        order = placement_order(live, kind, random.sample)
        if not order:
            raise Unavailable("no live node that is not draining has room for it")
        return order[0]

    async def _send(self, record: SandboxRecord, target: NodeInfo, was_running: bool) -> None:
        """Steps 3 to 5 for a PAUSED sandbox, its queue held."""
        assert self._ledger is not None and self._transfer is not None
        token = secrets.token_urlsafe(32)
        try:
            # Inside: a registry that fails it (restarting) still gets the sandbox resumed.
            await self._ledger.begin(record.uid, self._node, target.name, was_running, token)
            await self._transfer.send(
                target.address,
                record.uid,
                str(record.name),
                token,
                self._checkpoints.send(record.uid),
            )
            failure: BaseException | None = None
        except BaseException as exc:
            failure = exc
        # Whether the target took it over is the registry's to say: the move is deleted first,
        # so that no take-over can happen after this look.
        if not await shielded(self._settle(record, target.name, token, was_running)):
            raise failure or Unavailable(f"node {target.name} did not take it over")
        self._queues.mark_moved(record.uid)
        await self._checkpoints.remove(record.uid)
        log.info("sandbox moved", sandbox=record.name, to=target.name, resumed=was_running)
        if isinstance(failure, asyncio.CancelledError):
            raise failure

    async def _settle(self, record: SandboxRecord, target: str, token: str, resume: bool) -> bool:
        """After a transfer: True when the target holds the sandbox; otherwise it is this node's
        again, resumed here if it was RUNNING, and False."""
        assert self._ledger is not None
        await self._ledger.give_up(record.uid, token)
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is not None and current.uid == record.uid and current.node == target:
            return True
        mine = current is not None and current.node == self._node
        if resume and current is not None and mine and current.state is State.PAUSED:
            try:
                await self._hibernation.resume_queued(current)
            except Exception as exc:
                log.warning(
                    "could not resume a sandbox whose move failed; it stays PAUSED and "
                    "resumes on its next call",
                    sandbox=record.name,
                    error=str(exc)[:REPORT_TEXT],
                )
        return False

    # --- the target: taking a sandbox over ----------------------------------------------------

    async def receive(
        self, uid: str, name_text: str, token: str, data: AsyncIterator[bytes]
    ) -> None:
        """Takes over the sandbox whose checkpoint `data` is, moved here by its node: see the
        module's step 4. PermissionDenied without the token of a move of that sandbox to this
        node; InvalidArgument when the call or the checkpoint's header names another sandbox,
        or the checkpoint does not read whole; FailedPrecondition when the sandbox is no longer
        the source's and PAUSED, or another call is taking it over; the error that says why
        when this node cannot run it, ResourceExhausted when it holds its most sandboxes.
        Nothing is kept but on success."""
        if self._ledger is None:
            raise FailedPrecondition("this controller is no node: it takes no sandbox over")
        if not _TOKEN.fullmatch(token):
            raise PermissionDenied("a sandbox is taken over only with its move's token")
        if not _UID.fullmatch(uid):
            raise InvalidArgument("the move names no sandbox uid")
        name = parse_sandbox_name(name_text)
        move = await self._ledger.find(uid, token, self._node)
        if move is None:
            raise PermissionDenied(
                "no move of that sandbox to this node has that token (or it is over)"
            )
        if uid in self._receiving:
            raise FailedPrecondition(f"sandbox {name} is being taken over by another call")
        self._receiving.add(uid)
        try:
            await self._take_over(uid, name, token, move, data)
        finally:
            self._receiving.discard(uid)
        if move.resume:
            await self._resume_here(name)

    async def _take_over(
        self,
        uid: str,
        name: SandboxName,
        token: str,
        move: MoveSeen,
        data: AsyncIterator[bytes],
    ) -> None:
        assert self._ledger is not None
        record = await self._registry.get_live(name.project, name.sandbox_id)
        if record is None or record.uid != uid:
            raise InvalidArgument(f"sandbox {name} is not the sandbox being moved")
        if record.node != move.source or record.state is not State.PAUSED:
            raise FailedPrecondition(
                f"sandbox {name} is not PAUSED on node {move.source} any more: not taken over"
            )
        await self._check_runnable(record.spec)  # else stranded here, never resumed
        await self._check_room()
        await self._keep_checkpoint(record, data)
        now = self._clock()
        if not await shielded(self._ledger.take_over(uid, token, self._node, now)):
            await self._checkpoints.remove(uid)
            raise FailedPrecondition(f"sandbox {name} changed while it moved: not taken over")
        self._queues.arrived(uid)
        log.info("sandbox taken over", sandbox=str(name), source=move.source)

    async def _check_room(self) -> None:
        """The source placed the sandbox by heartbeated figures, maybe old ones (several moves
        in one heartbeat): this node's own count is the one that holds."""
        most = self._config.max_sandboxes_per_node
        if not most:
            return
        counts = await self._registry.count_by_state()
        if sum(counts.get(state, 0) for state in PUBLIC_STATES) >= most:
            raise ResourceExhausted(
                f"node {self._node} holds its most sandboxes ({most}): not taken over"
            )

    async def _keep_checkpoint(self, record: SandboxRecord, data: AsyncIterator[bytes]) -> None:
        disk = record.spec.resources.disk_bytes or self._config.workspace_size
        limit = self._config.max_namespace_bytes + disk + CHECKPOINT_SLACK_BYTES
        try:
            await self._checkpoints.receive(record.uid, data, limit)
        except CheckpointUnreadable as exc:
            raise InvalidArgument(f"the checkpoint sent is refused: {exc}") from exc

    async def _resume_here(self, name: SandboxName) -> None:
        try:
            await self._hibernation.resume(name)
        except Exception as exc:  # it is this node's, PAUSED: its next call resumes it
            log.warning(
                "a sandbox taken over could not be resumed; it resumes on its next call",
                sandbox=str(name),
                error=str(exc)[:REPORT_TEXT],
            )
