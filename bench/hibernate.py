"""Hibernation: how long a pause and a resume take, and how many sandboxes one machine holds
when the idle ones pause by themselves.

Two parts, each with a controller process of its own (its state dir, and so its checkpoints,
in a temporary directory that goes with it):

latency: the server's default configuration, a warm pool of POOL_SIZE, the profile's preload.
  PauseSandbox of a sandbox holding a ~100 MB pandas DataFrame; ExecuteCode on it while it is
  PAUSED (the execution resumes it: `df.shape`); ExecuteCode reading a few variables of a
  small namespace (pandas imported) while it is PAUSED, and while it is RUNNING for
  comparison. Before each resume the benchmark waits for a full, settled pool, as a resume
  claims a pool member when one is ready; the controller's log (read at info level) says
  which resumes found one. Every value read back is checked, with `namespace_restored` and no
  lost names.

density: sandboxes created over time, CREATE_CONCURRENCY at a time (--concurrency), each
  with a short `auto_pause_after`, a small namespace and a 1 MiB input file in its workspace;
  nobody calls PauseSandbox. Every SAMPLE_S: how many are RUNNING and PAUSED (ListSandboxes, paged),
  MemAvailable, the controller's RSS and the checkpoints' size on disk. Creation stops short
  of MEMORY_FLOOR of MemAvailable and DISK_FLOOR of free disk. Then a random sample executes
  code that reads its variables and its file's checksum (each one resumes, then pauses again
  by itself), with --check-all every sandbox too, and everything is deleted. No warm pool
  here (each pool member would be one more running sandbox) and, by default, no preload
  (--preload), so that a create costs little CPU and a running sandbox little memory.

Each part prints its tables, its targets with "met" or "NOT met", and one JSON line.
Run as the service user (`scripts/bench hibernate ARGS` does):
  python -m bench.hibernate [--part latency|density|both] [--profile P]
      latency: [--repeats N] [--resumes N]
      density: [--count N] [--sample N] [--check-all] [--auto-pause-after S]
               [--concurrency N] [--preload M,...]
"""

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2

from bench.density import DISK_FLOOR, MEMORY_FLOOR, mem_available
from bench.harness import (
    RunningController,
    channel_to,
    controller_process,
    median,
    percentile,
    print_table,
)
from bench.latency import POOL_SETTLE_SECONDS, pool_members, registry_label_of
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PARENT = "projects/bench"
# Marks this benchmark's sandboxes: cleanup deletes them and nothing else.
LABEL = ("bench", "hibernate")
LABEL_FILTER = f'labels.{LABEL[0]} = "{LABEL[1]}"'
MiB = 1 << 20
GiB = 1 << 30
# Longer than any run: the server's default (1 h) would expire the first sandboxes of a long one.
TTL = timedelta(hours=12)
# A create or a resume on a busy 2-core machine can wait long; a stuck call must still end.
CALL_TIMEOUT_S = 600.0
CREATE_CONCURRENCY = 4
CHECK_CONCURRENCY = 4
DELETE_CONCURRENCY = 8
LIST_PAGE = 1000
SAMPLE_S = 5.0
# Creation stops before MemAvailable, less this much for each create in flight and the next
# (a running sandbox's executor and worker, with room for a preload), passes MEMORY_FLOOR.
RUNNING_SANDBOX_RESERVE = 192 * MiB
# ... and before free disk, less this much for each, passes DISK_FLOOR (a checkpoint: the file
# and a small namespace).
CHECKPOINT_RESERVE = 2 * MiB
FILE_BYTES = 1 << 20
FILE_NAME = "data.bin"
# Failed creates (or setups) after which creation stops: something is wrong, not slow.
MAX_FAILURES = 10
# "At most a few hundred running": the figure this benchmark holds the max running to.
MAX_RUNNING_TARGET = 300
TARGET_COUNT = 5000

# The latency part's sandboxes.
POOL_SIZE = 2
DF_ROWS, DF_COLUMNS = 1_250_000, 10  # float64: 100,000,000 bytes
BIG_SETUP = f"""\
import numpy as np
import pandas as pd
df = pd.DataFrame(np.random.rand({DF_ROWS}, {DF_COLUMNS}))
int(df.memory_usage().sum()), float(df.to_numpy().sum())
"""
BIG_READ = "df.shape"
BIG_SUM = "float(df.to_numpy().sum())"
SMALL_SETUP = """\
import pandas as pd
answer = 42
greeting = "hello"
numbers = list(range(10))
frame = pd.DataFrame({"a": [1, 2, 3]})
"""
SMALL_READ = 'answer + sum(numbers) + int(frame["a"].sum()) + len(greeting)'
SMALL_VALUE = "98"  # 42 + 45 + 6 + 5
# Pause-and-resume cycles that may fail in a row before the part gives up.
MAX_FAILED_CYCLES = 3
# A row of the controller's own seconds, from its log: a pause is the save, then the container's
# removal.
IN_CONTROLLER = "  ... of which the {}, in the controller (its log)"
# Round trips on the RUNNING sandbox not measured: the first ones warm its session.
WARMUP = 3

# The density part's sandboxes: a small namespace, and their file's checksum read back.
DENSITY_CHECK = (
    "import hashlib\n"
    f"print(token, sum(numbers), hashlib.sha256(open({FILE_NAME!r}, 'rb').read()).hexdigest())"
)


def _density_setup(token: str, index: int) -> str:
    return f"token = {token!r}\nnumbers = list(range({index}, {index + 100}))\nlabel = 'n{index}'\n"


TIMED_EVENTS = ("sandbox saved", "sandbox resumed")
# The controller says so at every start without tokens, as here: not a finding.
EXPECTED_WARNING = "AUTHENTICATION IS OFF"


