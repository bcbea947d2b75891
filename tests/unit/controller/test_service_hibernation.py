"""Pause, resume and checkpoints through the real API of an in-process controller whose
containers are fakes: the controller moves a checkpoint's bytes exactly and never reads them,
keeps a sandbox untouched when a save fails, resumes it when code arrives, and never loses one
silently (docs/hibernation.md)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from controller.sandboxes import hibernation
from controller.sandboxes.warm_pool import PoolTarget
from controller.store import checkpoints
from controller.store.checkpoints import SUFFIX
from petri.v1 import execution_pb2, sandbox_pb2
from tests.filesystems import small_filesystem
from tests.unit.controller.fake_runtime import FakeContainer, FakeRuntime
from tests.unit.controller.inprocess import (
    PARENT,
    PROFILE,
    Petri,
    eventually,
    expect,
    fast_config,
    fast_petri,
    serving,
    short_runtime_dir,
    wait_for_state,
    wait_gone,
    wait_until,
)
from tests.unit.controller.standin_executor import Batch, Execution, Hang

RUNNING = sandbox_pb2.Sandbox.RUNNING
PAUSED = sandbox_pb2.Sandbox.PAUSED
TERMINATED = sandbox_pb2.Sandbox.TERMINATED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def lost(name: str, reason: str) -> execution_pb2.LostName:
    return execution_pb2.LostName(name=name, reason=reason)


async def pause(petri: Petri, name: str) -> sandbox_pb2.Sandbox:
    paused: sandbox_pb2.Sandbox = await petri.stub.PauseSandbox(
        sandbox_pb2.PauseSandboxRequest(name=name)
    )
    return paused


async def resume(petri: Petri, name: str) -> sandbox_pb2.Sandbox:
    resumed: sandbox_pb2.Sandbox = await petri.stub.ResumeSandbox(
        sandbox_pb2.ResumeSandboxRequest(name=name)
    )
    return resumed


async def wait_saved(petri: Petri, name: str) -> sandbox_pb2.Sandbox:
    """The sandbox once its (idle) checkpoint is on disk and in the registry."""

    async def check() -> sandbox_pb2.Sandbox | None:
        sandbox = await petri.get(name)
        return sandbox if sandbox.HasField("checkpoint") else None

    return await eventually(check, f"{name}'s idle checkpoint")


def checkpoint_file(petri: Petri, sandbox: sandbox_pb2.Sandbox) -> Path:
    return petri.config.checkpoint_path / f"{sandbox.uid}{SUFFIX}"


async def test_a_paused_sandbox_has_no_container_and_comes_back_byte_exact(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        await petri.execute(sandbox.name, "x = 1")
        before = await petri.executor(sandbox.name)
        before.namespace = bytes(range(256)) * 3  # any bytes: the controller never reads them
        before.workspace = b"\x00files\xff" * 5
        before.lost = [lost("gen", "TypeError: cannot pickle 'generator' object")]

        paused = await pause(petri, sandbox.name)
        assert paused.state == PAUSED and paused.checkpoint.size_bytes > 0
        assert list(paused.checkpoint.lost_names) == before.lost
        # No container, no process (removed just after the answer: the state is on disk).
        await wait_until(
            lambda: petri.runtime.container_of(sandbox.uid) is None, "the container removed"
        )
        assert checkpoint_file(petri, sandbox).is_file()
        assert (await pause(petri, sandbox.name)).state == PAUSED  # again: as it is
        listed = await petri.stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter="state = PAUSED")
        )
        assert [s.name for s in listed.sandboxes] == [sandbox.name]

        # Code on a paused sandbox resumes it first: the caller need not know.
        answer = await petri.execute(sandbox.name, "print(x)")
        assert answer.namespace_restored and answer.error.kind == 0
        assert list(answer.lost_names) == before.lost
        after = await petri.executor(sandbox.name)
        assert after is not before
        assert after.restored == (bytes(range(256)) * 3, b"\x00files\xff" * 5)
        assert answer.incarnation == after.incarnation != sandbox.incarnation
        seen = await petri.get(sandbox.name)
        assert seen.state == RUNNING and seen.incarnation == after.incarnation
        # Only the first execution after a resume says so.
        assert not (await petri.execute(sandbox.name, "1")).namespace_restored


async def test_resume_says_which_names_the_restore_lost_and_an_executor_cannot_pretend(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:

        async def claims_a_restore(execution: Execution) -> AsyncIterator[Batch]:
            yield [execution.result(namespace_restored=True, lost_names=[lost("x", "lie")])]

        petri.runtime.scripts["lie"] = claims_a_restore
        sandbox = await petri.create("one")
        answer = await petri.execute(sandbox.name, "lie")
        assert not answer.namespace_restored and list(answer.lost_names) == []

        await pause(petri, sandbox.name)
        # The next container's executor will fail to restore one global.
        original_start = petri.runtime.start

        async def start_losing_one(spec):  # type: ignore[no-untyped-def]
            await original_start(spec)
            executor = petri.runtime.containers[spec.name].executor
            assert executor is not None
            executor.restore_lost = [lost("model", "ModuleNotFoundError: No module named 'x'")]

        petri.runtime.start = start_losing_one  # type: ignore[method-assign]
        resumed = await resume(petri, sandbox.name)
        assert resumed.state == RUNNING
        answer = await petri.execute(sandbox.name, "1")
        assert answer.namespace_restored
        assert [n.name for n in answer.lost_names] == ["model"]


async def test_a_resume_claims_a_ready_warm_pool_sandbox_instead_of_starting_one(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path, warm_pool=(PoolTarget(size=1),)) as petri:
        pool = petri.controller.manager.warm_pool
        await wait_until(lambda: len(pool.ready_uids()) == 1, "a pool member")
        sandbox = await petri.create("one")  # claims the member
        await wait_until(lambda: len(pool.ready_uids()) == 1, "the pool refilled")
        (member_uid,) = pool.ready_uids()
        await pause(petri, sandbox.name)

        answer = await petri.execute(sandbox.name, "1")
        assert answer.namespace_restored
        executor = await petri.executor(sandbox.name)
        assert executor is petri.runtime.executor_of(member_uid)  # the member's container
        assert executor.restored is not None
        # The member is the sandbox now: gone from the registry's pool, and the pool refills.
        assert await petri.controller.registry.get_live("", member_uid) is None
        await wait_until(
            lambda: len(pool.ready_uids()) == 1 and member_uid not in pool.ready_uids(),
            "the pool refilled after the resume",
        )


async def test_a_pause_waits_for_the_execution_before_it(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        release = asyncio.Event()
        began = asyncio.Event()

        async def slow(execution: Execution) -> AsyncIterator[Batch]:
            began.set()
            await release.wait()
            yield [execution.result()]

        petri.runtime.scripts["slow"] = slow
        sandbox = await petri.create("one")
        running = asyncio.ensure_future(petri.execute(sandbox.name, "slow"))
        await began.wait()
        pausing = asyncio.ensure_future(pause(petri, sandbox.name))
        await asyncio.sleep(0.05)  # the pause is queued, not refused: it has not answered
        assert not pausing.done()
        assert (await petri.executor(sandbox.name)).checkpoints == 0
        release.set()
        assert (await running).execution_count == 1
        assert (await pausing).state == PAUSED


async def test_a_checkpoint_that_cannot_be_written_leaves_the_sandbox_running(
    tmp_path: Path,
) -> None:
    with small_filesystem("1m") as disk, short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir, checkpoint_dir=disk / "checkpoints")
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as petri:
                sandbox = await petri.create("one")
                await pause(petri, sandbox.name)  # a first checkpoint fits
                saved = checkpoint_file(petri, sandbox).read_bytes()
                await petri.execute(sandbox.name, "x = 1")
                (await petri.executor(sandbox.name)).namespace = os.urandom(2 << 20)

                await expect(
                    pause(petri, sandbox.name),
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "could not be written to disk: No space left on device",
                    "still RUNNING, untouched",
                )
                seen = await petri.get(sandbox.name)
                assert seen.state == RUNNING
                assert (await petri.execute(sandbox.name, "1")).execution_count == 2
                # The previous checkpoint is whole, and no partial file is left.
                assert checkpoint_file(petri, sandbox).read_bytes() == saved
                assert sorted(os.listdir(disk / "checkpoints")) == [f"{sandbox.uid}{SUFFIX}"]
        finally:
            await runtime.shutdown()


async def test_an_executor_that_fails_mid_checkpoint_leaves_everything_as_it_was(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        executor = await petri.executor(sandbox.name)
        executor.checkpoint_failure = grpc.StatusCode.UNAVAILABLE
        await expect(
            pause(petri, sandbox.name),
            grpc.StatusCode.UNAVAILABLE,
            "did not complete the checkpoint",
            "still RUNNING, untouched: retry",
        )
        assert not checkpoint_file(petri, sandbox).exists()
        executor.checkpoint_failure = None
        assert (await pause(petri, sandbox.name)).state == PAUSED  # the retry works


async def test_an_interpreter_that_dies_saving_is_not_called_untouched(tmp_path: Path) -> None:
    """The executor answers INTERNAL when the worker died or hung while it saved (a
    __reduce__ that exits): it replaced the worker, so the variables are gone; the caller is
    told so, and not to expect the pause to have kept anything."""
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        (await petri.executor(sandbox.name)).checkpoint_failure = grpc.StatusCode.INTERNAL
        details = await expect(
            pause(petri, sandbox.name),
            grpc.StatusCode.UNAVAILABLE,
            "its interpreter failed while saving its variables",
            "its variables are gone",
            "it is still RUNNING",
        )
        assert "untouched" not in details and "retry" not in details
        assert (await petri.get(sandbox.name)).state == RUNNING


async def test_delete_and_expiry_of_paused_sandboxes_remove_their_checkpoints(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path, reap_interval=timedelta(milliseconds=50)) as petri:
        deleted = await petri.create("deleted")
        expiring = await petri.create("expiring", ttl=Duration(seconds=3600))
        for sandbox in (deleted, expiring):
            await pause(petri, sandbox.name)
            assert checkpoint_file(petri, sandbox).is_file()
        await petri.delete(deleted.name)
        assert not checkpoint_file(petri, deleted).exists()
        await expect(petri.execute(deleted.name, "1"), grpc.StatusCode.NOT_FOUND, "was deleted")

        # Paused time counts: a paused sandbox expires like a running one.
        await petri.stub.UpdateSandbox(
            sandbox_pb2.UpdateSandboxRequest(
                sandbox=sandbox_pb2.Sandbox(name=expiring.name, ttl=Duration(nanos=1000)),
            )
        )
        assert "was expired at" in await wait_gone(petri, expiring.name)
        assert not checkpoint_file(petri, expiring).exists()


async def test_an_idle_sandbox_pauses_on_its_own_unless_it_says_never(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, hibernate_interval=timedelta(milliseconds=50)) as petri:
        soon = await petri.create("soon", auto_pause_after=Duration(nanos=100_000_000))
        never = await petri.create("never", auto_pause_after=Duration())
        default = await petri.create("default")
        assert default.auto_pause_after.ToTimedelta() == timedelta(minutes=15)
        assert never.auto_pause_after.ToTimedelta() == timedelta(0)
        await wait_for_state(petri, soon.name, PAUSED)
        assert (await petri.get(never.name)).state == RUNNING
        assert (await petri.get(default.name)).state == RUNNING
        await expect(
            petri.create("bad", auto_pause_after=Duration(seconds=-1)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "auto_pause_after must be 0s (never) or positive",
        )


async def test_a_sandbox_whose_container_is_lost_comes_back_from_its_idle_checkpoint(
    tmp_path: Path,
) -> None:
    async with fast_petri(
        tmp_path,
        hibernate_interval=timedelta(milliseconds=50),
        checkpoint_idle_after=timedelta(milliseconds=100),
        container_check_interval=timedelta(milliseconds=50),
    ) as petri:
        saved = await petri.create("saved")
        await petri.execute(saved.name, "x = 1")
        await wait_saved(petri, saved.name)
        petri.runtime.scripts.clear()
        await petri.runtime.vanish(saved.uid)  # podman lost it (a crash, a reboot)

        seen = await wait_for_state(petri, saved.name, PAUSED)
        assert "its container is gone; it resumes from its checkpoint of" in seen.state_message
        answer = await petri.execute(saved.name, "1")
        assert answer.namespace_restored
        assert (await petri.get(saved.name)).state_message == ""


async def test_a_sandbox_lost_without_a_checkpoint_is_terminated_saying_so(
    tmp_path: Path,
) -> None:
    async with fast_petri(
        tmp_path,
        checkpoint_idle_after=timedelta(0),
        container_check_interval=timedelta(milliseconds=50),
    ) as petri:
        sandbox = await petri.create("one")
        await petri.runtime.vanish(sandbox.uid)
        seen = await wait_for_state(petri, sandbox.name, TERMINATED)
        assert seen.state_message == "its container is gone, and it had no checkpoint"


async def test_a_stopping_controller_pauses_its_sandboxes_and_the_next_resumes_them_lazily(
    tmp_path: Path,
) -> None:
    with short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir)
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as first:
                one, two = await first.create("one"), await first.create("two")
                await first.execute(one.name, "x = 1")
            assert runtime.uids() == set()  # paused: nothing runs while no controller does
            async with serving(config, runtime) as second:
                assert (await second.get(one.name)).state == PAUSED
                assert (await second.get(two.name)).state == PAUSED
                answer = await second.execute(one.name, "x")
                assert answer.namespace_restored and answer.execution_count == 2
                assert (await second.get(two.name)).state == PAUSED  # only on first use
        finally:
            await runtime.shutdown()


async def test_a_damaged_checkpoint_terminates_its_sandbox_and_says_why(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        await pause(petri, sandbox.name)
        path = checkpoint_file(petri, sandbox)
        path.write_bytes(path.read_bytes()[:-3])  # cut short
        await expect(
            petri.execute(sandbox.name, "1"),
            PRECONDITION,
            "cannot be resumed: its checkpoint cannot be restored",
            "the checkpoint file is cut short",
            "Nothing ran",
        )
        seen = await petri.get(sandbox.name)
        assert seen.state == TERMINATED and "its checkpoint cannot be restored" in (
            seen.state_message
        )
        assert petri.runtime.uids() == set()  # the container it was resuming into went


async def test_a_caller_that_leaves_during_a_resume_does_not_stop_it(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        await pause(petri, sandbox.name)
        petri.runtime.starts_open.clear()  # the resume's container start waits
        first = asyncio.ensure_future(petri.execute(sandbox.name, "1"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the resume to start")
        first.cancel()
        second = asyncio.ensure_future(petri.execute(sandbox.name, "2"))
        await asyncio.sleep(0.05)
        petri.runtime.starts_open.set()
        answer = await second
        assert answer.namespace_restored
        assert petri.runtime.starts == 2  # one resume for both callers
        assert (await petri.get(sandbox.name)).state == RUNNING


async def test_only_running_sandboxes_pause_and_only_paused_ones_resume(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, container_check_interval=timedelta(milliseconds=50)) as petri:
        sandbox = await petri.create("one", auto_pause_after=Duration(seconds=60))
        assert (await resume(petri, sandbox.name)).state == RUNNING  # as it is
        await petri.runtime.exit(sandbox.uid)
        await wait_for_state(petri, sandbox.name, TERMINATED)
        await expect(pause(petri, sandbox.name), PRECONDITION, "is TERMINATED", "cannot be paused")
        await expect(
            resume(petri, sandbox.name), PRECONDITION, "is TERMINATED", "cannot be resumed"
        )


async def test_a_container_a_crash_left_beside_a_paused_sandbox_goes_at_start(
    tmp_path: Path,
) -> None:
    """A crash between a pause's write and its container's removal (or during a resume)
    leaves a container beside a PAUSED sandbox: the checkpoint is the sandbox, the container
    goes at the next start, with its worker uid, and the sandbox resumes into a new one."""
    with short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir)
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as first:
                sandbox = await first.create("one")
                container = runtime.container_of(sandbox.uid)
                assert container is not None
                await pause(first, sandbox.name)
            runtime.containers[container.spec.name] = FakeContainer(container.spec, None)
            async with serving(config, runtime) as second:
                assert container.spec.name not in runtime.containers
                answer = await second.execute(sandbox.name, "1")
                assert answer.namespace_restored
                assert (await second.get(sandbox.name)).state == RUNNING
        finally:
            await runtime.shutdown()


async def test_a_refused_restore_gets_a_second_container_before_the_sandbox_is_given_up(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        await pause(petri, sandbox.name)
        original_start = petri.runtime.start
        refusing = 1  # the first new container's executor refuses the archive

        async def start(spec):  # type: ignore[no-untyped-def]
            nonlocal refusing
            await original_start(spec)
            executor = petri.runtime.containers[spec.name].executor
            assert executor is not None
            executor.refuse_restore, refusing = refusing > 0, refusing - 1

        petri.runtime.start = start  # type: ignore[method-assign]
        answer = await petri.execute(sandbox.name, "1")
        assert answer.namespace_restored
        assert petri.runtime.starts == 3  # the sandbox's, the refusing one, the one that took it

        await pause(petri, sandbox.name)
        refusing = 2  # refused twice: the checkpoint is given up, saying why
        await expect(
            petri.execute(sandbox.name, "1"),
            PRECONDITION,
            "cannot be resumed: its checkpoint cannot be restored (the archive is damaged)",
        )
        assert (await petri.get(sandbox.name)).state == TERMINATED


async def test_a_stream_on_a_paused_sandbox_resumes_it_and_its_result_says_so(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        before = await petri.executor(sandbox.name)
        before.lost = [lost("sock", "TypeError: cannot pickle 'socket' object")]
        await pause(petri, sandbox.name)

        async def requests() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
            start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code="x")
            yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

        events = [event async for event in petri.stub.StreamExecuteCode(requests())]
        result = events[-1].result
        assert result.namespace_restored and [n.name for n in result.lost_names] == ["sock"]
        assert (await petri.get(sandbox.name)).state == RUNNING


async def test_a_sandbox_that_cannot_be_saved_is_not_retried_every_round_nor_starves_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each try pickles the whole namespace: one sandbox with a file it cannot read must not
    be saved again every few seconds for ever, nor keep the longest-idle places of every
    round (one project's hundred such sandboxes would stop every other project's saves)."""
    monkeypatch.setattr(hibernation, "ROUND_BATCH", 1)
    async with fast_petri(
        tmp_path,
        hibernate_interval=timedelta(milliseconds=20),
        checkpoint_idle_after=timedelta(milliseconds=200),
    ) as petri:
        stuck = await petri.create("stuck")  # the longest idle from here on
        stuck_executor = await petri.executor(stuck.name)
        stuck_executor.checkpoint_failure = grpc.StatusCode.FAILED_PRECONDITION
        healthy = await petri.create("healthy")
        healthy_executor = await petri.executor(healthy.name)

        await wait_until(lambda: healthy_executor.checkpoints >= 1, "the other's checkpoint")
        assert stuck_executor.checkpoints == 1
        assert not checkpoint_file(petri, stuck).exists()
        assert (await petri.get(stuck.name)).state == RUNNING

        # Once it has run code again, it is tried again.
        stuck_executor.checkpoint_failure = None
        await petri.execute(stuck.name, "x = 2")
        await wait_until(lambda: checkpoint_file(petri, stuck).is_file(), "its checkpoint")
        assert stuck_executor.checkpoints == 2


