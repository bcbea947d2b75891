"""CreateSandbox: a retry answered from its request_id, else a warm pool member, else a new
container; the project's quota holds for each, and a new container waits its turn for the
server's limit on starts at once (FIFO per project, the projects taking turns, within the
caller's deadline: DEADLINE_EXCEEDED, nothing created, when a start can no longer fit
before it). A caller that leaves (its deadline passed) during the start leaves nothing
either, unless it gave a request_id: then its retry gets the sandbox.

A request_id names one request (AIP-155): a retry with it gets the sandbox the first request
made, once RUNNING, and a different request that reuses it is ALREADY_EXISTS, naming the
fields that differ.
"""

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import Callable
from datetime import datetime

import structlog

from controller.errors import AlreadyExists, Cancelled, DeadlineExceeded, ResourceExhausted
from controller.metrics import Metrics
from controller.names import generate_sandbox_id, validate_sandbox_id
from controller.quoting import quote
from controller.records import SandboxRecord, Spec, State
from controller.sandboxes.images import ImageCatalogue
from controller.sandboxes.labels import validate_display_name, validate_labels
from controller.sandboxes.lifecycle import Lifecycle
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.shielding import shielded
from controller.sandboxes.specs import (
    CreateParams,
    SpecPolicy,
    create_request_json,
    differing_fields,
)
from controller.sandboxes.warm_pool import WarmPool
from controller.store.registry import Registry

log = structlog.get_logger()

# How much each cold start moves the estimate of the next one's duration (an EWMA), and the
# estimate before the first (none: a create waits while any of its deadline is left).
START_ESTIMATE_WEIGHT = 0.3
FIRST_START_ESTIMATE = 0.0
# An estimate no start has confirmed for this many seconds counts half as much: one slow
# start cannot refuse every later create for good (a refused create starts nothing to
# measure, so without it the estimate would never come down).
START_ESTIMATE_HALF_LIFE = 30.0
# How often a retry whose sandbox another node is starting reads the registry for its end.
REPLAY_POLL_SECONDS = 0.1


