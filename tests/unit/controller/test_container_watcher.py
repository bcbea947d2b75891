"""The container watcher (issue 16): podman's event stream finds a container that died within
moments, with the slow poll set so long (10 min) that only events can find it; the stream
ending (a restarted podman service) subscribes again and checks everything once; and events
of the controller's own creates, pauses and deletes terminate nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from controller.errors import Unavailable
from controller.records import State
from controller.runtime.container import ContainerEvent
from controller.sandboxes.reconciler import Reconciler
from controller.sandboxes.warm_pool import PoolTarget
from petri.v1 import sandbox_pb2
from tests.unit.controller.inprocess import Petri, fast_petri, wait_for_state, wait_until

RUNNING, PAUSED = sandbox_pb2.Sandbox.RUNNING, sandbox_pb2.Sandbox.PAUSED
TERMINATED = sandbox_pb2.Sandbox.TERMINATED
KILLED = "its container was killed by signal 9, and it had no checkpoint"
SLOW_POLL = timedelta(minutes=10)  # never within a test: only events find a dead container


def reconciler(petri: Petri) -> Reconciler:
    found: Reconciler = petri.controller.manager._reconciler
    return found


def tell(petri: Petri, name: str, action: str) -> None:
    """An event of container `name` on every stream, whatever the container's state."""
    for stream in petri.runtime.subscriptions:
        if not stream.closed:
            stream.put(ContainerEvent(name, action))


async def test_a_died_event_terminates_the_sandbox_saying_why(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, container_check_interval=SLOW_POLL) as petri:
        oom, killed, gone, fine = [await petri.create(n) for n in ("oom", "killed", "gone", "ok")]
        await petri.runtime.exit(oom.uid, exit_code=137, oom_killed=True)
        await petri.runtime.exit(killed.uid, exit_code=137)
        await petri.runtime.vanish(gone.uid)
        seen = await wait_for_state(petri, oom.name, TERMINATED)
        assert seen.state_message == (
            "its container was killed for using too much memory, and it had no checkpoint"
        )
        seen = await wait_for_state(petri, killed.name, TERMINATED)
        assert seen.state_message == KILLED
        seen = await wait_for_state(petri, gone.name, TERMINATED)
        assert seen.state_message == "its container is gone, and it had no checkpoint"
        assert (await petri.get(fine.name)).state == RUNNING
        assert reconciler(petri).subscriptions == 1


async def test_a_burst_of_deaths_is_checked_in_few_rounds(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, container_check_interval=SLOW_POLL) as petri:
        sandboxes = [await petri.create(f"s{i}") for i in range(12)]
        for sandbox in sandboxes:
            await petri.runtime.exit(sandbox.uid)
        for sandbox in sandboxes:
            await wait_for_state(petri, sandbox.name, TERMINATED)


async def test_an_ended_stream_is_subscribed_again_and_everything_checked_once(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path, container_check_interval=SLOW_POLL) as petri:
        runtime = petri.runtime
        missed, later = await petri.create("missed"), await petri.create("later")
        await wait_until(lambda: runtime.live_subscriptions() == 1, "the first subscription")
        runtime.events_open.clear()  # the podman service is down: subscribing waits
        runtime.end_events()
        await wait_until(lambda: runtime.live_subscriptions() == 0, "the stream to be closed")
        await runtime.exit(missed.uid)  # no stream hears of it
        assert (await petri.get(missed.name)).state == RUNNING
        runtime.events_open.set()  # the service is back
        seen = await wait_for_state(petri, missed.name, TERMINATED)  # the check after subscribing
        assert seen.state_message == KILLED
        assert reconciler(petri).subscriptions == 2
        await runtime.exit(later.uid)  # and the new stream's events are followed
        await wait_for_state(petri, later.name, TERMINATED)


async def test_a_stream_that_cannot_be_subscribed_is_retried(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, container_check_interval=SLOW_POLL) as petri:
        runtime = petri.runtime
        sandbox = await petri.create("one")
        runtime.events_error = Unavailable("podman is not answering")
        runtime.end_events()
        await wait_until(lambda: runtime.live_subscriptions() == 0, "the stream to be closed")
        await runtime.exit(sandbox.uid)
        runtime.events_error = None
        await wait_for_state(petri, sandbox.name, TERMINATED)


async def test_events_of_the_controllers_own_work_terminate_nothing(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, container_check_interval=SLOW_POLL) as petri:
        runtime = petri.runtime
        alive, paused, deleted = [await petri.create(n) for n in ("alive", "paused", "deleted")]
        await wait_until(lambda: runtime.live_subscriptions() == 1, "the subscription")
        # A create under way: its container is not there yet, then starting.
        runtime.starts_open.clear()
        creating = asyncio.ensure_future(petri.create("creating"))
        await wait_until(lambda: runtime.starts_waiting == 1, "the create's container start")
        records = await petri.controller.registry.list_live()
        (provisioning,) = [r for r in records if r.state is State.PROVISIONING]
        before = reconciler(petri).named_checked
        tell(petri, provisioning.container_name, "died")
        tell(petri, provisioning.container_name, "remove")
        # A running container's stale event (of a previous incarnation of its name).
        record = next(r for r in records if r.uid == alive.uid)
        tell(petri, record.container_name, "died")
        await wait_until(
            lambda: reconciler(petri).named_checked >= before + 2, "the events to be checked"
        )
        runtime.starts_open.set()
        created = await creating
        # The controller's own pause and delete remove containers: events, no TERMINATED.
        await petri.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=paused.name))
        await petri.delete(deleted.name)
        await wait_until(lambda: runtime.container_of(paused.uid) is None, "the pause's remove")
        victim = await petri.create("victim")
        await runtime.exit(victim.uid)  # after the others' events: checked after them
        await wait_for_state(petri, victim.name, TERMINATED)
        await wait_until(lambda: runtime.live_subscriptions() == 1, "the same subscription")
        assert (await petri.get(alive.name)).state == RUNNING
        assert (await petri.get(created.name)).state == RUNNING
        seen = await petri.get(paused.name)
        assert seen.state == PAUSED and seen.state_message == ""
        await petri.execute(alive.name, "1")
        await petri.execute(created.name, "1")


async def test_a_warm_pool_member_that_dies_is_discarded_at_once(tmp_path: Path) -> None:
    async with fast_petri(
        tmp_path, container_check_interval=SLOW_POLL, warm_pool=(PoolTarget(size=1),)
    ) as petri:
        pool = petri.controller.manager.warm_pool
        await wait_until(lambda: len(pool.ready_uids()) == 1, "a pool member")
        (member,) = pool.ready_uids()
        await petri.runtime.exit(member)
        await wait_until(lambda: member not in pool.ready_uids(), "the dead member to go")
        await wait_until(lambda: petri.runtime.container_of(member) is None, "its removal")
        assert (await petri.create("claims")).uid != member
