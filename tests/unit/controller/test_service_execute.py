"""Executions through the real API into stand-in executors: queueing, input files, a delete or a
cancel during an execution, and sandboxes whose executor or container dies (TERMINATED, with
why)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc

from petri.v1 import execution_pb2, sandbox_pb2
from tests.unit.controller.inprocess import expect, fast_petri, wait_for_state
from tests.unit.controller.standin_executor import Batch, Event, Execution, Hang

TERMINATED = sandbox_pb2.Sandbox.TERMINATED
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def test_results_reach_the_caller_and_the_sandbox_counts_them(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()
        first = await petri.execute(sandbox.name, "a = 1")
        second = await petri.execute(sandbox.name, "a")
        assert (first.stdout, second.stdout) == ("ran a = 1\n", "ran a\n")
        assert (first.execution_count, second.execution_count) == (1, 2)
        executor = petri.runtime.executor_of(sandbox.uid)
        assert second.incarnation == executor.incarnation
        seen = await petri.get(sandbox.name)
        assert (seen.execution_count, seen.incarnation) == (2, executor.incarnation)
        assert seen.last_active_time.ToDatetime() >= sandbox.last_active_time.ToDatetime()
        # The executor got the server's limits and the default timeout with the code.
        request = executor.executions[0].request
        assert request.timeout.ToTimedelta() == petri.config.default_timeout
        assert request.max_stream_bytes == petri.config.max_output_bytes
        assert request.max_output_files == petri.config.max_output_files


async def test_input_files_reach_the_executor_by_either_call(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()
        files = [execution_pb2.File(path="data/a.csv", content=b"1,2\n")]
        await petri.execute(sandbox.name, "unary", files=files)

        async def stream() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
            start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code="streamed")
            yield sandbox_pb2.StreamExecuteCodeRequest(start=start)
            for part in (b"ab", b"cd"):
                chunk = execution_pb2.FileChunk(path="b.bin", data=part, final=part == b"cd")
                yield sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk)

        events = [e async for e in petri.stub.StreamExecuteCode(stream())]
        assert events[-1].HasField("result")
        executions = petri.runtime.executor_of(sandbox.uid).executions
        assert [e.files for e in executions] == [{"data/a.csv": b"1,2\n"}, {"b.bin": b"abcd"}]


async def test_executions_of_one_sandbox_run_one_at_a_time(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()
        running = 0
        most = 0

        async def counted(execution: Execution) -> AsyncIterator[Batch]:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)  # the work: the other calls arrive meanwhile
            running -= 1
            yield [execution.result()]

        petri.runtime.scripts["counted"] = counted
        answers = await asyncio.gather(*(petri.execute(sandbox.name, "counted") for _ in range(5)))
        assert sorted(a.execution_count for a in answers) == [1, 2, 3, 4, 5]
        assert most == 1


async def test_a_delete_during_an_execution_interrupts_it(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()
        hang = Hang()
        petri.runtime.scripts["hang"] = hang
        execution = asyncio.ensure_future(petri.execute(sandbox.name, "hang"))
        await hang.began.wait()
        await petri.delete(sandbox.name)
        await expect(execution, PRECONDITION, f"sandbox {sandbox.name} was deleted during")
        await asyncio.wait_for(hang.interrupted.wait(), 5)
        assert petri.runtime.container_of(sandbox.uid) is None
        await expect(petri.get(sandbox.name), grpc.StatusCode.NOT_FOUND, "was deleted at")


async def test_a_delete_answers_the_execution_even_when_the_channel_closes_first(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        petri.runtime.executors_outlive_remove = True  # the channel closes before the socket
        sandbox = await petri.create()
        hang = Hang()
        petri.runtime.scripts["hang"] = hang
        execution = asyncio.ensure_future(petri.execute(sandbox.name, "hang"))
        await hang.began.wait()
        await petri.delete(sandbox.name)
        async with asyncio.timeout(2):
            await expect(execution, PRECONDITION, f"sandbox {sandbox.name} was deleted during")


async def test_a_caller_that_cancels_interrupts_the_code_and_the_sandbox_goes_on(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()
        hang = Hang()
        petri.runtime.scripts["hang"] = hang
        call = petri.stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="hang")
        )
        await hang.began.wait()
        call.cancel()
        await asyncio.wait_for(hang.interrupted.wait(), 5)
        assert (await petri.execute(sandbox.name, "next")).stdout == "ran next\n"


async def test_an_executor_that_dies_during_an_execution_terminates_the_sandbox(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()

        async def dies(execution: Execution) -> AsyncIterator[Batch]:
            yield [Event(stdout="about to die\n")]
            await petri.runtime.exit(sandbox.uid, exit_code=137)  # kill -9 of the daemon
            yield [execution.result()]  # never sent: the call ended with the process

        petri.runtime.scripts["die"] = dies
        await expect(
            petri.execute(sandbox.name, "die"),
            PRECONDITION,
            "is TERMINATED: its container was killed by signal 9",
            "the code may have run",
        )
        seen = await petri.get(sandbox.name)
        assert seen.state == TERMINATED
        assert seen.state_message == "its container was killed by signal 9"
        await expect(
            petri.execute(sandbox.name, "1"), PRECONDITION, "is TERMINATED", "cannot run code"
        )
        await petri.delete(sandbox.name)  # a TERMINATED sandbox can still be deleted
        assert petri.runtime.container_of(sandbox.uid) is None


async def test_containers_that_die_between_executions_are_found_terminated(
    tmp_path: Path,
) -> None:
    check = timedelta(milliseconds=50)
    async with fast_petri(tmp_path, container_check_interval=check) as petri:
        oom, gone, fine = (
            await petri.create("oom"),
            await petri.create("gone"),
            await petri.create(),
        )
        await petri.runtime.exit(oom.uid, exit_code=137, oom_killed=True)
        await petri.runtime.vanish(gone.uid)
        seen = await wait_for_state(petri, oom.name, TERMINATED)
        assert seen.state_message == (
            "its container was killed for using too much memory, and it had no checkpoint"
        )
        seen = await wait_for_state(petri, gone.name, TERMINATED)
        assert seen.state_message == "its container is gone, and it had no checkpoint"
        assert (await petri.get(fine.name)).state == sandbox_pb2.Sandbox.RUNNING


async def test_an_executor_that_stops_answering_is_terminated_and_removed(tmp_path: Path) -> None:
    slack = timedelta(milliseconds=200)
    async with fast_petri(tmp_path, executor_slack=slack) as petri:
        sandbox = await petri.create()
        petri.runtime.scripts["stuck"] = Hang()  # ignores its timeout, as a wedged daemon would
        request = sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="stuck")
        request.timeout.FromMilliseconds(100)
        await expect(
            petri.stub.ExecuteCode(request),
            grpc.StatusCode.UNKNOWN,
            "its executor stopped answering",
            "the code may have run",
            "create a new sandbox",
        )
        seen = await petri.get(sandbox.name)
        assert seen.state == TERMINATED
        assert "its executor stopped answering" in seen.state_message
        assert petri.runtime.container_of(sandbox.uid) is None  # it cannot be trusted


async def test_an_executor_refusing_the_key_is_unavailable_and_nothing_ran(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        sandbox = await petri.create()
        executor = petri.runtime.executor_of(sandbox.uid)
        executor.key = "another sandbox's key"  # a socket that is not this sandbox's executor
        await expect(
            petri.execute(sandbox.name, "1"),
            grpc.StatusCode.UNAVAILABLE,
            "the code did not run: retry",
        )
        assert executor.refused_calls >= 1 and executor.executions == []
        assert (await petri.get(sandbox.name)).state == sandbox_pb2.Sandbox.RUNNING
