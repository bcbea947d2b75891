"""The executor's supervisor with a real worker process (no container): state, output capture,
crashes, timeouts and cancellation."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf.duration_pb2 import Duration

from executor.batching import BATCH_BYTES, batches
from executor.outcome import MAX_OMITTED_FILES
from executor.supervisor import Supervisor
from executor.workspace import InputStager
from petri.paths import InvalidPath
from petri.v1 import execution_pb2, executor_pb2

Kind = execution_pb2.ExecutionError


class Ran:
    def __init__(self, events: list[executor_pb2.ExecuteEvent]) -> None:
        self.stdout = "".join(e.stdout for e in events if e.HasField("stdout"))
        self.stderr = "".join(e.stderr for e in events if e.HasField("stderr"))
        self.outputs = [e.output for e in events if e.HasField("output")]
        self.files: dict[str, bytes] = {}
        for event in events:
            if event.HasField("file_chunk"):
                chunk = event.file_chunk
                self.files[chunk.path] = self.files.get(chunk.path, b"") + chunk.data
        results = [e.result for e in events if e.HasField("result")]
        assert len(results) == 1, events
        self.result = results[0]
        self.error = self.result.error if self.result.HasField("error") else None

    @property
    def value(self) -> str | None:
        for output in self.outputs:
            if output.kind == execution_pb2.Output.RESULT:
                return output.text["text/plain"]
        return None


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    sup = Supervisor(tmp_path)
    await sup.start()
    yield sup
    await sup.close()


async def run(
    sup: Supervisor,
    code: str,
    timeout: float = 30,
    grace: float = 1,
    inputs: dict[str, bytes] | None = None,
    max_output_bytes: int = 1 << 30,
    max_output_files: int = 100,
    max_stream_bytes: int = 0,
) -> Ran:
    request = executor_pb2.ExecuteRequest(
        code=code,
        timeout=Duration(seconds=int(timeout), nanos=int((timeout % 1) * 1e9)),
        kill_grace=Duration(seconds=int(grace)),
        max_output_file_bytes=max_output_bytes,
        max_output_files=max_output_files,
        max_stream_bytes=max_stream_bytes,
    )
    stager = InputStager(sup.workspace, max_bytes=1 << 30)
    for path, data in (inputs or {}).items():
        stager.add(execution_pb2.FileChunk(path=path, data=data, final=True))
    async with sup.execute(request, stager) as events:
        received = [event async for event in events]
    return Ran(received)


async def test_state_persists_and_the_last_expression_is_the_value(supervisor: Supervisor) -> None:
    assert (await run(supervisor, "x = 41")).value is None
    ran = await run(supervisor, "x + 1")
    assert ran.value == "42"
    assert ran.result.execution_count == 2


async def test_stdout_and_stderr_are_separate_including_subprocesses(
    supervisor: Supervisor,
) -> None:
    ran = await run(
        supervisor,
        "import sys, subprocess\n"
        "print('to out')\n"
        "print('to err', file=sys.stderr)\n"
        "subprocess.run(['sh', '-c', 'echo shell-out; echo shell-err >&2'])\n"
        "None",
    )
    assert ran.stdout == "to out\nshell-out\n"
    assert ran.stderr == "to err\nshell-err\n"
    assert ran.error is None


async def test_an_exception_is_a_result_with_a_user_traceback(supervisor: Supervisor) -> None:
    ran = await run(supervisor, "def f():\n    return 1 / 0\nf()")
    assert ran.error is not None
    assert ran.error.kind == Kind.EXCEPTION
    assert (ran.error.ename, ran.error.evalue) == ("ZeroDivisionError", "division by zero")
    text = "\n".join(ran.error.traceback)
    assert "<cell-1>" in text and "return 1 / 0" in text
    assert "executor" not in text  # no frames of ours
    assert (await run(supervisor, "'still works'")).value == "'still works'"


async def test_syntax_errors_and_system_exit_are_results(supervisor: Supervisor) -> None:
    syntax = await run(supervisor, "def broken(:")
    assert syntax.error is not None and syntax.error.ename == "SyntaxError"
    leaving = await run(supervisor, "import sys; sys.exit(2)")
    assert leaving.error is not None and leaving.error.ename == "SystemExit"
    assert not leaving.result.namespace_reset


async def test_a_dying_interpreter_is_reported_and_replaced(supervisor: Supervisor) -> None:
    await run(supervisor, "x = 1")
    before = supervisor.incarnation
    ran = await run(supervisor, "print('bye', flush=True); import os; os._exit(3)")
    assert ran.error is not None and ran.error.kind == Kind.INTERPRETER_EXITED
    assert "exited with status 3" in ran.error.evalue
    assert "variables and imports are lost" in ran.error.evalue
    assert ran.result.namespace_reset
    assert ran.stdout == "bye\n"
    assert ran.result.incarnation != before
    after = await run(supervisor, "x")
    assert after.error is not None and after.error.ename == "NameError"


async def test_a_segfault_is_reported_with_its_signal(supervisor: Supervisor) -> None:
    ran = await run(supervisor, "import ctypes; ctypes.string_at(0)")
    assert ran.error is not None and "SIGSEGV" in ran.error.evalue
    assert (await run(supervisor, "2 + 2")).value == "4"


async def test_a_timeout_interrupts_and_keeps_the_namespace(supervisor: Supervisor) -> None:
    ran = await run(supervisor, "y = 7\nprint('started', flush=True)\nwhile True: pass", 1)
    assert ran.error is not None and ran.error.kind == Kind.TIMEOUT
    assert "variables are kept" in ran.error.evalue
    assert ran.stdout == "started\n"
    assert not ran.result.namespace_reset
    assert (await run(supervisor, "y")).value == "7"


async def test_code_that_ignores_the_interrupt_is_killed_and_says_state_was_lost(
    supervisor: Supervisor,
) -> None:
    await run(supervisor, "z = 1")
    ran = await run(
        supervisor,
        "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
        timeout=0.5,
        grace=1,
    )
    assert ran.error is not None and ran.error.kind == Kind.TIMEOUT
    assert "killed" in ran.error.evalue and "lost" in ran.error.evalue
    assert ran.result.namespace_reset
    assert (await run(supervisor, "z")).error is not None


async def test_a_consumer_that_goes_away_interrupts_the_code(supervisor: Supervisor) -> None:
    await run(supervisor, "import time; n = 0")
    request = executor_pb2.ExecuteRequest(
        code="while True:\n    n += 1\n    time.sleep(0.01)", timeout=Duration(seconds=60)
    )

    async def consume() -> None:
        async with supervisor.execute(request) as events:
            async for _ in events:
                pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.5)
    task.cancel()
    # The next execution waits for the interrupted one, then sees its namespace intact.
    ran = await run(supervisor, "n > 0")
    assert ran.value == "True"


async def test_executions_run_one_at_a_time_in_arrival_order(supervisor: Supervisor) -> None:
    await run(supervisor, "order = []")
    codes = [f"import time; time.sleep(0.02); order.append({i})" for i in range(5)]
    await asyncio.gather(*(run(supervisor, code) for code in codes))
    assert (await run(supervisor, "order")).value == "[0, 1, 2, 3, 4]"


async def test_display_and_rich_results(supervisor: Supervisor) -> None:
    ran = await run(
        supervisor,
        "class H:\n    def _repr_html_(self): return '<p>h</p>'\ndisplay(1, H())\n'last'",
    )
    kinds = [(o.kind, o.text["text/plain"]) for o in ran.outputs]
    assert kinds[:2] == [
        (execution_pb2.Output.DISPLAY, "1"),
        (execution_pb2.Output.DISPLAY, kinds[1][1]),
    ]
    assert ran.outputs[1].text["text/html"] == "<p>h</p>"
    assert ran.value == "'last'"
    assert (await run(supervisor, "1;")).value is None  # a trailing ; hides the value


async def test_printed_text_comes_before_the_outputs_that_follow_it(
    supervisor: Supervisor,
) -> None:
    # Text and outputs travel on separate pipes; a fast worker used to let the value overtake.
    code = "import sys\nprint('out')\nprint('err', file=sys.stderr)\ndisplay(1)\n6 * 7"
    for _ in range(20):
        request = executor_pb2.ExecuteRequest(code=code)
        async with supervisor.execute(request) as events:
            kinds = [e.WhichOneof("event") async for e in events]
        first_output = kinds.index("output")
        assert "stdout" in kinds[:first_output] and "stderr" in kinds[:first_output], kinds


async def test_input_is_not_the_protocol_pipe(supervisor: Supervisor) -> None:
    ran = await run(supervisor, "input()")
    assert ran.error is not None and ran.error.ename == "EOFError"
    assert (await run(supervisor, "'ok'")).value == "'ok'"


async def test_input_files_arrive_and_only_changed_files_come_back(
    supervisor: Supervisor,
) -> None:
    ran = await run(
        supervisor,
        "import pathlib\n"
        "rows = open('in/data.csv').read().splitlines()\n"
        "pathlib.Path('out').mkdir()\n"
        "open('out/count.txt', 'w').write(str(len(rows)))\n"
        "open('in/touched.txt', 'a').write('!')",
        inputs={"in/data.csv": b"a\nb\nc\n", "in/touched.txt": b"x", "in/same.txt": b"y"},
    )
    assert ran.error is None, ran.error
    assert ran.files == {"in/touched.txt": b"x!", "out/count.txt": b"3"}
    assert list(ran.files) == sorted(ran.files)  # deterministic order


async def test_symlinks_made_by_code_are_not_followed(supervisor: Supervisor) -> None:
    ran = await run(
        supervisor,
        "import os\nos.symlink('/etc/passwd', 'passwd')\nos.symlink('/etc', 'etc')\n"
        "open('real.txt', 'w').write('r')",
    )
    assert ran.files == {"real.txt": b"r"}
    with pytest.raises(InvalidPath, match="goes through a symlink"):
        await run(supervisor, "1", inputs={"etc/evil": b"no"})
    assert not Path("/etc/evil").exists()


async def test_files_beyond_the_limits_are_listed_as_omitted(supervisor: Supervisor) -> None:
    ran = await run(
        supervisor,
        "for name, size in [('a', 40), ('b', 100), ('c', 50), ('d', 1)]:\n"
        "    open(name, 'wb').write(b'x' * size)",
        max_output_bytes=100,
        max_output_files=2,
    )
    assert set(ran.files) == {"a", "c"}
    omitted = {f.path: (f.size, f.reason) for f in ran.result.omitted_files}
    assert omitted["b"][0] == 100 and "exceed 100 bytes" in omitted["b"][1]
    assert "more than 2 files" in omitted["d"][1]


async def test_open_figures_are_shown_as_png_and_closed(supervisor: Supervisor) -> None:
    ran = await run(
        supervisor,
        "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
        "fig = plt.figure(); plt.plot([1, 2, 3])\nplt.figure(); plt.plot([3, 2])\n"
        "display(fig)",
    )
    pngs = [o for o in ran.outputs if "image/png" in o.binary]
    assert len(pngs) == 2  # fig once (displayed), the other at the end
    assert all(o.binary["image/png"].startswith(b"\x89PNG\r\n\x1a\n") for o in pngs)
    assert pngs[0].text["text/plain"].startswith("<Figure size")
    again = await run(supervisor, "len(plt.get_fignums())")
    assert again.value == "0"


async def test_huge_exceptions_and_outputs_are_clipped_and_keep_the_namespace(
    supervisor: Supervisor,
) -> None:
    await run(supervisor, "kept = 1")
    raised = await run(supervisor, "raise ValueError('y' * 70_000_000)")
    assert raised.error is not None and raised.error.ename == "ValueError"
    assert len(raised.error.evalue) < 100_000 and raised.error.evalue.endswith("characters]")
    assert not raised.result.namespace_reset
    shown = await run(
        supervisor,
        "class Big:\n    def _repr_html_(self): return 'h' * 40_000_000\ndisplay(Big())\nkept",
    )
    assert "dropped text/html" in shown.outputs[0].text["text/plain"]
    assert shown.value == "1" and not shown.result.namespace_reset


async def test_endless_output_is_not_forwarded_past_the_cap(supervisor: Supervisor) -> None:
    ran = await run(
        supervisor,
        "import sys\nfor _ in range(50):\n    sys.stdout.write('x' * 100_000)\n'done'",
        max_stream_bytes=1_000_000,
    )
    assert 1_000_000 < len(ran.stdout) < 1_000_000 + 200_000
    assert ran.value == "'done'"


async def test_the_worker_preloads_its_modules_before_the_first_execution(tmp_path: Path) -> None:
    (tmp_path / "colorsys.py").write_text("raise SystemExit('the workspace copy was imported')")
    sup = Supervisor(tmp_path, preload=["colorsys", "no_such_module_here"])
    await sup.start()
    try:
        # As a pool member does: an execution sent at once would stop the preload early.
        assert await sup.wait_preloaded()
        ran = await run(
            sup, "import sys\n('colorsys' in sys.modules, sys.modules['colorsys'].__file__)"
        )
        assert ran.error is None and sup.preloaded
        assert ran.value is not None and ran.value.startswith("(True, '/")
        assert str(tmp_path) not in ran.value
        assert (ran.stdout, ran.stderr) == ("", "")  # a failed preload prints nowhere
        crashed = await run(sup, "import os\nos._exit(1)")
        assert crashed.result.namespace_reset
        again = await run(sup, "import sys\n'colorsys' in sys.modules")
        assert again.value == "True"  # the new worker preloaded too
    finally:
        await sup.close()


async def _batches(sup: Supervisor, code: str) -> list[list[executor_pb2.ExecuteEvent]]:
    request = executor_pb2.ExecuteRequest(code=code, timeout=Duration(seconds=30))
    async with sup.execute(request) as events:
        return [batch async for batch in batches(events)]


async def test_events_that_come_together_go_out_together(supervisor: Supervisor) -> None:
    batches = await _batches(supervisor, "for i in range(50): display(i)")
    events = [event for batch in batches for event in batch]
    shown = [e.output.text["text/plain"] for e in events if e.HasField("output")]
    assert shown == [str(i) for i in range(50)]
    assert len(batches) < 10  # fifty displays in a burst are not fifty messages
    assert events[-1].HasField("result") and batches[-1][-1] is events[-1]


async def test_output_still_streams_while_the_code_runs(supervisor: Supervisor) -> None:
    request = executor_pb2.ExecuteRequest(
        code="import time\nprint('first', flush=True)\ntime.sleep(1)\nprint('second')",
        timeout=Duration(seconds=30),
    )
    async with supervisor.execute(request) as events:
        grouped = aiter(batches(events))
        first = await asyncio.wait_for(anext(grouped), 0.8)  # before the sleep ends
        assert "".join(e.stdout for e in first) == "first\n"
        rest = [event async for batch in grouped for event in batch]
    assert "".join(e.stdout for e in rest) == "second\n"
    assert rest[-1].HasField("result")


async def test_a_group_stays_within_its_size_and_big_outputs_go_alone(
    supervisor: Supervisor,
) -> None:
    # Each displayed string is a third of a group's size: at most two go together.
    code = f"for i in range(6): display('x' * {BATCH_BYTES // 3})"
    batches = await _batches(supervisor, code)
    outputs = [e for batch in batches for e in batch if e.HasField("output")]
    assert len(outputs) == 6
    for batch in batches:
        assert sum(e.ByteSize() for e in batch) <= BATCH_BYTES or len(batch) == 1


DEEP_CHAIN = (
    "import os\n"
    "fd = os.open('.', os.O_RDONLY)\n"
    "for _ in range(1500):\n"
    "    os.mkdir('d', dir_fd=fd)\n"
    "    fd, old = os.open('d', os.O_RDONLY, dir_fd=fd), fd\n"
    "    os.close(old)\n"
    "os.close(fd)\n"
)


async def test_a_hostile_tree_is_reported_and_the_result_still_arrives(
    supervisor: Supervisor,
) -> None:
    ran = await run(
        supervisor,
        DEEP_CHAIN + "open(b'caf\\xe9.txt', 'wb').write(b'x')\n"
        "open('fine.txt', 'w').write('ok')\nprint('done')",
    )
    assert ran.error is None, ran.error
    assert ran.stdout == "done\n"
    assert ran.files == {"fine.txt": b"ok"}
    omitted = {f.path: f.reason for f in ran.result.omitted_files}
    assert omitted == {
        "/".join(["d"] * 64): "deeper than 64 levels: not scanned",
        "caf\\xe9.txt": "its name is not valid UTF-8: not returned (rename it to return it)",
    }
    later = await run(supervisor, "1 + 1")
    assert later.value == "2" and not later.files
    assert [f.path for f in later.result.omitted_files] == ["/".join(["d"] * 64)]
    removed = await run(
        supervisor, "import subprocess\nsubprocess.run(['rm', '-rf', 'd']).returncode"
    )
    assert removed.value == "0" and not removed.result.omitted_files


async def test_a_file_that_cannot_be_read_is_omitted_not_fatal(supervisor: Supervisor) -> None:
    # Code left running swaps the file for a FIFO between the scan and the read: here, an
    # unreadable file stands in for that race.
    ran = await run(
        supervisor,
        "import os\nopen('secret', 'w').write('s')\nos.chmod('secret', 0)\nprint('hi')",
    )
    assert ran.stdout == "hi\n" and ran.files == {}
    (omitted,) = ran.result.omitted_files
    assert (omitted.path, omitted.reason) == ("secret", "could not be read: Permission denied")


async def test_omitted_files_are_listed_up_to_a_bound(supervisor: Supervisor) -> None:
    ran = await run(
        supervisor,
        f"for i in range({MAX_OMITTED_FILES + 10}):\n    open(f'{{i:05}}', 'w').write('x')",
        max_output_files=1,
    )
    assert len(ran.files) == 1
    omitted = ran.result.omitted_files
    assert len(omitted) == MAX_OMITTED_FILES + 1
    summary = omitted[-1]
    assert (summary.path, summary.size) == ("", 9)
    assert summary.reason == "9 more omitted entries are not listed"
