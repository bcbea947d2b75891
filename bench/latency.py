"""Latency and throughput of the basic operations, for issue 7's targets: create → RUNNING
(cold: no warm pool yet), ExecuteCode `1+1` round trips, and executes per second over 1 and
10 sandboxes in parallel.

Run as the service user (scripts/bench does): python -m bench.latency [--creates N]
"""

import argparse
import asyncio
import time
from typing import TYPE_CHECKING

from bench.harness import channel_to, controller_process, median, percentile, print_table
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub

PARENT = "projects/bench"


def _row(what: str, seconds: list[float], target: str) -> list[str]:
    return [
        what,
        str(len(seconds)),
        f"{median(seconds) * 1000:.1f}",
        f"{percentile(seconds, 0.9) * 1000:.1f}",
        f"{percentile(seconds, 0.99) * 1000:.1f}",
        target,
    ]


async def _creates(stub: "SandboxServiceAsyncStub", count: int, profile: str) -> list[float]:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sandbox = await stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(
                parent=PARENT,
                sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
            )
        )
        times.append(time.perf_counter() - started)
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    return times


async def _round_trips(stub: "SandboxServiceAsyncStub", name: str, count: int) -> list[float]:
    times = []
    request = sandbox_pb2.ExecuteCodeRequest(name=name, code="1+1")
    for _ in range(count):
        started = time.perf_counter()
        await stub.ExecuteCode(request)
        times.append(time.perf_counter() - started)
    return times


async def _throughput(stub: "SandboxServiceAsyncStub", names: list[str], seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(name: str) -> None:
        nonlocal done
        request = sandbox_pb2.ExecuteCodeRequest(name=name, code="1+1")
        while time.perf_counter() < deadline:
            await stub.ExecuteCode(request)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in names))
    return done / (time.perf_counter() - started)


async def run(creates: int, round_trips: int, profile: str) -> None:
    settings = {"max_executes_per_minute": "10000000", "default_image_profile": profile}
    async with (
        controller_process(**settings) as controller,
        channel_to(controller.address) as channel,
    ):
        stub: SandboxServiceAsyncStub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        create_times = await _creates(stub, creates, profile)
        sandboxes = [
            await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            for _ in range(10)
        ]
        names = [s.name for s in sandboxes]
        await _round_trips(stub, names[0], 20)  # warm the channels
        trips = await _round_trips(stub, names[0], round_trips)
        rows = [
            _row(f"create → RUNNING, cold ({profile})", create_times, "p50 ≤ 500 ms"),
            _row("ExecuteCode `1+1` round trip", trips, "p50 ≤ 3 ms, p99 ≤ 10 ms"),
        ]
        print_table(
            "petri latency, milliseconds (medians of this run)",
            ["what", "n", "p50", "p90", "p99", "target"],
            rows,
        )
        one = await _throughput(stub, names[:1], 5)
        ten = await _throughput(stub, names, 5)
        print_table(
            "aggregate ExecuteCode `1+1` throughput, 5 s each",
            ["sandboxes in parallel", "executes/s", "target"],
            [["1", f"{one:.0f}", ""], ["10", f"{ten:.0f}", "≥ 500"]],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=20)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--profile", default="test")
    args = parser.parse_args()
    asyncio.run(run(args.creates, args.round_trips, args.profile))


if __name__ == "__main__":
    main()
