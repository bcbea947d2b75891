"""Creates under load (issue 16): bursts of concurrent creates, a sustained rate, and a lone
create once the warm pool has shrunk back, against one controller on its default settings.

Each measured call is what an orchestrator fanning out sub-agents does: CreateSandbox, then a
first execution (`1+1` in the bursts, a pandas aggregation of an input CSV in the sustained
part), timed together from the create's start. In one run, on one controller process:

1. A first-ever burst of --burst concurrent calls, as soon as the controller is healthy and its
   warm pool is ready (its default size).
2. A second burst --gap seconds after the first one started (the pool has seen the first).
3. --rates calls per second for --sustain seconds (each rate in turn), each sandbox deleted
   once its call is done; the host's MemAvailable is sampled throughout.
4. Idle: waits (at most --idle-wait seconds) until every pooled kind's target is back at its
   minimum (--pool-min, the default config's min=2), read from the controller's metrics, then
   one lone create: a pool hit? (A learned level is held 10 minutes, then halves every 5.)

Run as the service user (scripts/bench does): python -m bench.burst [--profile full]
[--burst 20] [--gap 60] [--rates 4[,R...]] [--sustain 60] [--idle-wait 2400] [--pool-min 2]
[--parts first,second,sustained,idle] [--setting KEY=VALUE]...
(--setting passes a controller option through its PETRI_* variable, e.g. a shorter pool
decay for the idle part; the figures say which were given.)
"""

import argparse
import asyncio
import contextlib
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from google.protobuf import duration_pb2
from prometheus_client.parser import text_string_to_metric_families

from bench.harness import channel_to, controller_process, free_port, percentile, print_table
from bench.workloads import CSV_NAME, PANDAS_CODE, sales_csv
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PROJECT = "bench"
CALL_DEADLINE = 120.0  # seconds: what a patient orchestrator gives one create


@dataclass
class Sample:
    seconds: float
    code: str  # "OK" or the failing status's name
    detail: str = ""


@dataclass
class Part:
    title: str
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    note: str = ""

    def ok(self) -> list[float]:
        return [s.seconds for s in self.samples if s.code == "OK"]


def _timeout(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromMilliseconds(int(seconds * 1000))
    return value


def mem_available() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the controller's /metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **want: str
) -> float:
    return sum(
        value
        for (metric, labels), value in samples.items()
        if metric == name and all(dict(labels).get(k) == v for k, v in want.items())
    )


async def one_call(
    stub: "Stub", profile: str, code: str, files: list[execution_pb2.File]
) -> Sample:
    """CreateSandbox then a first ExecuteCode, timed together; the sandbox is deleted after."""
    began = time.monotonic()
    name = ""
    try:
        sandbox = await stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(
                parent=f"projects/{PROJECT}",
                sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
            ),
            timeout=CALL_DEADLINE,
        )
        name = sandbox.name
        response = await stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=name, code=code, files=files, timeout=_timeout(60)),
            timeout=CALL_DEADLINE,
        )
        seconds = time.monotonic() - began
        if response.HasField("error"):
            return Sample(seconds, "CODE_ERROR", f"{response.error.ename}: {response.error.evalue}")
        return Sample(seconds, "OK")
    except grpc.aio.AioRpcError as exc:
        return Sample(time.monotonic() - began, exc.code().name, (exc.details() or "")[:200])
    finally:
        if name:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.DeleteSandbox(
                    sandbox_pb2.DeleteSandboxRequest(name=name, allow_missing=True), timeout=60
                )


async def burst(stub: "Stub", title: str, count: int, profile: str) -> Part:
    part = Part(title)
    began = time.monotonic()
    part.samples = list(
        await asyncio.gather(*(one_call(stub, profile, "1+1", []) for _ in range(count)))
    )
    part.wall = time.monotonic() - began
    return part


async def sustained(stub: "Stub", rate: float, seconds: float, profile: str) -> tuple[Part, int]:
    """`rate` calls per second for `seconds`, each with the pandas workload; the lowest
    MemAvailable seen meanwhile."""
    files = [execution_pb2.File(path=CSV_NAME, content=sales_csv())]
    part = Part(f"sustained: {rate:g}/s for {seconds:g} s, each + a pandas execution")
    lowest = mem_available()
    tasks: list[asyncio.Task[Sample]] = []
    began = time.monotonic()
    for index in range(int(rate * seconds)):
        await asyncio.sleep(max(0.0, began + index / rate - time.monotonic()))
        tasks.append(asyncio.ensure_future(one_call(stub, profile, PANDAS_CODE, files)))
        lowest = min(lowest, mem_available())
    while not all(task.done() for task in tasks):
        lowest = min(lowest, mem_available())
        await asyncio.wait(tasks, timeout=0.5)
    part.samples = [task.result() for task in tasks]
    part.wall = time.monotonic() - began
    return part, lowest