class Creation:
    def __init__(
        self,
        registry: Registry,
        policy: SpecPolicy,
        images: ImageCatalogue,
        provisioner: Provisioner,
        lifecycle: Lifecycle,
        pool: WarmPool,
        quotas: Quotas,
        clock: Callable[[], datetime],
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._policy = policy
        self._images = images
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._pool = pool
        self._quotas = quotas
        self._clock = clock
        self._metrics = metrics
        # Seconds a cold start takes, recently: a create waits in line only while its
        # deadline still leaves this long.
        self._start_estimate = FIRST_START_ESTIMATE
        self._starts_measured = 0
        self._estimated_at: float | None = None  # the loop's time of the last measurement
        # Each project's creates between their quota check and their row: their requests
        # (a request_id, else the record's uid) and how many calls each.
        self._in_line: dict[str, collections.Counter[str]] = {}

    def __repr__(self) -> str:
        return f"<Creation {self._lifecycle!r}>"

    async def create(self, params: CreateParams) -> SandboxRecord:
        """The RUNNING sandbox `params` asks for. Its provisioning runs on if the caller
        leaves, and holds its create slot until it ends (then, without a request_id, the
        sandbox is discarded)."""
        earlier = await self._earlier_answer(params)
        if earlier is not None:
            return earlier
        record = self._new_record(params, await self._effective_spec(params))
        started, source = time.perf_counter(), "cold"
        try:
            made, source = await self._claim_or_start(params, record)
        except BaseException:
            self._metrics.created(source, 0.0, ok=False)
            raise
        self._metrics.created(source, time.perf_counter() - started, ok=True)
        return made

    async def _claim_or_start(
        self, params: CreateParams, record: SandboxRecord
    ) -> tuple[SandboxRecord, str]:
        """The sandbox, and where it came from: a warm pool member ("pool") or a new
        container ("cold")."""
        try:
            claimed = await self._pool.claim(record)
        except (AlreadyExists, ResourceExhausted):
            # A concurrent retry won the race (its sandbox may be the one filling the quota).
            earlier = await self._earlier_answer(params)
            if earlier is not None:
                return earlier, "cold"
            raise
        if claimed is not None:
            return claimed, "pool"
        try:
            await self._wait_and_admit(params, record)
        except (AlreadyExists, ResourceExhausted):
            earlier = await self._earlier_answer(params)  # as above
            if earlier is not None:
                return earlier, "cold"
            raise
        started = asyncio.get_running_loop().time()
        # A caller that leaves before its sandbox is ready gets no sandbox: without a
        # request_id no retry can ever be given it, so it is discarded once started, not
        # left RUNNING (in the project's quota, on the host) for a caller that saw an error.
        left = asyncio.Event()
        future = self._lifecycle.provision(record, lambda: left.is_set() and not params.request_id)
        future.add_done_callback(lambda done: self._started(done, started))
        try:
            return await asyncio.shield(future), "cold"
        except asyncio.CancelledError:
            left.set()
            raise

    async def _wait_and_admit(self, params: CreateParams, record: SandboxRecord) -> None:
        """Waits for a start slot and adds the sandbox's row, holding the slot once the row
        is in. Counted in its project's line meanwhile: a create the project's quota
        cannot take even with those before it refused at once (ResourceExhausted), not at
        the end of its wait; a retry of a request in line is not counted twice."""
        project, key = params.project, params.request_id or f"#{record.uid}"
        if key not in self._in_line.get(project, ()):
            await self._lifecycle.check_room(project, lambda: len(self._in_line.get(project, ())))
        # No await since the check: the next create's check counts this one.
        line = self._in_line.setdefault(project, collections.Counter())
        line[key] += 1
        try:
            try:
                await self._wait_for_a_slot(params)
                try:
                    await self._admit(record)
                except BaseException:
                    self._quotas.create_slots.release()
                    raise
            finally:
                line[key] -= 1
        finally:
            if line[key] <= 0:
                del line[key]
            if not line:
                del self._in_line[project]

    async def _admit(self, record: SandboxRecord) -> None:
        """Adds the sandbox's row; a caller that leaves meanwhile leaves no row (the insert
        runs on in the store's thread: a row without a start would hold a place in the
        project's quota until the controller restarts)."""
        admitting = asyncio.ensure_future(self._lifecycle.admit(record))
        try:
            await asyncio.shield(admitting)
        except asyncio.CancelledError:
            await shielded(self._undo_admission(admitting, record))
            raise

    async def _undo_admission(
        self, admitting: "asyncio.Future[None]", record: SandboxRecord
    ) -> None:
        with contextlib.suppress(Exception):  # not admitted (over quota, name taken)
            await admitting
            await self._registry.forget(record.uid)

    async def _wait_for_a_slot(self, params: CreateParams) -> None:
        """Takes one of the server's starts at once, in line behind the creates before it;
        DeadlineExceeded (nothing made yet) once the caller's deadline leaves no time for a
        start. A caller that leaves while it waits leaves the line."""
        slots = self._quotas.create_slots
        loop = asyncio.get_running_loop()
        estimate = self._current_estimate(loop.time())
        timeout = None
        if params.deadline is not None:
            timeout = params.deadline - loop.time() - estimate
        try:
            if timeout is not None and timeout <= 0:
                raise TimeoutError
            waited = await slots.take(timeout, project=params.project)
        except TimeoutError:
            raise DeadlineExceeded(
                "CreateSandbox's deadline leaves no time to start a sandbox (about "
                f"{estimate:.1f} s each now; the server starts "
                f"{slots.limit} at once and {slots.waiting} more wait): nothing was created; "
                "retry, with a longer deadline"
            ) from None
        self._metrics.create_queue_seconds.labels("create").observe(waited)
        if waited > 0:
            log.info(
                "a create waited for a start slot",
                seconds=round(waited, 3),
                still_waiting=slots.waiting,
            )

    def _current_estimate(self, now: float) -> float:
        """The seconds a start takes, as recent starts say: halved for every
        START_ESTIMATE_HALF_LIFE since the last one measured."""
        if self._estimated_at is None:
            return self._start_estimate
        age = max(0.0, now - self._estimated_at)
        decay: float = 0.5 ** (age / START_ESTIMATE_HALF_LIFE)
        return self._start_estimate * decay

    def _started(self, done: "asyncio.Future[SandboxRecord]", started: float) -> None:
        """A cold start ended: its slot goes to the next in line; a success moves the
        estimate of a start's duration, and so does a start whose caller left (discarded
        once started; its discard counted in): else creates with deadlines too short for a
        start would each start one for nothing while no start is measured."""
        self._quotas.create_slots.release()
        if not done.cancelled() and (
            done.exception() is None or isinstance(done.exception(), Cancelled)
        ):
            now = asyncio.get_running_loop().time()
            took = now - started
            estimate = self._current_estimate(now) if self._starts_measured else took
            self._start_estimate = estimate + START_ESTIMATE_WEIGHT * (took - estimate)
            self._starts_measured += 1
            self._estimated_at = now

    async def _effective_spec(self, params: CreateParams) -> Spec:
        profile, runtime = self._policy.profile_and_runtime(params.image_profile, params.runtime)
        await self._images.require(profile)
        return Spec(profile, runtime, self._policy.effective_resources(params.resources, runtime))

    def _new_record(self, params: CreateParams, spec: Spec) -> SandboxRecord:
        now = self._clock()
        sandbox_id = (
            validate_sandbox_id(params.sandbox_id) if params.sandbox_id else generate_sandbox_id()
        )
        uid = secrets.token_hex(16)
        container_name, socket_dir = self._provisioner.place(uid)
        return SandboxRecord(
            uid=uid,
            project=params.project,
            sandbox_id=sandbox_id,
            display_name=validate_display_name(params.display_name),
            labels=validate_labels(params.labels),
            spec=spec,
            state=State.PROVISIONING,
            create_time=now,
            update_time=now,
            expire_time=self._policy.expiry(now, params.expire_time, params.ttl),
            auto_pause_after=self._policy.auto_pause_after(params.auto_pause_after),
            last_active_time=now,
            request_id=params.request_id or None,
            create_request=create_request_json(params) if params.request_id else None,
            container_name=container_name,
            socket_dir=socket_dir,
        )

    async def _earlier_answer(self, params: CreateParams) -> SandboxRecord | None:
        """The answer to a retried Create (its request_id made a sandbox already); None for
        a first request."""
        if not params.request_id:
            return None
        previous = await self._registry.get_by_request_id(params.project, params.request_id)
        # Started by another node sharing the registry (none of ours is under way): its
        # answer is the sandbox once that start ends, as it is for a start of ours.
        while previous is not None and self._started_elsewhere(previous, params):
            await asyncio.sleep(REPLAY_POLL_SECONDS)
            previous = await self._registry.get_by_request_id(params.project, params.request_id)
        return None if previous is None else await self._replay(previous, params)

    def _started_elsewhere(self, previous: SandboxRecord, params: CreateParams) -> bool:
        """Whether `previous`, the same request's sandbox, is PROVISIONING by no start of this
        node's. AlreadyExists when the request_id was reused for a different request."""
        self._check_same_request(previous, params)
        pending = self._lifecycle.provisioning(previous.uid)
        return previous.state is State.PROVISIONING and pending is None

    @staticmethod
    def _check_same_request(previous: SandboxRecord, params: CreateParams) -> None:
        if previous.create_request is None:  # created before requests were kept
            return
        differing = differing_fields(previous.create_request, create_request_json(params))
        if differing:
            raise AlreadyExists(
                f"request_id {quote(params.request_id)} was already used by a different "
                f"CreateSandbox (which created {previous.name}); these fields differ: "
                f"{', '.join(differing)}. Retry with the same request, or use a new "
                "request_id for a new sandbox"
            )

    async def _replay(self, previous: SandboxRecord, params: CreateParams) -> SandboxRecord:
        """The answer to a retried Create: the sandbox the first request made, once RUNNING.
        AlreadyExists when the request_id was reused for a different request."""
        request_id = quote(params.request_id)
        self._check_same_request(previous, params)
        if previous.state is State.DELETED and previous.delete_time is not None:
            raise AlreadyExists(
                f"request_id {request_id} already created {previous.name}, which was "
                f"{previous.delete_reason} at {previous.delete_time.isoformat()}"
            )
        pending = self._lifecycle.provisioning(previous.uid)
        if pending is not None:
            return await asyncio.shield(pending)
        return previous