# --- shared --------------------------------------------------------------------------------


class ControllerLog:
    """The benchmark's controller's JSON log, read as it grows: counts of every event, the
    warnings and errors kept, and what each read found returned."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.counts: Counter[str] = Counter()
        self.problems: list[dict[str, Any]] = []
        # The seconds the controller logs with "sandbox saved" and "sandbox resumed".
        self.seconds: dict[str, list[float]] = {}

    def read_new(self) -> list[dict[str, Any]]:
        try:
            with open(self._path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        whole = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._offset += whole
        events = []
        for line in data[:whole].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not the controller's own (podman's, a traceback's)
            if not isinstance(event, dict):
                continue
            events.append(event)
            self.counts[str(event.get("event"))] += 1
            if event.get("event") in TIMED_EVENTS and "seconds" in event:
                self.seconds.setdefault(str(event["event"]), []).append(float(event["seconds"]))
            if event.get("level") in ("warning", "error", "critical") and not str(
                event.get("event")
            ).startswith(EXPECTED_WARNING):
                self.problems.append(event)
        return events

    def latest(self, what: str, name: str) -> dict[str, Any] | None:
        """The latest line `what` about sandbox `name` since the last read: "sandbox resumed"
        says where it went (warm pool or new container), and it and "sandbox saved" their
        seconds as the controller counted them."""
        found = None
        for event in self.read_new():
            if event.get("event") == what and event.get("sandbox") == name:
                found = event
        return found

    def print_problems(self) -> None:
        by_event = Counter(str(e.get("event")) for e in self.problems)
        if not by_event:
            print("\ncontroller log: no warnings or errors")
            return
        rows = []
        for event, count in by_event.most_common():
            first = next(e for e in self.problems if str(e.get("event")) == event)
            details = {k: v for k, v in first.items() if k not in ("event", "timestamp")}
            if isinstance(details.get("exception"), str):  # its last line says what it was
                details["exception"] = details["exception"].strip().splitlines()[-1]
            rows.append([event, str(count), json.dumps(details)[:400]])
        print_table("controller log: warnings and errors", ["event", "n", "first one"], rows)


def _settings(profile: str) -> dict[str, str]:
    return {
        "default_image_profile": profile,
        "max_executes_per_minute": "10000000",
        "log_level": "info",  # the resumes' and saves' lines
        "log_format": "json",
    }


def _create_request(
    profile: str, auto_pause_after: float | None
) -> sandbox_pb2.CreateSandboxRequest:
    sandbox = sandbox_pb2.Sandbox(
        labels=dict([LABEL]), spec=sandbox_pb2.SandboxSpec(image_profile=profile)
    )
    sandbox.ttl.FromTimedelta(TTL)
    if auto_pause_after is not None:
        sandbox.auto_pause_after.CopyFrom(_duration(auto_pause_after))
    return sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromTimedelta(timedelta(seconds=seconds))
    return duration


async def _execute(
    stub: "Stub", name: str, code: str, files: Sequence[execution_pb2.File] = ()
) -> tuple[float, sandbox_pb2.ExecuteCodeResponse]:
    request = sandbox_pb2.ExecuteCodeRequest(name=name, code=code, files=files)
    started = time.perf_counter()
    response = await stub.ExecuteCode(request, timeout=CALL_TIMEOUT_S)
    return time.perf_counter() - started, response


def _value(response: sandbox_pb2.ExecuteCodeResponse) -> str | None:
    return response.outputs[-1].text.get("text/plain") if response.outputs else None


def _problem(
    response: sandbox_pb2.ExecuteCodeResponse, got: str | None, want: str, restored: bool
) -> str:
    """What is wrong with this answer ("" when nothing): the value, the restore report."""
    if response.HasField("error"):
        e = response.error
        return f"{execution_pb2.ExecutionError.Kind.Name(e.kind)}: {e.ename}: {e.evalue}"[:300]
    if got != want:
        return f"read back {got!r}, expected {want!r}"
    if restored and not response.namespace_restored:
        return "namespace_restored is false after a resume"
    if response.namespace_reset:
        return "namespace_reset is true"
    if response.lost_names:
        lost = ", ".join(f"{n.name} ({n.reason})" for n in response.lost_names)
        return f"lost names: {lost}"[:300]
    return ""


async def _list(stub: "Stub", query: str) -> list[sandbox_pb2.Sandbox]:
    """Every sandbox of this benchmark matching `query` (a filter, "" for all), paged."""
    where = f"{query} AND {LABEL_FILTER}" if query else LABEL_FILTER
    found: list[sandbox_pb2.Sandbox] = []
    token = ""
    while True:
        page = await stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(
                parent=PARENT, filter=where, page_size=LIST_PAGE, page_token=token
            ),
            timeout=CALL_TIMEOUT_S,
        )
        found.extend(page.sandboxes)
        token = page.next_page_token
        if not token:
            return found


async def _count(stub: "Stub", state: str) -> int:
    return len(await _list(stub, f"state = {state}"))


async def delete_labelled(stub: "Stub") -> int:
    """Deletes every sandbox of this benchmark, a few at a time; returns how many."""
    names = [s.name for s in await _list(stub, "")]
    gate = asyncio.Semaphore(DELETE_CONCURRENCY)
    failures: list[str] = []

    async def delete(name: str) -> None:
        async with gate:
            try:
                await stub.DeleteSandbox(
                    sandbox_pb2.DeleteSandboxRequest(name=name, allow_missing=True),
                    timeout=CALL_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{name}: {exc.code().name}: {exc.details()}")

    started = time.perf_counter()
    await asyncio.gather(*(delete(n) for n in names))
    print(f"  {len(names)} deleted in {time.perf_counter() - started:.1f} s", flush=True)
    for failure in failures[:5]:
        print(f"  could not delete {failure}", flush=True)
    return len(names)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def _mib(value: float) -> str:
    return f"{value / MiB:.1f} MiB"


def _timing_row(what: str, seconds: Sequence[float], note: str = "") -> list[str]:
    if not seconds:
        return [what, "0", "-", "-", "-", note]
    return [
        what,
        str(len(seconds)),
        _ms(median(seconds)),
        _ms(percentile(seconds, 0.9)),
        _ms(max(seconds)),
        note,
    ]


# --- latency -------------------------------------------------------------------------------


@dataclass
class LatencyFigures:
    profile: str
    dataframe_bytes: int = 0
    pause_big: list[float] = field(default_factory=list)
    big_checkpoint_bytes: list[int] = field(default_factory=list)
    resume_big: list[float] = field(default_factory=list)
    resume_big_into: list[str] = field(default_factory=list)
    pause_small: list[float] = field(default_factory=list)
    small_checkpoint_bytes: list[int] = field(default_factory=list)
    resume_small: list[float] = field(default_factory=list)
    resume_small_into: list[str] = field(default_factory=list)
    # The controller's own seconds (its log) for each save, the rest of a pause being the
    # container's removal, and for each resume.
    save_big_server: list[float] = field(default_factory=list)
    save_small_server: list[float] = field(default_factory=list)
    resume_big_server: list[float] = field(default_factory=list)
    resume_small_server: list[float] = field(default_factory=list)
    running_small: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def _wait_pool_ready(label: str, own_running: int = 0) -> None:
    """Until POOL_SIZE members are up and settled, besides the benchmark's `own_running`
    sandboxes (podman shows them alike: every container of this controller)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        containers = await asyncio.to_thread(pool_members, label)
        if len(containers) >= POOL_SIZE + own_running and all(
            age > POOL_SETTLE_SECONDS for _, age in containers
        ):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the warm pool did not refill in 120 s")