async def idle_then_lone_create(
    stub: "Stub", metrics_url: str, wait: float, minimum: float, profile: str
) -> Part:
    """Waits until each pooled kind's target is down to `minimum` and its members are ready, then
    times one create + `1+1` and reads whether it came from the pool."""
    part = Part("idle, then a lone create")
    began = time.monotonic()
    settled = False
    while time.monotonic() - began < wait:
        samples = scrape(metrics_url)
        targets = {labels: v for (n, labels), v in samples.items() if n == "petri_warm_pool_target"}
        ready = {labels: v for (n, labels), v in samples.items() if n == "petri_warm_pool_ready"}
        at_minimum = all(value <= minimum for value in targets.values())
        if targets and at_minimum and all(ready.get(k, 0) >= v for k, v in targets.items()):
            settled = True
            break
        await asyncio.sleep(5)
    waited = time.monotonic() - began
    before = _sum(scrape(metrics_url), "petri_sandbox_creates_total", source="pool")
    part.samples = [await one_call(stub, profile, "1+1", [])]
    part.wall = part.samples[0].seconds
    after = _sum(scrape(metrics_url), "petri_sandbox_creates_total", source="pool")
    hit = after > before
    part.note = (
        f"pool back at its minimum after {waited:.0f} s of idleness"
        if settled
        else f"the pool was NOT back at its minimum after {waited:.0f} s"
    ) + f"; the lone create was a pool {'hit' if hit else 'MISS'}"
    return part


def row(part: Part, target: str) -> list[str]:
    ok = part.ok()
    failures = Counter(s.code for s in part.samples if s.code != "OK")
    failed = ", ".join(f"{n} {code}" for code, n in failures.most_common()) or "none"
    if not ok:
        return [
            part.title,
            str(len(part.samples)),
            "0",
            "-",
            "-",
            "-",
            f"{part.wall:.2f}",
            failed,
            target,
        ]
    return [
        part.title,
        str(len(part.samples)),
        str(len(ok)),
        f"{percentile(ok, 0.5) * 1000:.0f}",
        f"{percentile(ok, 0.99) * 1000:.0f}",
        f"{max(ok) * 1000:.0f}",
        f"{part.wall:.2f}",
        failed,
        target,
    ]


async def run(args: argparse.Namespace) -> None:
    metrics_port = free_port()
    settings = dict(item.split("=", 1) for item in args.setting)
    settings.setdefault("metrics_listen", f"127.0.0.1:{metrics_port}")
    metrics_url = f"http://{settings['metrics_listen']}/metrics"
    async with (
        controller_process(**settings) as controller,
        channel_to(controller.address) as channel,
    ):
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        # The pool's default members, ready before the first burst (a service that just
        # started has had no more time than this).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            samples = scrape(metrics_url)
            targets = {k: v for (n, k), v in samples.items() if n == "petri_warm_pool_target"}
            ready = {k: v for (n, k), v in samples.items() if n == "petri_warm_pool_ready"}
            if all(ready.get(k, 0) >= v for k, v in targets.items()):
                break
            await asyncio.sleep(0.5)
        pool_before = {
            dict(k).get("profile", "?"): v
            for (n, k), v in scrape(metrics_url).items()
            if n == "petri_warm_pool_ready"
        }
        parts: list[tuple[Part, str]] = []
        if "first" in args.parts:
            first_started = time.monotonic()
            first = await burst(stub, f"first burst of {args.burst}", args.burst, args.profile)
            parts.append((first, "all succeed, p99 <= 5 s"))
            print(f"burst 1 done in {first.wall:.1f} s", flush=True)
            await asyncio.sleep(max(0.0, first_started + args.gap - time.monotonic()))
        if "second" in args.parts:
            second = await burst(
                stub,
                f"second burst of {args.burst}, {args.gap:g} s later",
                args.burst,
                args.profile,
            )
            parts.append((second, "p99 <= 1 s"))
            print(f"burst 2 done in {second.wall:.1f} s", flush=True)
        for rate in args.rates if "sustained" in args.parts else []:
            free_before = mem_available()
            steady, lowest = await sustained(stub, rate, args.sustain, args.profile)
            gib = 2**30
            steady.note = (
                f"MemAvailable {free_before / gib:.1f} GiB before, lowest {lowest / gib:.1f} GiB"
            )
            parts.append((steady, "p99 <= 1 s, memory within budget"))
            print(f"sustained part at {rate:g}/s done in {steady.wall:.1f} s", flush=True)
        if "idle" in args.parts:
            lone = await idle_then_lone_create(
                stub, metrics_url, args.idle_wait, args.pool_min, args.profile
            )
            parts.append((lone, "a pool hit, <= 30 ms to create"))
        final = scrape(metrics_url)
    given = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "metrics_listen")
    print_table(
        f"Creates under load ({args.profile} profile; settings: {given or 'defaults'}; "
        f"pool ready at the start: {pool_before})",
        ["part", "calls", "ok", "p50 ms", "p99 ms", "max ms", "wall s", "failed", "target"],
        [row(part, target) for part, target in parts],
    )
    for part, _ in parts:
        if part.note:
            print(f"- {part.title}: {part.note}")
        for sample in part.samples:
            if sample.code != "OK":
                print(f"  {sample.code}: {sample.detail}")
                break
    hits = _sum(final, "petri_sandbox_creates_total", source="pool")
    cold = _sum(final, "petri_sandbox_creates_total", source="cold")
    print(f"- creates over the run: {hits:.0f} from the pool, {cold:.0f} cold")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="full")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--gap", type=float, default=60.0)
    parser.add_argument(
        "--rates",
        type=lambda text: [float(rate) for rate in text.split(",")],
        default=[4.0],
        help="calls per second of the sustained part, comma-separated: one part each, in turn",
    )
    parser.add_argument(
        "--parts",
        type=lambda text: set(text.split(",")),
        default={"first", "second", "sustained", "idle"},
        help="which parts run, comma-separated: first, second, sustained, idle (default all)",
    )
    parser.add_argument("--sustain", type=float, default=60.0)
    parser.add_argument("--idle-wait", type=float, default=2400.0)
    parser.add_argument("--pool-min", type=float, default=2.0, help="the pool's configured min=")
    parser.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
