"""Executions: one sandbox's run in arrival order, each with a deadline for its executor.

An execution's events come straight from the sandbox's executor; this module queues it behind
the sandbox's earlier executions, keeps the bookkeeping (execution_count, incarnation,
last_active_time), and finds out when an executor is stuck or gone: a stuck executor's
sandbox is marked TERMINATED and its container removed, so it holds no queue for ever.
"""

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import datetime, timedelta

import structlog

from controller.config import Config
from controller.errors import (
    DeadlineExceeded,
    ExecutorFailed,
    FailedPrecondition,
    OutcomeUnknown,
    Unavailable,
)
from controller.metrics import Metrics
from controller.names import SandboxName
from controller.records import LostName, SandboxRecord, State
from controller.runtime.container import ContainerRuntime
from controller.sandboxes.hibernation import Hibernation, lost_names
from controller.sandboxes.lifecycle import Lifecycle, checked_incarnation
from controller.sandboxes.lookup import Lookup, terminated_reason
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.queues import Queues
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.specs import SpecPolicy
from controller.store.registry import Registry
from controller.units import format_duration
from petri.v1 import execution_pb2, executor_pb2

log = structlog.get_logger()

# Beyond the kill grace, how long an executor whose caller left an execution may take to
# answer a status call before its sandbox is marked TERMINATED as stuck.
ANSWER_CHECK_SLACK = timedelta(seconds=5)
_MAY_HAVE_RUN = "the code may have run (it had been sent to the sandbox)"


