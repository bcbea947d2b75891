"""The worker's preload (issue 16): it stops before its next module once an execution hurries
it, never leaving a module half imported; a module that fails is reported, not fatal; the
image's matplotlib font list is seeded into MPLCONFIGDIR. Then the same through a real worker
process and the supervisor."""

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from executor import worker
from executor.supervisor import Supervisor
from petri.v1 import executor_pb2
from tests.unit.executor.test_supervisor import run


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Three fresh importable module names (each records its import in `imported`)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    names = [f"preload_probe_{uuid.uuid4().hex}" for _ in range(3)]
    for name in names:
        (tmp_path / f"{name}.py").write_text("print('noise')\n")
    yield names
    for name in names:
        sys.modules.pop(name, None)


def test_a_preload_unhurried_imports_everything_and_reports_failures(
    modules: list[str],
) -> None:
    read, write = os.pipe()
    try:
        reply = worker.preload([modules[0], "no_such_module_here", modules[1]], read)
    finally:
        os.close(read)
        os.close(write)
    assert modules[0] in sys.modules and modules[1] in sys.modules
    assert [f.split(":")[0] for f in reply.failures] == ["no_such_module_here"]


def test_a_preload_hurried_during_a_module_finishes_it_and_stops(
    modules: list[str], tmp_path: Path
) -> None:
    read, write = os.pipe()
    # The second module's import is where the execution arrives.
    (tmp_path / f"{modules[1]}.py").write_text(
        f"import os\nos.write({write}, b'!')\nCOMPLETE = True\n"
    )
    try:
        reply = worker.preload(modules, read)
    finally:
        os.close(read)
        os.close(write)
    assert modules[0] in sys.modules
    assert sys.modules[modules[1]].COMPLETE  # imported whole, not cut halfway
    assert modules[2] not in sys.modules
    assert not reply.failures


def test_a_preload_hurried_before_it_starts_imports_nothing(modules: list[str]) -> None:
    read, write = os.pipe()
    os.write(write, b"!")
    try:
        reply = worker.preload(modules, read)
    finally:
        os.close(read)
        os.close(write)
    assert not any(name in sys.modules for name in modules)
    assert reply == executor_pb2.WorkerPreloaded(duration=reply.duration)


def _preload_thread(modules: list[str], read: int, grace: float) -> threading.Thread:
    thread = threading.Thread(target=worker.preload, args=(modules, read, grace), daemon=True)
    thread.start()
    return thread


def test_a_cold_first_workers_grace_ends_with_the_first_execution_and_imports_nothing(
    modules: list[str],
) -> None:
    read, write = os.pipe()
    try:
        preloading = _preload_thread(modules, read, grace=600)
        preloading.join(0.2)
        assert preloading.is_alive()  # in its grace: nothing imported yet
        assert not any(name in sys.modules for name in modules)
        os.write(write, b"!")  # the first execution
        preloading.join(30)
        assert not preloading.is_alive()
    finally:
        os.close(read)
        os.close(write)
    assert not any(name in sys.modules for name in modules)


def test_someone_waiting_for_the_preload_itself_ends_the_grace(modules: list[str]) -> None:
    """A restore or a checkpoint ("+") wants the modules: the preload starts at once."""
    read, write = os.pipe()
    os.write(write, b"+")
    try:
        preloading = _preload_thread(modules, read, grace=600)
        preloading.join(30)
        assert not preloading.is_alive()
    finally:
        os.close(read)
        os.close(write)
    assert all(name in sys.modules for name in modules)


def test_an_execution_after_the_grace_was_ended_still_stops_the_preload(
    modules: list[str], tmp_path: Path
) -> None:
    read, write = os.pipe()
    os.write(write, b"+")
    (tmp_path / f"{modules[0]}.py").write_text(f"import os\nos.write({write}, b'!')\n")
    try:
        worker.preload(modules, read, grace=600)
    finally:
        os.close(read)
        os.close(write)
    assert modules[0] in sys.modules and modules[1] not in sys.modules


def test_a_grace_that_passes_without_a_word_preloads_everything(modules: list[str]) -> None:
    read, write = os.pipe()
    try:
        worker.preload(modules, read, grace=0.05)
    finally:
        os.close(read)
        os.close(write)
    assert all(name in sys.modules for name in modules)


def test_a_pipe_closed_during_the_grace_means_nothing_is_wanted(modules: list[str]) -> None:
    read, write = os.pipe()
    os.close(write)  # the daemon killed the worker, or went
    try:
        preloading = _preload_thread(modules, read, grace=600)
        preloading.join(30)
        assert not preloading.is_alive()
    finally:
        os.close(read)
    assert not any(name in sys.modules for name in modules)


def test_the_worker_starts_without_asyncio() -> None:
    """asyncio is the daemon's: importing it cost every worker's start ~25 ms of CPU."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this executor, not another
    code = "import sys, executor.worker\nprint(sorted(m for m in sys.modules if 'asyncio' in m))"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_the_built_font_list_is_copied_once_into_mplconfigdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = tmp_path / "built"
    built.mkdir()
    (built / "fontlist-v390.json").write_text('{"built": true}')
    target = tmp_path / "tmp" / "matplotlib"
    monkeypatch.setattr(worker, "BUILT_MATPLOTLIB_CACHE", str(built))
    monkeypatch.setenv("MPLCONFIGDIR", str(target))
    worker.seed_matplotlib_cache()
    assert (target / "fontlist-v390.json").read_text() == '{"built": true}'
    # A list matplotlib rewrote since (or user code replaced) is the sandbox's: kept.
    (target / "fontlist-v390.json").write_text('{"mine": true}')
    worker.seed_matplotlib_cache()
    assert (target / "fontlist-v390.json").read_text() == '{"mine": true}'


def test_no_font_list_or_no_mplconfigdir_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "BUILT_MATPLOTLIB_CACHE", str(tmp_path / "absent"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "target"))
    worker.seed_matplotlib_cache()
    assert not (tmp_path / "target").exists()
    monkeypatch.delenv("MPLCONFIGDIR")
    monkeypatch.setattr(worker, "BUILT_MATPLOTLIB_CACHE", str(tmp_path))
    worker.seed_matplotlib_cache()  # nowhere to copy to: nothing happens


async def test_a_cold_first_execution_hurries_the_preload_and_runs_correctly(
    tmp_path: Path,
) -> None:
    """Whether it arrives before, during or after the preload, the first execution is right
    and the supervisor then counts the worker preloaded."""
    sup = Supervisor(tmp_path, preload=["colorsys", "no_such_module_here", "json"])
    await sup.start()
    try:
        ran = await run(sup, "import colorsys, json\njson.dumps(colorsys.ONE_THIRD > 0)")
        assert ran.error is None and ran.value == "'true'"
        assert (ran.stdout, ran.stderr) == ("", "")
        assert sup.preloaded
    finally:
        await sup.close()


async def test_a_checkpoint_or_restore_does_not_wait_out_a_cold_workers_grace(
    tmp_path: Path,
) -> None:
    """The first worker of a cold sandbox waits up to its grace for a first execution; a
    caller waiting for the preload itself (a checkpoint, a restore) ends the grace."""
    sup = Supervisor(tmp_path, preload=["colorsys"], preload_grace=600)
    await sup.start()
    try:
        assert not sup.preloaded
        assert await sup.wait_preloaded()  # not after 600 s: the worker is told to go on
        ran = await run(sup, "import sys\n'colorsys' in sys.modules")
        assert ran.value == "True"
    finally:
        await sup.close()