async def _pause(
    stub: "Stub", name: str, log: ControllerLog | None = None, saves: list[float] | None = None
) -> tuple[float, sandbox_pb2.Sandbox]:
    """A timed PauseSandbox; with `log`, the controller's seconds for the save go to `saves`."""
    if log is not None:
        log.read_new()
    started = time.perf_counter()
    sandbox = await stub.PauseSandbox(
        sandbox_pb2.PauseSandboxRequest(name=name), timeout=CALL_TIMEOUT_S
    )
    elapsed = time.perf_counter() - started
    if sandbox.state != sandbox_pb2.Sandbox.PAUSED:
        raise RuntimeError(
            f"PauseSandbox left {name} {sandbox_pb2.Sandbox.State.Name(sandbox.state)}"
        )
    if log is not None and saves is not None:
        saved = log.latest("sandbox saved", name)
        if saved is not None:
            saves.append(float(saved.get("seconds", 0.0)))
    return elapsed, sandbox


async def _resume_on_execute(
    stub: "Stub",
    log: ControllerLog,
    label: str,
    name: str,
    code: str,
    want: str,
    figures: LatencyFigures,
) -> tuple[float, str, float | None]:
    """One timed ExecuteCode on the PAUSED sandbox `name`, from a full pool: its seconds,
    where the resume went and the controller's seconds for it."""
    await _wait_pool_ready(label)
    log.read_new()
    elapsed, response = await _execute(stub, name, code)
    problem = _problem(response, _value(response), want, restored=True)
    if problem:
        figures.problems.append(f"resume of {name}: {problem}")
    resumed = log.latest("sandbox resumed", name)
    if resumed is None:
        return elapsed, "unknown (no log line)", None
    return elapsed, str(resumed.get("into")), float(resumed.get("seconds", 0.0))


async def measure_latency(profile: str, repeats: int, resumes: int) -> LatencyFigures:
    figures = LatencyFigures(profile)
    settings = {**_settings(profile), "warm_pool": f"size={POOL_SIZE}"}
    async with (
        controller_process(**settings) as controller,
        channel_to(controller.address) as channel,
    ):
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        log = ControllerLog(controller.state_dir / "controller.log")
        label = registry_label_of(controller.state_dir)
        try:
            await _measure_big(stub, log, label, repeats, figures)
            await _measure_small(stub, log, label, resumes, figures)
        finally:
            await delete_labelled(stub)
            log.read_new()
            log.print_problems()
    return figures


async def _cycles(
    figures: LatencyFigures, what: str, count: int, cycle: Callable[[], Awaitable[object]]
) -> None:
    """Runs `cycle` `count` times; a failed one is a problem reported, not the end of the
    benchmark, unless MAX_FAILED_CYCLES fail in a row."""
    failed = 0
    for _ in range(count):
        try:
            await cycle()
            failed = 0
        except (grpc.aio.AioRpcError, RuntimeError) as exc:
            detail = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else str(exc)
            )
            figures.problems.append(f"{what}: {detail}"[:600])
            failed += 1
            if failed >= MAX_FAILED_CYCLES:
                figures.problems.append(f"{what}: stopped after {failed} failures in a row")
                return