class Executions:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        containers: ContainerRuntime,
        policy: SpecPolicy,
        provisioner: Provisioner,
        lifecycle: Lifecycle,
        lookup: Lookup,
        quotas: Quotas,
        clock: Callable[[], datetime],
        queues: Queues,
        hibernation: Hibernation,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._registry = registry
        self._containers = containers
        self._policy = policy
        self._provisioner = provisioner
        self._lifecycle = lifecycle
        self._lookup = lookup
        self._quotas = quotas
        self._clock = clock
        self._queues = queues
        self._hibernation = hibernation
        self._metrics = metrics
        # Checks that an executor still answers after an execution its caller left, by
        # sandbox uid: held here so none is garbage-collected, and cancelled on close.
        self._answer_checks: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<Executions {self._queues!r} checks={len(self._answer_checks)}>"

    async def close(self) -> None:
        checks = list(self._answer_checks.values())
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)

    async def execute(
        self,
        name: SandboxName,
        code: str,
        timeout: timedelta | None,
        inputs: AsyncIterator[execution_pb2.FileChunk] | None = None,
    ) -> AsyncGenerator[executor_pb2.ExecuteEvent, None]:
        """Sends the input files, runs the code after the executions queued before it, and
        yields the executor's events. `inputs` must be checked already (file_inputs).

        Close the iterator (contextlib.aclosing) to interrupt the execution early.
        """
        self._policy.check_code(code)
        effective_timeout = self._policy.execution_timeout(timeout)
        record = await self._lookup.held(name)
        self._require_running_or_paused(record)
        self._quotas.count_execute(record.project)
        request = executor_pb2.ExecuteRequest(
            code=code,
            max_stream_bytes=self._config.max_output_bytes,
            max_input_bytes=self._config.max_input_bytes,
            max_output_file_bytes=self._config.max_output_file_bytes,
            max_output_files=self._config.max_output_files,
        )
        request.timeout.FromTimedelta(effective_timeout)
        request.kill_grace.FromTimedelta(self._config.kill_grace)
        lock = self._queues.of(record.uid)
        queued = lock.locked()
        async with lock:
            # It may have changed while this execution waited its turn, or moved to another
            # node (a drain) since it was read.
            if queued or self._queues.moved(record.uid):
                record = await self._lookup.held(name)  # or moved to another node
                self._require_running_or_paused(record)
            if record.state is State.PAUSED:  # resumed first: the caller need not know
                record = await asyncio.shield(self._hibernation.resume_queued(record))
                self._require_running_or_paused(record)
            restore_report = record.restore_report
            # A stuck executor must not hold this sandbox's queue for ever: once the request
            # and the input files are sent, it has this long to answer, not counting the time
            # the caller takes to take each event. The upload has as long again, which is not
            # the code's time.
            answer_within = (
                effective_timeout + self._config.kill_grace + self._config.executor_slack
            )
            seconds = answer_within.total_seconds()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            waiting: asyncio.Timeout | None = None
            sent = False

            def start_the_clock() -> None:
                nonlocal sent, deadline
                sent = True
                deadline = loop.time() + seconds
                if waiting is not None and not waiting.expired():
                    waiting.reschedule(deadline)

            if inputs is not None:
                inputs = self._metrics.counted_inputs(inputs)
            events = self._provisioner.client_for(record).execute(request, inputs, start_the_clock)
            answered = False
            try:
                # Closing `events` interrupts the code: a caller that went away.
                async with contextlib.aclosing(events):
                    while True:
                        async with asyncio.timeout_at(deadline) as waiting:
                            event = await anext(events, None)
                        waiting = None
                        if event is None:
                            break
                        if event.HasField("result"):
                            answered = True
                            _report_restore(event.result, restore_report)
                            self._record_execution(record, event.result)
                        else:
                            self._metrics.output_bytes.inc(event.ByteSize())
                        paused = loop.time()
                        yield event
                        deadline += loop.time() - paused
            except (asyncio.CancelledError, GeneratorExit):
                # The caller left before the result: nobody waits out the deadline below, so
                # a stuck executor would go unnoticed; ask it, in the background, if it answers.
                if not answered:
                    self._check_answering(record)
                raise
            except TimeoutError:
                if not sent:
                    raise DeadlineExceeded(
                        f"the input files of this execution did not all arrive within "
                        f"{format_duration(answer_within)}: send them, then half-close the "
                        "request stream; nothing ran"
                    ) from None
                raise await asyncio.shield(
                    asyncio.ensure_future(self._executor_stuck(record, answer_within))
                ) from None
            except ExecutorFailed as exc:
                raise await self._executor_failed(record, exc, sent) from exc

    def _require_running_or_paused(self, record: SandboxRecord) -> None:
        if record.state not in (State.RUNNING, State.PAUSED):
            detail = f": {record.state_message}" if record.state_message else ""
            raise FailedPrecondition(
                f"sandbox {record.name} is {record.state.name}{detail}; it cannot run code",
                **terminated_reason(record),
            )

    def _record_execution(self, record: SandboxRecord, result: executor_pb2.ExecuteResult) -> None:
        now = self._clock()
        took = result.duration
        self._metrics.execution_result(
            result.error.kind, took.seconds + took.nanos / 1e9, result.namespace_reset
        )
        # The executor's words are the sandbox's: keep them sane before storing them.
        record.execution_count = max(record.execution_count, min(result.execution_count, 2**62))
        record.incarnation = checked_incarnation(result.incarnation)
        # Bookkeeping, off the reply's path: queued on the registry's thread, so any read
        # after this one sees it.
        reported = {"restore_report": None} if result.namespace_restored else {}
        self._registry.set_fields_soon(
            record.uid,
            execution_count=record.execution_count,
            incarnation=record.incarnation,
            last_active_time=now,
            update_time=now,
            **reported,
        )

    async def _executor_failed(
        self, record: SandboxRecord, failure: ExecutorFailed, sent: bool
    ) -> Exception:
        """The error for a call the executor ended without a result; `sent`: the request and
        its inputs were all sent, so the code may have run. (The executor's refusals of a
        request or its inputs come from the client as InvalidArgument or ResourceExhausted.)"""
        code, said = failure.code, failure.details  # the client bounds the executor's words
        # The executor refuses a call without its key before it reads a message.
        may_have_run = sent and not failure.refused
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is State.DEPROVISIONING:
            return FailedPrecondition(f"sandbox {record.name} was deleted during the execution")
        status = await self._containers.status(record.container_name)
        if status is None or not status.running:
            why = (
                "its container is gone" if status is None else f"its container {status.describe()}"
            )
            await self._lifecycle.terminate(current, why)
            return FailedPrecondition(
                f"sandbox {record.name} is TERMINATED: {why}; "
                + (_MAY_HAVE_RUN if may_have_run else "the code did not run"),
                reason="SANDBOX_TERMINATED",
                metadata={"state_message": why},
            )
        if not may_have_run:
            return Unavailable(
                f"could not reach the executor of sandbox {record.name} ({code}: {said}); "
                "the code did not run: retry"
            )
        return OutcomeUnknown(
            f"lost contact with the executor of sandbox {record.name} during the execution "
            f"({code}: {said}); {_MAY_HAVE_RUN}: check the sandbox before running it again"
        )

    async def _executor_stuck(self, record: SandboxRecord, waited: timedelta) -> Exception:
        """Marks TERMINATED a sandbox whose executor did not answer in time, and removes its
        container; returns the caller's error."""
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is State.DEPROVISIONING:
            return FailedPrecondition(f"sandbox {record.name} was deleted during the execution")
        why = (
            f"its executor stopped answering (an execution got no result within "
            f"{format_duration(waited)}: its timeout, the kill grace and "
            f"{format_duration(self._config.executor_slack)}); its container was removed"
        )
        if current.state is State.RUNNING:
            await self._remove_stuck(current, why)
        elif current.state_message:  # terminated meanwhile (its container died): say why
            why = current.state_message
        return OutcomeUnknown(
            f"sandbox {record.name} is TERMINATED: {why}; {_MAY_HAVE_RUN}; create a new sandbox"
        )

    async def _remove_stuck(self, current: SandboxRecord, why: str) -> None:
        """Marks TERMINATED a RUNNING sandbox whose executor stopped answering and removes its
        container (a stuck executor cannot be trusted to stop what it runs); its last output
        goes to the log."""
        logs = await self._containers.logs_tail(current.container_name, 20)
        log.warning("an executor stopped answering", sandbox=current.name, logs=logs)
        # TERMINATED first: the container check must not find it RUNNING without a container.
        await self._lifecycle.terminate(current, why)
        await self._containers.remove(current.container_name)

    def _check_answering(self, record: SandboxRecord) -> None:
        """Starts a check that the sandbox's executor answers, unless one is under way."""
        if record.uid in self._answer_checks:
            return
        task = asyncio.get_running_loop().create_task(self._answering_or_terminated(record))
        self._answer_checks[record.uid] = task
        task.add_done_callback(lambda _: self._answer_checks.pop(record.uid, None))

    async def _answering_or_terminated(self, record: SandboxRecord) -> None:
        """Asks the executor of a sandbox whose caller left an execution for its status, and
        marks the sandbox TERMINATED if it does not answer: a healthy one answers at once, even
        while it interrupts the code or runs the next execution."""
        client = self._provisioner.current_client(record.uid)
        if client is None:
            return  # terminated or deleted meanwhile: nothing left to check
        waited = self._config.kill_grace + ANSWER_CHECK_SLACK
        try:
            await client.status(timeout=waited.total_seconds())
            return
        except ExecutorFailed as exc:
            if not exc.timed_out:
                # Gone rather than stuck (a container that died, a delete that closed the
                # channel): the container check and the delete deal with those.
                log.info("executor check failed", sandbox=record.name, code=exc.code)
                return
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is not State.RUNNING:
            return  # deleted, being deleted or terminated meanwhile
        if self._provisioner.current_client(record.uid) is not client:
            return  # a new client (an adopted sandbox): this answer is not about it
        await self._remove_stuck(
            current,
            f"its executor stopped answering (no status within {format_duration(waited)} "
            "after its caller left an execution); its container was removed",
        )


def _report_restore(
    result: executor_pb2.ExecuteResult, report: "tuple[LostName, ...] | None"
) -> None:
    """Says on the first result after a resume that the namespace was restored, and which
    names were not; clears whatever the executor put there (only the controller knows)."""
    result.namespace_restored = report is not None
    del result.lost_names[:]
    if report is not None:
        result.lost_names.extend(lost_names(report))