async def test_an_auto_pause_after_below_a_microsecond_is_not_never_nor_negative_allowed(
    tmp_path: Path,
) -> None:
    """Durations are kept in microseconds: 1 ns rounded down would be 0s, which means never
    pause, the opposite of what was asked; -1 ns rounded up would pass as 0s."""
    async with fast_petri(tmp_path) as petri:
        soon = await petri.create("soon", auto_pause_after=Duration(nanos=1))
        assert soon.auto_pause_after.ToTimedelta() == timedelta(microseconds=1)
        for bad in (Duration(nanos=-1), Duration(seconds=10**15)):
            await expect(
                petri.create("bad", auto_pause_after=bad),
                grpc.StatusCode.INVALID_ARGUMENT,
                "auto_pause_after",
            )
        updated = await petri.stub.UpdateSandbox(
            sandbox_pb2.UpdateSandboxRequest(
                sandbox=sandbox_pb2.Sandbox(name=soon.name, auto_pause_after=Duration(nanos=999)),
            )
        )
        assert updated.auto_pause_after.ToTimedelta() == timedelta(microseconds=1)
        await expect(
            petri.stub.UpdateSandbox(
                sandbox_pb2.UpdateSandboxRequest(
                    sandbox=sandbox_pb2.Sandbox(name=soon.name, auto_pause_after=Duration(nanos=-1))
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "auto_pause_after must be 0s (never) or positive",
        )


async def test_a_resume_whose_image_was_removed_says_so_and_not_to_retry(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create("one")
        await pause(petri, sandbox.name)
        image = petri.config.image_for(PROFILE)
        petri.runtime.images.discard(image)  # an operator removed it, or renamed the profile
        details = await expect(
            petri.execute(sandbox.name, "1"),
            PRECONDITION,
            f"could not resume sandbox {sandbox.name}",
            f"no image {image}",
            f"sandbox-image/build.sh {PROFILE}",
            "still PAUSED",
        )
        assert "retry" not in details
        assert (await petri.get(sandbox.name)).state == PAUSED

        petri.runtime.images.add(image)
        assert (await petri.execute(sandbox.name, "1")).namespace_restored


@pytest.mark.parametrize("by", ["pause", "idle checkpoint"])
async def test_a_save_that_ends_after_its_sandbox_was_deleted_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, by: str
) -> None:
    """Delete does not wait for a save in the sandbox's queue: it removes the checkpoint file
    while the save still syncs the new one, which would then be renamed into place after it,
    for a sandbox that no longer exists (its files and variables kept on disk for ever)."""
    syncing, deleted, published = threading.Event(), threading.Event(), threading.Event()
    sync, publish = checkpoints._sync, checkpoints._publish

    def held_sync(file: BinaryIO) -> None:
        syncing.set()
        deleted.wait(10)
        sync(file)

    def seen_publish(temporary: Path, final: Path) -> None:
        publish(temporary, final)
        published.set()

    monkeypatch.setattr(checkpoints, "_sync", held_sync)
    monkeypatch.setattr(checkpoints, "_publish", seen_publish)
    idle = by == "idle checkpoint"
    async with fast_petri(
        tmp_path,
        hibernate_interval=timedelta(milliseconds=20),
        checkpoint_idle_after=timedelta(milliseconds=50 if idle else 0),
    ) as petri:
        sandbox = await petri.create("one")
        pausing = None if idle else asyncio.ensure_future(pause(petri, sandbox.name))
        await wait_until(syncing.is_set, "the save's sync")
        await petri.delete(sandbox.name)
        deleted.set()
        if pausing is not None:
            await expect(pausing, PRECONDITION, "was deleted or terminated meanwhile")
        await wait_until(published.is_set, "the save's rename")
        await wait_until(lambda: not checkpoint_file(petri, sandbox).exists(), "no file left")
        assert os.listdir(petri.config.checkpoint_path) == []


async def test_resumes_into_new_containers_wait_their_turn_for_the_starts_at_once(
    tmp_path: Path,
) -> None:
    """A resume starts a container as a create does: a caller with many paused sandboxes
    must not start them all at once past --max-concurrent-creates; beyond it a resume waits
    its turn (and its sandbox stays PAUSED meanwhile) rather than failing."""
    async with fast_petri(tmp_path, max_concurrent_creates=1) as petri:
        slots = petri.controller.manager.create_slots
        first, second = await petri.create("first"), await petri.create("second")
        for sandbox in (first, second):
            await pause(petri, sandbox.name)
        petri.runtime.starts_open.clear()
        resuming = asyncio.ensure_future(petri.execute(first.name, "1"))
        await wait_until(lambda: petri.runtime.starts_waiting == 1, "the first resume's start")
        waiting = asyncio.ensure_future(petri.execute(second.name, "1"))
        await wait_until(lambda: slots.waiting == 1, "the second resume in line")
        assert petri.runtime.starts_waiting == 1  # one start at once
        assert (await petri.get(second.name)).state == PAUSED
        petri.runtime.starts_open.set()
        assert (await resuming).namespace_restored
        assert (await waiting).namespace_restored
        assert slots.taken == 0 and slots.waiting == 0


@pytest.mark.parametrize("setting", ["checkpoint_idle_after", "auto_pause_after"])
async def test_a_long_execution_does_not_hold_up_every_other_sandboxs_background_saves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """last_active_time is when the last execution ended: a sandbox running one long
    execution looks idle. Its save, waiting in its queue for the execution, must not hold
    the round (and with it every other sandbox's checkpoints and auto-pauses) for as long
    as that execution runs: an hour, at most; nor take the round's places (a project's
    hundred sandboxes running long executions would stop every other project's saves)."""
    monkeypatch.setattr(hibernation, "ROUND_BATCH", 1)
    idle = timedelta(milliseconds=100)
    pause_after = Duration(nanos=100_000_000) if setting == "auto_pause_after" else Duration()
    rounds = 0
    one_round = hibernation.Hibernation.hibernate_idle

    async def counted_round(self: hibernation.Hibernation) -> None:
        nonlocal rounds
        rounds += 1
        await one_round(self)

    monkeypatch.setattr(hibernation.Hibernation, "hibernate_idle", counted_round)
    async with fast_petri(
        tmp_path,
        hibernate_interval=timedelta(milliseconds=20),
        checkpoint_idle_after=idle if setting == "checkpoint_idle_after" else timedelta(0),
    ) as petri:
        hang = Hang()
        petri.runtime.scripts["hang"] = hang
        busy = await petri.create("busy", auto_pause_after=pause_after)
        running = asyncio.ensure_future(petri.execute(busy.name, "hang"))
        await hang.began.wait()
        due = busy.last_active_time.ToDatetime(tzinfo=UTC) + idle
        await wait_until(lambda: datetime.now(UTC) > due, "the busy one to look idle")
        seen = rounds
        await wait_until(lambda: rounds > seen, "a round that finds it")
        other = await petri.create("other", auto_pause_after=pause_after)
        await petri.execute(other.name, "x = 1")
        other_executor = await petri.executor(other.name)

        await wait_until(lambda: other_executor.checkpoints >= 1, "the other's save")
        assert (await petri.executor(busy.name)).checkpoints == 0
        assert (await petri.get(busy.name)).state == RUNNING
        running.cancel()


async def test_a_slow_background_save_does_not_hold_up_the_others(tmp_path: Path) -> None:
    """A round used to wait for all its saves: one that takes minutes (a namespace whose
    __reduce__ dawdles, gigabytes of files) stopped every other sandbox's checkpoints and
    auto-pauses until it ended."""
    async with fast_petri(
        tmp_path,
        hibernate_interval=timedelta(milliseconds=20),
        checkpoint_idle_after=timedelta(milliseconds=300),
    ) as petri:
        slow = await petri.create("slow")
        slow_executor = await petri.executor(slow.name)
        slow_executor.checkpoint_hold = asyncio.Event()  # long before its idle save starts
        await wait_until(lambda: slow_executor.checkpoints == 1, "the slow save to start")
        other = await petri.create("other")
        await petri.execute(other.name, "y = 1")
        other_executor = await petri.executor(other.name)

        await wait_until(lambda: checkpoint_file(petri, other).is_file(), "the other's save")
        assert not checkpoint_file(petri, slow).exists()
        started = slow_executor.checkpoints
        slow_executor.checkpoint_hold.set()
        await wait_until(lambda: checkpoint_file(petri, slow).is_file(), "the slow one's save")
        assert slow_executor.checkpoints == started  # it was not started twice meanwhile
        assert other_executor.checkpoints >= 1


async def test_code_sent_as_a_lost_sandbox_comes_back_waits_for_its_old_container_to_go(
    tmp_path: Path,
) -> None:
    """Recovered (PAUSED) before its dead container is removed: an execution that comes at
    once resumes into the same container name and socket directory, after the removal."""
    async with fast_petri(
        tmp_path,
        hibernate_interval=timedelta(milliseconds=50),
        checkpoint_idle_after=timedelta(milliseconds=100),
        container_check_interval=timedelta(milliseconds=50),
    ) as petri:
        sandbox = await petri.create("one")
        await wait_saved(petri, sandbox.name)
        petri.runtime.remove_seconds = 0.5  # a slow podman
        await petri.runtime.exit(sandbox.uid)  # dead, still listed
        await wait_for_state(petri, sandbox.name, PAUSED)
        answer = await petri.execute(sandbox.name, "1")
        assert answer.namespace_restored