async def _measure_big(
    stub: "Stub", log: ControllerLog, label: str, repeats: int, figures: LatencyFigures
) -> None:
    print(f"hibernate latency: a ~100 MB DataFrame, {repeats} pauses and resumes", flush=True)
    big = await stub.CreateSandbox(_create_request(figures.profile, None), timeout=CALL_TIMEOUT_S)
    _, response = await _execute(stub, big.name, BIG_SETUP)
    value = _value(response)
    if response.HasField("error") or value is None:
        raise RuntimeError(f"building the DataFrame failed: {response.error} {response.stderr}")
    size_text, _, total = value.strip("()").partition(", ")
    figures.dataframe_bytes = int(size_text)
    shape = f"({DF_ROWS}, {DF_COLUMNS})"

    async def cycle() -> None:
        await _wait_pool_ready(label, own_running=1)  # no refill during the pause
        elapsed, paused = await _pause(stub, big.name, log, figures.save_big_server)
        figures.pause_big.append(elapsed)
        figures.big_checkpoint_bytes.append(paused.checkpoint.size_bytes)
        elapsed, into, server = await _resume_on_execute(
            stub, log, label, big.name, BIG_READ, shape, figures
        )
        figures.resume_big.append(elapsed)
        figures.resume_big_into.append(into)
        if server is not None:
            figures.resume_big_server.append(server)
        # Not timed: the data itself came back, to the last bit.
        _, response = await _execute(stub, big.name, BIG_SUM)
        problem = _problem(response, _value(response), total, restored=False)
        if problem:
            figures.problems.append(f"the DataFrame's sum after a resume: {problem}")

    await _cycles(figures, "pause and resume of the DataFrame", repeats, cycle)
    # Paused, so that the service's idle checkpoint of it does not run during the next part.
    await _cycles(figures, "the DataFrame's last pause", 1, lambda: _pause(stub, big.name))


async def _measure_small(
    stub: "Stub", log: ControllerLog, label: str, resumes: int, figures: LatencyFigures
) -> None:
    print(f"hibernate latency: a small namespace, {resumes} resumes", flush=True)
    small = await stub.CreateSandbox(_create_request(figures.profile, None), timeout=CALL_TIMEOUT_S)
    _, response = await _execute(stub, small.name, SMALL_SETUP)
    if response.HasField("error"):
        raise RuntimeError(f"the small namespace's setup failed: {response.error}")
    await _wait_pool_ready(label, own_running=1)  # no refill during the round trips
    for i in range(WARMUP + resumes):
        elapsed, response = await _execute(stub, small.name, SMALL_READ)
        problem = _problem(response, _value(response), SMALL_VALUE, restored=False)
        if problem:
            figures.problems.append(f"running {small.name}: {problem}")
        if i >= WARMUP:
            figures.running_small.append(elapsed)

    async def cycle() -> None:
        await _wait_pool_ready(label, own_running=1)
        elapsed, paused = await _pause(stub, small.name, log, figures.save_small_server)
        figures.pause_small.append(elapsed)
        figures.small_checkpoint_bytes.append(paused.checkpoint.size_bytes)
        elapsed, into, server = await _resume_on_execute(
            stub, log, label, small.name, SMALL_READ, SMALL_VALUE, figures
        )
        figures.resume_small.append(elapsed)
        figures.resume_small_into.append(into)
        if server is not None:
            figures.resume_small_server.append(server)

    await _cycles(figures, "pause and resume of the small namespace", resumes, cycle)


def _into_note(into: Sequence[str]) -> str:
    return ", ".join(f"{n} into {where}" for where, n in Counter(into).most_common())


def _latency_targets(f: LatencyFigures) -> list[list[str]]:
    pause = median(f.pause_big) if f.pause_big else float("inf")
    small = median(f.resume_small) if f.resume_small else float("inf")
    big = median(f.resume_big) if f.resume_big else float("inf")
    correct = not f.problems
    return [
        [
            f"pause, ~100 MB DataFrame, median of {len(f.pause_big)}",
            f"{_ms(pause)} ms",
            "≤ 1000 ms",
            _met(pause <= 1.0),
        ],
        [
            f"resume on execute, small namespace, p50 of {len(f.resume_small)}",
            f"{_ms(small)} ms",
            "≤ 150 ms",
            _met(small <= 0.150),
        ],
        [
            f"resume on execute, ~100 MB DataFrame, median of {len(f.resume_big)}",
            f"{_ms(big)} ms",
            "≤ 1500 ms",
            _met(big <= 1.5),
        ],
        [
            "every value read back right, restored, nothing lost",
            "yes" if correct else f"{len(f.problems)} problems",
            "all",
            _met(correct),
        ],
    ]


def print_latency(f: LatencyFigures) -> None:
    print_table(
        f"hibernation latency, milliseconds ({f.profile} profile, warm pool size={POOL_SIZE})",
        ["what", "n", "p50", "p90", "max", "note"],
        [
            _timing_row("PauseSandbox, ~100 MB DataFrame", f.pause_big),
            _timing_row(IN_CONTROLLER.format("save"), f.save_big_server),
            _timing_row(
                "ExecuteCode `df.shape`, PAUSED", f.resume_big, _into_note(f.resume_big_into)
            ),
            _timing_row(IN_CONTROLLER.format("resume"), f.resume_big_server),
            _timing_row("PauseSandbox, small namespace", f.pause_small),
            _timing_row(IN_CONTROLLER.format("save"), f.save_small_server),
            _timing_row(
                "ExecuteCode reading variables, PAUSED",
                f.resume_small,
                _into_note(f.resume_small_into),
            ),
            _timing_row(IN_CONTROLLER.format("resume"), f.resume_small_server),
            _timing_row("ExecuteCode reading variables, RUNNING", f.running_small),
        ],
    )
    print_table(
        "checkpoints",
        ["sandbox", "size (median)", "note"],
        [
            [
                "~100 MB DataFrame",
                _mib(median(f.big_checkpoint_bytes)) if f.big_checkpoint_bytes else "-",
                f"df.memory_usage().sum() = {f.dataframe_bytes:,} bytes",
            ],
            [
                "small namespace (pandas imported)",
                f"{median(f.small_checkpoint_bytes) / 1024:.1f} KiB"
                if f.small_checkpoint_bytes
                else "-",
                "",
            ],
        ],
    )
    for problem in f.problems[:10]:
        print(f"  problem: {problem}")
    print_table("hibernation latency targets", ["what", "petri", "target", ""], _latency_targets(f))
    summary: dict[str, Any] = {"bench": "hibernate", "part": "latency", "profile": f.profile}
    for key, values in asdict(f).items():
        if key in ("profile", "problems") or not isinstance(values, list):
            continue
        if values and isinstance(values[0], int | float):
            summary[f"{key}_median"] = round(median(values), 4)
    summary["dataframe_bytes"] = f.dataframe_bytes
    summary["resume_small_from_pool"] = f.resume_small_into.count("warm pool")
    summary["resume_big_from_pool"] = f.resume_big_into.count("warm pool")
    summary["resume_small_p90"] = (
        round(percentile(f.resume_small, 0.9), 4) if f.resume_small else None
    )
    summary["problems"] = len(f.problems)
    print(json.dumps(summary))


