"""An executor is as hostile as the code it runs: whatever it sends, the caller gets output
within the caps (cut with a marker), files within the limits and with valid paths, a bounded
list of what was omitted, and the sandbox's record stays sane (controller/sandboxes/results.py
and the manager's bookkeeping)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from controller.sandboxes.results import (
    MAX_OMITTED_ENTRIES,
    MAX_OMITTED_PATH_BYTES,
    MAX_OMITTED_REASON_BYTES,
    MAX_UNLISTED_COUNT,
)
from petri.v1 import execution_pb2, executor_pb2, sandbox_pb2
from tests.unit.controller.inprocess import Petri, expect, fast_petri
from tests.unit.controller.standin_executor import (
    Batch,
    Event,
    Execution,
    Refuse,
    Script,
    file_chunk,
    sends,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
OUTPUT_CAP = 1000
FILE_BYTES = 4000
FILES = 3
LIMITS = {
    "max_output_bytes": OUTPUT_CAP,
    "max_output_file_bytes": FILE_BYTES,
    "max_output_files": FILES,
}


@contextlib.asynccontextmanager
async def scripted(
    tmp_path: Path, script: Script, **overrides: int
) -> AsyncIterator[tuple[Petri, str]]:
    """A controller with small output limits, and a sandbox whose executor runs `script` for
    the code "hostile"."""
    async with fast_petri(tmp_path, **{**LIMITS, **overrides}) as petri:
        petri.runtime.scripts["hostile"] = script
        sandbox = await petri.create()
        yield petri, sandbox.name


async def streamed(petri: Petri, name: str) -> list[sandbox_pb2.StreamExecuteCodeResponse]:
    async def requests() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
        start = sandbox_pb2.ExecuteCodeStart(name=name, code="hostile")
        yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

    return [event async for event in petri.stub.StreamExecuteCode(requests())]


def marker(stream: str) -> str:
    return f"\n[petri: output truncated: {stream} exceeded {OUTPUT_CAP} bytes]\n"


FLOOD = sends(
    [Event(stdout="a" * 600), Event(stderr="x" + "é" * 700)],
    [Event(stdout="b" * 600), Event(stderr="more")],
    lambda execution: [execution.result()],
)


async def test_stdout_and_stderr_beyond_the_cap_are_cut_with_a_marker(tmp_path: Path) -> None:
    async with scripted(tmp_path, FLOOD) as (petri, name):
        response = await petri.execute(name, "hostile")
        assert response.stdout == "a" * 600 + "b" * 400 + marker("stdout")
        assert response.stderr.endswith(marker("stderr"))
        kept = response.stderr.removesuffix(marker("stderr"))
        assert kept == "x" + "é" * 499  # cut on a character boundary, within the cap
        assert response.output_truncated

        events = await streamed(petri, name)
        stdout = "".join(e.stdout for e in events if e.HasField("stdout"))
        assert stdout == "a" * 600 + "b" * 400 + marker("stdout")
        assert events[-1].result.output_truncated


async def test_rich_outputs_beyond_the_cap_are_dropped(tmp_path: Path) -> None:
    big = execution_pb2.Output(kind=execution_pb2.Output.DISPLAY, text={"text/plain": "o" * 400})
    script = sends([Event(output=big)] * 3, lambda execution: [execution.result()])
    async with scripted(tmp_path, script) as (petri, name):
        response = await petri.execute(name, "hostile")
        assert len(response.outputs) == 2 and response.output_truncated


BAD_PATHS = ["../escape", "/etc/passwd", "a//b", "./x", "nul\0byte", "", "y" * 5000]


async def test_files_with_invalid_paths_are_dropped_and_listed(tmp_path: Path) -> None:
    chunks = [file_chunk(path, b"evil") for path in BAD_PATHS] + [file_chunk("ok.txt", b"fine")]
    script = sends(chunks, lambda execution: [execution.result()])
    async with scripted(tmp_path, script, max_output_files=1000) as (petri, name):
        response = await petri.execute(name, "hostile")
        assert [(f.path, f.content) for f in response.files] == [("ok.txt", b"fine")]
        # Listed, the overlong one cut to the listing's bound.
        cut = "y" * (MAX_OMITTED_PATH_BYTES - 3) + "..."
        assert [o.path for o in response.omitted_files] == [*BAD_PATHS[:-1], cut]
        assert {o.reason for o in response.omitted_files} == {"the sandbox sent an invalid path"}

        events = await streamed(petri, name)
        paths = {e.output_chunk.path for e in events if e.HasField("output_chunk")}
        assert paths == {"ok.txt"}


async def test_files_beyond_the_count_are_omitted(tmp_path: Path) -> None:
    chunks = [file_chunk(f"f{i}.txt", b"x") for i in range(FILES + 2)]
    script = sends(chunks, lambda execution: [execution.result()])
    async with scripted(tmp_path, script) as (petri, name):
        response = await petri.execute(name, "hostile")
        assert [f.path for f in response.files] == [f"f{i}.txt" for i in range(FILES)]
        assert [(o.path, o.reason) for o in response.omitted_files] == [
            (f"f{i}.txt", f"more than {FILES} files") for i in (FILES, FILES + 1)
        ]


async def test_a_file_beyond_the_byte_limit_is_cut_and_not_returned(tmp_path: Path) -> None:
    whole = [file_chunk("whole.bin", b"w" * 3000)]
    cut = [
        file_chunk("cut.bin", b"c" * 700, final=False, size=2100),
        file_chunk("cut.bin", b"c" * 700, final=False),
        file_chunk("cut.bin", b"c" * 700),
    ]
    script = sends(whole, cut, lambda execution: [execution.result()])
    async with scripted(tmp_path, script) as (petri, name):
        response = await petri.execute(name, "hostile")
        assert [(f.path, f.size) for f in response.files] == [("whole.bin", 3000)]
        [omitted] = response.omitted_files
        assert (omitted.path, omitted.size) == ("cut.bin", 2100)
        assert "file limit; the file is incomplete" in omitted.reason

        # A stream shows the caller where the cut file ends: an empty final chunk.
        events = await streamed(petri, name)
        sent = [e.output_chunk for e in events if e.output_chunk.path == "cut.bin"]
        assert sum(len(c.data) for c in sent) <= FILE_BYTES - 3000
        assert sent[-1].final and not sent[-1].data


async def test_interleaved_and_repeated_files_are_not_returned_whole(tmp_path: Path) -> None:
    script = sends(
        [
            file_chunk("a.txt", b"first half", final=False, size=20),
            file_chunk("b.txt", b"b"),  # a.txt never finished
            file_chunk("a.txt", b"second half"),  # and comes back
        ],
        lambda execution: [execution.result()],
    )
    async with scripted(tmp_path, script) as (petri, name):
        response = await petri.execute(name, "hostile")
        assert [f.path for f in response.files] == ["b.txt"]
        reasons = [(o.path, o.reason) for o in response.omitted_files]
        assert reasons == [
            ("a.txt", "the sandbox ended the file early; the file is incomplete"),
            ("a.txt", "the sandbox sent this file twice"),
        ]


async def test_a_giant_omitted_list_is_capped(tmp_path: Path) -> None:
    count = MAX_OMITTED_ENTRIES + 500
    omitted = [
        execution_pb2.OmittedFile(path=f"{i}-" + "p" * 5000, size=1, reason="r" * 1000)
        for i in range(count)
    ]
    summary = execution_pb2.OmittedFile(size=10**15, reason="the executor's own count")

    def result(execution: Execution) -> list[executor_pb2.ExecuteEvent]:
        return [execution.result(omitted_files=[*omitted, summary])]

    async with scripted(tmp_path, sends(result)) as (petri, name):
        response = await petri.execute(name, "hostile")
        listed, last = response.omitted_files[:-1], response.omitted_files[-1]
        assert len(listed) == MAX_OMITTED_ENTRIES
        assert all(len(o.path.encode()) <= MAX_OMITTED_PATH_BYTES for o in listed)
        assert all(len(o.reason.encode()) <= MAX_OMITTED_REASON_BYTES for o in listed)
        assert listed[0].path.endswith("...")
        assert (last.path, last.size) == ("", MAX_UNLISTED_COUNT)
        assert last.reason == f"{MAX_UNLISTED_COUNT} more omitted entries are not listed"


async def test_an_executor_that_ends_without_a_result_leaves_the_outcome_unknown(
    tmp_path: Path,
) -> None:
    script = sends([Event(stdout="half way\n")])
    async with scripted(tmp_path, script) as (petri, name):
        await expect(petri.execute(name, "hostile"), grpc.StatusCode.UNKNOWN, "may have run")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await streamed(petri, name)
        assert caught.value.code() == grpc.StatusCode.UNKNOWN
        # The sandbox is fine: the next execution gets a new call.
        assert (await petri.execute(name, "1")).stdout == "ran 1\n"


async def test_an_executor_refusal_reaches_the_caller_bounded(tmp_path: Path) -> None:
    async def refuses(execution: Execution) -> AsyncIterator[Batch]:
        raise Refuse(grpc.StatusCode.INVALID_ARGUMENT, "bad path " + "p" * 5000)
        yield []  # (a generator)

    async with scripted(tmp_path, refuses) as (petri, name):
        details = await expect(petri.execute(name, "hostile"), INVALID, "bad path ppp")
        assert len(details) <= 1000
        assert (await petri.execute(name, "1")).stdout == "ran 1\n"  # a new call


async def test_events_after_the_result_do_not_hold_the_caller(tmp_path: Path) -> None:
    script = sends(lambda execution: [execution.result(), Event(stdout="after the result\n")])
    async with fast_petri(tmp_path, executor_slack=timedelta(milliseconds=200)) as petri:
        petri.runtime.scripts["hostile"] = script
        sandbox = await petri.create()
        request = sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="hostile")
        request.timeout.FromMilliseconds(100)
        response = await petri.stub.ExecuteCode(request)
        assert response.execution_count == 1
        assert (await petri.get(sandbox.name)).state == sandbox_pb2.Sandbox.RUNNING


async def test_hostile_counts_and_incarnations_are_not_stored(tmp_path: Path) -> None:
    def result(execution: Execution) -> list[executor_pb2.ExecuteEvent]:
        return [execution.result(execution_count=2**63 - 1, incarnation="../../" + "i" * 5000)]

    async with scripted(tmp_path, sends(result)) as (petri, name):
        await petri.execute(name, "hostile")
        seen = await petri.get(name)
        assert (seen.execution_count, seen.incarnation) == (2**62, "invalid")


async def test_returned_files_get_mime_types_of_our_own_table(tmp_path: Path) -> None:
    names = ["notes.md", "book.xlsx", "conf.yaml", "t.parquet", "x.unknownext"]
    script = sends([file_chunk(n, b"x") for n in names], lambda execution: [execution.result()])
    async with fast_petri(tmp_path) as petri:
        petri.runtime.scripts["hostile"] = script
        sandbox = await petri.create()
        response = await petri.execute(sandbox.name, "hostile")
        types = {f.path: f.mime_type for f in response.files}
        assert types["notes.md"] == "text/markdown"
        assert types["book.xlsx"].endswith("spreadsheetml.sheet")
        assert types["conf.yaml"] == "application/yaml"
        assert types["t.parquet"] == "application/vnd.apache.parquet"
        assert types["x.unknownext"] == "application/octet-stream"