# --- density -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str
    token: str
    numbers_sum: int
    sha256: str

    @property
    def expected(self) -> str:
        return f"{self.token} {self.numbers_sum} {self.sha256}"


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the density part started
    phase: str
    created: int
    running: int
    paused: int
    other: int  # neither RUNNING nor PAUSED: being created or deleted, or TERMINATED
    available_bytes: int
    controller_rss_bytes: int
    checkpoint_bytes: int
    disk_free_bytes: int


def _disk_free(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _tree_bytes(root: Path) -> int:
    """Disk used by the files under `root` (allocated blocks, not apparent sizes)."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:  # replaced or removed while we looked
                continue
    return total


@dataclass
class CheckFigures:
    checked: int = 0
    correct: int = 0
    restored: int = 0  # answered with namespace_restored: it was PAUSED
    seconds: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaused_after_s: float | None = None  # all PAUSED again this long after the last check


@dataclass
class DensityFigures:
    profile: str
    preload: str
    auto_pause_after_s: float
    asked: int
    concurrency: int
    created: int = 0
    failures: list[str] = field(default_factory=list)
    stopped_because: str = ""
    seconds_to_create: float = 0.0
    all_paused_after_s: float | None = None  # after the last create
    samples: list[Sample] = field(default_factory=list)
    lowest_available_bytes: int = 1 << 62
    available_before_bytes: int = 0
    available_settled_bytes: int = 0  # all PAUSED, after creation
    rss_settled_bytes: int = 0  # the controller's, then
    containers_settled: int | None = None  # this controller's running containers, then
    rss_before_bytes: int = 0
    disk_free_before_bytes: int = 0
    checkpoint_bytes: int = 0  # all PAUSED, after the checks
    sample_check: CheckFigures = field(default_factory=CheckFigures)
    full_check: CheckFigures | None = None
    log_counts: dict[str, int] = field(default_factory=dict)
    log_seconds: dict[str, list[float]] = field(default_factory=dict)

    @property
    def max_running(self) -> int:
        return max((s.running for s in self.samples), default=0)


class _Density:
    def __init__(
        self,
        stub: "Stub",
        controller: RunningController,
        figures: DensityFigures,
    ) -> None:
        self._stub = stub
        self._controller = controller
        self._checkpoints = controller.state_dir / "checkpoints"
        self.f = figures
        self.members: list[Member] = []
        self._request = _create_request(figures.profile, figures.auto_pause_after_s)
        self._launched = 0
        self._in_flight = 0
        self._phase = "create"
        self._started = time.monotonic()
        self._progress_every = max(10, min(250, figures.asked // 20))

    # The machine, watched.

    def _available(self) -> int:
        available = mem_available()
        self.f.lowest_available_bytes = min(self.f.lowest_available_bytes, available)
        return available

    async def sample(self) -> Sample:
        running = await _count(self._stub, "RUNNING")
        paused = await _count(self._stub, "PAUSED")
        other = len(await _list(self._stub, "state != RUNNING AND state != PAUSED"))
        sample = Sample(
            seconds=time.monotonic() - self._started,
            phase=self._phase,
            created=len(self.members),
            running=running,
            paused=paused,
            other=other,
            available_bytes=self._available(),
            controller_rss_bytes=self._controller.rss_bytes(),
            checkpoint_bytes=await asyncio.to_thread(_tree_bytes, self._checkpoints),
            disk_free_bytes=_disk_free(self._controller.state_dir),
        )
        self.f.samples.append(sample)
        return sample

    async def sample_forever(self) -> None:
        while True:
            try:
                await self.sample()
            except grpc.aio.AioRpcError as exc:
                print(f"  sampling failed: {exc.code().name}: {exc.details()}", flush=True)
            await asyncio.sleep(SAMPLE_S)

    def _progress(self, what: str) -> None:
        last = self.f.samples[-1] if self.f.samples else None
        seen = (
            f", at {last.seconds:.0f} s: {last.running} RUNNING, {last.paused} PAUSED, "
            f"controller RSS {_mib(last.controller_rss_bytes)}, "
            f"checkpoints {_gib(last.checkpoint_bytes)}"
            if last
            else ""
        )
        print(
            f"  {what} ({time.monotonic() - self._started:.0f} s), "
            f"MemAvailable {_gib(mem_available())}{seen}",
            flush=True,
        )

    # Creation.

    def _may_launch(self) -> bool:
        if self._launched >= self.f.asked or self.f.stopped_because:
            return False
        coming = self._in_flight + 1
        available = self._available()
        if available - coming * RUNNING_SANDBOX_RESERVE < MEMORY_FLOOR:
            self.f.stopped_because = (
                f"MemAvailable {_gib(available)}, less {_gib(coming * RUNNING_SANDBOX_RESERVE)} "
                f"for {coming} creates, is under the {MEMORY_FLOOR // GiB} GiB floor"
            )
            return False
        free = _disk_free(self._controller.state_dir)
        if free - coming * CHECKPOINT_RESERVE < DISK_FLOOR:
            self.f.stopped_because = (
                f"free disk {_gib(free)} is under the {DISK_FLOOR // GiB} GiB floor"
            )
            return False
        return True

    async def _create_one(self) -> None:
        index = self._launched
        self._launched += 1
        self._in_flight += 1
        token = secrets.token_hex(8)
        content = os.urandom(FILE_BYTES)
        try:
            sandbox = await self._stub.CreateSandbox(self._request, timeout=CALL_TIMEOUT_S)
            _, response = await _execute(
                self._stub,
                sandbox.name,
                _density_setup(token, index),
                [execution_pb2.File(path=FILE_NAME, content=content)],
            )
            if response.HasField("error"):
                raise RuntimeError(f"its setup failed: {_problem(response, None, '', False)}")
        except (grpc.aio.AioRpcError, RuntimeError) as exc:
            detail = (
                f"{exc.code().name}: {exc.details()}"
                if isinstance(exc, grpc.aio.AioRpcError)
                else str(exc)
            )
            self.f.failures.append(f"create {index}: {detail}")
            if len(self.f.failures) >= MAX_FAILURES:
                self.f.stopped_because = f"{MAX_FAILURES} creates failed"
            return
        finally:
            self._in_flight -= 1
        numbers = sum(range(index, index + 100))
        self.members.append(
            Member(sandbox.name, token, numbers, hashlib.sha256(content).hexdigest())
        )
        if len(self.members) % self._progress_every == 0:
            self._progress(f"{len(self.members)} created")

    async def create_all(self) -> None:
        async def creator() -> None:
            while self._may_launch():
                await self._create_one()

        started = time.perf_counter()
        await asyncio.gather(*(creator() for _ in range(self.f.concurrency)))
        self.f.seconds_to_create = time.perf_counter() - started
        self.f.created = len(self.members)
        self._progress(f"{self.f.created} created in {self.f.seconds_to_create:.0f} s")

    async def wait_all_paused(self, phase: str, within: float) -> float | None:
        """Seconds until none is RUNNING (None if some still are after `within`)."""
        self._phase = phase
        started = time.monotonic()
        while time.monotonic() - started < within:
            if await _count(self._stub, "RUNNING") == 0:
                return time.monotonic() - started
            await asyncio.sleep(1.0)
        return None

    # The checks.

    async def _room_to_resume(self) -> None:
        """Resumes bring sandboxes back: waits for auto-pauses to leave room for them."""
        reserve = MEMORY_FLOOR + CHECK_CONCURRENCY * RUNNING_SANDBOX_RESERVE
        while True:
            if self._available() >= reserve:
                return
            await asyncio.sleep(1.0)

    async def check(self, members: Sequence[Member], phase: str) -> CheckFigures:
        self._phase = phase
        figures = CheckFigures()
        gate = asyncio.Semaphore(CHECK_CONCURRENCY)
        every = max(10, min(250, len(members) // 10))

        async def one(member: Member) -> None:
            async with gate:
                await self._room_to_resume()
                try:
                    elapsed, response = await _execute(self._stub, member.name, DENSITY_CHECK)
                except grpc.aio.AioRpcError as exc:
                    figures.problems.append(f"{member.name}: {exc.code().name}: {exc.details()}")
                    return
                finally:
                    figures.checked += 1
            figures.seconds.append(elapsed)
            figures.restored += response.namespace_restored
            got = response.stdout.strip()
            problem = _problem(response, got, member.expected, restored=False)
            if problem:
                figures.problems.append(f"{member.name}: {problem}")
            else:
                figures.correct += 1
            if figures.checked % every == 0:
                self._progress(f"{phase}: {figures.checked} of {len(members)} checked")

        await asyncio.gather(*(one(m) for m in members))
        within = max(120.0, len(members) * 0.5)
        figures.repaused_after_s = await self.wait_all_paused(f"{phase}, re-pause", within)
        return figures


async def measure_density(
    count: int,
    sample: int,
    check_all: bool,
    auto_pause_after: float,
    preload: str,
    profile: str,
    concurrency: int = CREATE_CONCURRENCY,
) -> DensityFigures:
    figures = DensityFigures(profile, preload or "none", auto_pause_after, count, concurrency)
    settings = {
        **_settings(profile),
        "max_sandboxes_per_project": str(count + 10),
        "warm_pool": "",
        "preload": preload,
    }
    async with (
        controller_process(**settings) as controller,
        channel_to(controller.address) as channel,
    ):
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        log = ControllerLog(controller.state_dir / "controller.log")
        run = _Density(stub, controller, figures)
        figures.available_before_bytes = mem_available()
        figures.rss_before_bytes = controller.rss_bytes()
        figures.disk_free_before_bytes = _disk_free(controller.state_dir)
        print(
            f"hibernate density: up to {count} sandboxes, auto_pause_after "
            f"{auto_pause_after:g} s, preload {figures.preload}",
            flush=True,
        )
        sampler = asyncio.create_task(run.sample_forever())
        try:
            await run.create_all()
            figures.all_paused_after_s = await run.wait_all_paused(
                "settle", max(120.0, figures.created * 0.5)
            )
            await run.sample()
            figures.available_settled_bytes = mem_available()
            figures.rss_settled_bytes = controller.rss_bytes()
            label = registry_label_of(controller.state_dir)
            figures.containers_settled = len(await asyncio.to_thread(pool_members, label))
            chosen = random.Random(7).sample(run.members, min(sample, len(run.members)))
            print(f"  checking a sample of {len(chosen)}", flush=True)
            figures.sample_check = await run.check(chosen, "sample check")
            if check_all:
                print(f"  checking all {len(run.members)}", flush=True)
                figures.full_check = await run.check(run.members, "full check")
            figures.checkpoint_bytes = await asyncio.to_thread(
                _tree_bytes, controller.state_dir / "checkpoints"
            )
            await run.sample()
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            await delete_labelled(stub)
            log.read_new()
            figures.log_counts = dict(log.counts)
            figures.log_seconds = log.seconds
            log.print_problems()
    return figures


def _check_row(what: str, c: CheckFigures) -> list[str]:
    return [
        what,
        f"{c.correct} of {c.checked}",
        f"{c.restored}",
        _p50_p90(c.seconds),
        "NOT all" if c.repaused_after_s is None else f"{c.repaused_after_s:.0f} s",
    ]


def _timeline(samples: Sequence[Sample], rows: int = 25) -> list[list[str]]:
    step = max(1, len(samples) // rows)
    chosen = list(samples[::step])
    if samples and chosen[-1] is not samples[-1]:
        chosen.append(samples[-1])
    return [
        [
            f"{s.seconds:.0f}",
            s.phase,
            str(s.created),
            str(s.running),
            str(s.paused),
            str(s.other),
            _gib(s.available_bytes),
            _mib(s.controller_rss_bytes),
            _gib(s.checkpoint_bytes),
        ]
        for s in chosen
    ]


def print_density(f: DensityFigures) -> None:
    print_table(
        "hibernate density over time (every row a sample; RUNNING and PAUSED from ListSandboxes)",
        [
            "s",
            "phase",
            "created",
            "RUNNING",
            "PAUSED",
            "other",
            "MemAvailable",
            "controller RSS",
            "checkpoints",
        ],
        _timeline(f.samples),
    )
    last_create = [s for s in f.samples if s.phase == "create"]
    rss_peak = max((s.controller_rss_bytes for s in f.samples), default=0)
    n = max(f.created, 1)
    settled_drop = f.available_before_bytes - f.available_settled_bytes
    rows = [
        ["asked for", str(f.asked)],
        ["created (each with a 1 MiB file)", str(f.created)],
        ["failed creates", str(len(f.failures))],
        ["stopped early because", f.stopped_because or "-"],
        ["time to create them", f"{f.seconds_to_create:.0f} s"],
        ["creates per second", f"{f.created / max(f.seconds_to_create, 1e-9):.2f}"],
        [
            "all PAUSED after the last create",
            "-" if f.all_paused_after_s is None else f"{f.all_paused_after_s:.0f} s",
        ],
        [f"RUNNING at once, max (sampled every {SAMPLE_S:g} s)", str(f.max_running)],
        [
            "PAUSED at the end of creation",
            str(last_create[-1].paused) if last_create else "-",
        ],
        [
            "neither RUNNING nor PAUSED at the end (TERMINATED...)",
            str(f.samples[-1].other) if f.samples else "-",
        ],
        [
            "MemAvailable before → lowest",
            f"{_gib(f.available_before_bytes)} → {_gib(f.lowest_available_bytes)}",
        ],
        [
            "containers running once all were PAUSED",
            "-" if f.containers_settled is None else str(f.containers_settled),
        ],
        [
            "MemAvailable drop, all PAUSED, per sandbox (and all else the machine did)",
            f"{settled_drop / n / 1024:.1f} KiB ({_gib(settled_drop)} in all)",
        ],
        [
            "controller RSS before → all PAUSED → peak",
            f"{_mib(f.rss_before_bytes)} → {_mib(f.rss_settled_bytes)} → {_mib(rss_peak)} "
            f"({(f.rss_settled_bytes - f.rss_before_bytes) / n / 1024:.1f} KiB per PAUSED "
            "sandbox)",
        ],
        [
            "checkpoints on disk, all PAUSED",
            f"{_gib(f.checkpoint_bytes)} ({_mib(f.checkpoint_bytes / n)} per sandbox)",
        ],
        [
            "free disk before → lowest",
            f"{_gib(f.disk_free_before_bytes)} → "
            f"{_gib(min((s.disk_free_bytes for s in f.samples), default=0))}",
        ],
        ["controller log: saves, auto-pauses, resumes", _log_note(f.log_counts)],
        *(
            [f"{event}, in the controller, p50 / p90 ms", _p50_p90(f.log_seconds.get(event, []))]
            for event in TIMED_EVENTS
        ),
    ]
    print_table(
        f"hibernate density ({f.profile} profile, preload {f.preload}, no warm pool, "
        f"auto_pause_after {f.auto_pause_after_s:g} s, {f.concurrency} creates at once)",
        ["what", "value"],
        rows,
    )
    checks = [_check_row("random sample", f.sample_check)]
    if f.full_check is not None:
        checks.append(_check_row("every sandbox", f.full_check))
    print_table(
        "answers after hibernation (token, sum of a list, the file's SHA-256)",
        ["checked", "right", "resumed", "ExecuteCode p50 / p90 ms", "all PAUSED again after"],
        checks,
    )
    for problem in [
        *f.failures,
        *f.sample_check.problems,
        *(f.full_check.problems if f.full_check else []),
    ][:10]:
        print(f"  problem: {problem}")
    print_table("hibernate density targets", ["what", "petri", "target", ""], _density_targets(f))
    print(json.dumps(_density_summary(f)))


def _p50_p90(seconds: Sequence[float]) -> str:
    return f"{_ms(median(seconds))} / {_ms(percentile(seconds, 0.9))}" if seconds else "-"


def _log_note(counts: dict[str, int]) -> str:
    events = ("sandbox saved", "pausing an idle sandbox", "sandbox paused", "sandbox resumed")
    return ", ".join(f"{counts.get(e, 0)} {e!r}" for e in events)


def _checks_ok(c: CheckFigures | None) -> bool:
    if c is None:
        return True
    whole = c.checked > 0 and c.correct == c.restored == c.checked
    return whole and c.repaused_after_s is not None


def _density_targets(f: DensityFigures) -> list[list[str]]:
    lost = f.samples[-1].other if f.samples else 0
    memory_ok = f.lowest_available_bytes >= MEMORY_FLOOR and "MemAvailable" not in f.stopped_because
    rows = [
        [
            "sandboxes held at once",
            str(f.created),
            f"≥ {TARGET_COUNT}",
            _met(f.created >= TARGET_COUNT),
        ],
        [
            "RUNNING at once, max (the rest PAUSED)",
            str(f.max_running),
            f"a few hundred (≤ {MAX_RUNNING_TARGET})",
            _met(f.max_running <= MAX_RUNNING_TARGET),
        ],
        [
            "lowest MemAvailable",
            _gib(f.lowest_available_bytes),
            f"≥ {MEMORY_FLOOR // GiB} GiB",
            _met(memory_ok),
        ],
        [
            "sandboxes lost (neither RUNNING nor PAUSED at the end)",
            str(lost),
            "0",
            _met(lost == 0),
        ],
        [
            "all PAUSED by themselves after creation",
            "-" if f.all_paused_after_s is None else f"after {f.all_paused_after_s:.0f} s",
            "yes",
            _met(f.all_paused_after_s is not None),
        ],
        [
            "random sample answers right, then PAUSED again",
            f"{f.sample_check.correct} of {f.sample_check.checked}",
            "all of ≥ 200",
            _met(_checks_ok(f.sample_check) and f.sample_check.checked >= 200),
        ],
    ]
    if f.full_check is not None:
        rows.append(
            [
                "every sandbox answers right, then PAUSED again",
                f"{f.full_check.correct} of {f.full_check.checked}",
                "all",
                _met(_checks_ok(f.full_check)),
            ]
        )
    return rows


def _density_summary(f: DensityFigures) -> dict[str, Any]:
    def checks(c: CheckFigures | None) -> dict[str, Any] | None:
        if c is None:
            return None
        return {
            "checked": c.checked,
            "correct": c.correct,
            "restored": c.restored,
            "p50_s": round(median(c.seconds), 4) if c.seconds else None,
            "p90_s": round(percentile(c.seconds, 0.9), 4) if c.seconds else None,
            "repaused_after_s": None
            if c.repaused_after_s is None
            else round(c.repaused_after_s, 1),
        }

    return {
        "bench": "hibernate",
        "part": "density",
        "profile": f.profile,
        "preload": f.preload,
        "auto_pause_after_s": f.auto_pause_after_s,
        "concurrency": f.concurrency,
        "asked": f.asked,
        "created": f.created,
        "failures": len(f.failures),
        "stopped_because": f.stopped_because,
        "seconds_to_create": round(f.seconds_to_create, 1),
        "all_paused_after_s": None
        if f.all_paused_after_s is None
        else round(f.all_paused_after_s, 1),
        "max_running": f.max_running,
        "other_at_end": f.samples[-1].other if f.samples else None,
        "available_before_bytes": f.available_before_bytes,
        "lowest_available_bytes": f.lowest_available_bytes,
        "available_settled_bytes": f.available_settled_bytes,
        "controller_rss_before_bytes": f.rss_before_bytes,
        "controller_rss_settled_bytes": f.rss_settled_bytes,
        "containers_settled": f.containers_settled,
        "controller_rss_peak_bytes": max((s.controller_rss_bytes for s in f.samples), default=0),
        "checkpoint_bytes": f.checkpoint_bytes,
        "sample_check": checks(f.sample_check),
        "full_check": checks(f.full_check),
    }


# --- the command ---------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    if args.part in ("latency", "both"):
        print_latency(await measure_latency(args.profile, args.repeats, args.resumes))
    if args.part in ("density", "both"):
        figures = await measure_density(
            args.count,
            args.sample,
            args.check_all,
            args.auto_pause_after,
            args.preload,
            args.profile,
            args.concurrency,
        )
        print_density(figures)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--part", choices=("latency", "density", "both"), default="both")
    parser.add_argument("--profile", default="full", help="image profile (default: full)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="pauses and resumes of the DataFrame"
    )
    parser.add_argument("--resumes", type=int, default=30, help="resumes of the small namespace")
    parser.add_argument("--count", type=int, default=TARGET_COUNT, help="sandboxes to hold")
    parser.add_argument("--sample", type=int, default=200, help="sandboxes checked at random")
    parser.add_argument("--check-all", action="store_true", help="then check every sandbox")
    parser.add_argument("--auto-pause-after", type=float, default=2.0, help="seconds")
    parser.add_argument(
        "--concurrency", type=int, default=CREATE_CONCURRENCY, help="creates at once"
    )
    parser.add_argument(
        "--preload", default="", help="modules the density part's sandboxes preload (none)"
    )
    args = parser.parse_args()
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:  # the cleanup ran: each part deletes what it made, then stops
        print("interrupted: the sandboxes made so far are deleted", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
