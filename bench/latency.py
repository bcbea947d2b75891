"""Latency and throughput of the basic operations: create → RUNNING, cold and from the warm
pool; create + a first execution that imports pandas and summarises a CSV; ExecuteCode `1+1`
round trips; aggregate executes/s over 1, 10 and 50 sandboxes in parallel.

Two controller processes: one without a warm pool (cold creates, round trips, throughput),
one with a pool of the default kind. Run as the service user (scripts/bench does):
python -m bench.latency [--creates N] [--round-trips N] [--profile P]
"""

import argparse
import asyncio
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import channel_to, controller_process, median, percentile, print_table
from bench.workloads import CSV_NAME, PANDAS_CODE, ROUND_TRIP_CODE, sales_csv
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PARENT = "projects/bench"
POOL_SIZE = 3
# A pool member is ready once its interpreter has preloaded (about a second after its
# container started on this machine kind); the controller does not publish that, so the
# benchmark waits for members this much older than their start.
POOL_SETTLE_SECONDS = 3.0
THROUGHPUT_SECONDS = 5.0


@dataclass
class LatencyFigures:
    """Seconds per sample, by what was measured."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    # Executes per second, by how many sandboxes ran them in parallel.
    throughput: dict[int, float] = field(default_factory=dict)
    # Pool creates that found the pool empty and started cold (left out of the pool figures).
    pool_misses: int = 0


def row(what: str, seconds: list[float], target: str = "") -> list[str]:
    return [
        what,
        str(len(seconds)),
        f"{median(seconds) * 1000:.1f}",
        f"{percentile(seconds, 0.9) * 1000:.1f}",
        f"{percentile(seconds, 0.99) * 1000:.1f}",
        target,
    ]


async def create(stub: "Stub", profile: str) -> sandbox_pb2.Sandbox:
    sandbox: sandbox_pb2.Sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(
            parent=PARENT,
            sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
        )
    )
    return sandbox


async def delete(stub: "Stub", name: str) -> None:
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))


def check_pandas(response: sandbox_pb2.ExecuteCodeResponse) -> None:
    if response.HasField("error") or "north" not in response.stdout:
        raise RuntimeError(f"the pandas workload failed: {response.error or response.stdout!r}")


async def first_pandas(stub: "Stub", name: str) -> None:
    response = await stub.ExecuteCode(
        sandbox_pb2.ExecuteCodeRequest(
            name=name,
            code=PANDAS_CODE,
            files=[execution_pb2.File(path=CSV_NAME, content=sales_csv())],
        )
    )
    check_pandas(response)


async def creates(stub: "Stub", count: int, profile: str, pandas: bool) -> list[float]:
    """Creates (and deletes) sandboxes one at a time; with `pandas`, times create + the first
    pandas execution."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sandbox = await create(stub, profile)
        if pandas:
            await first_pandas(stub, sandbox.name)
        times.append(time.perf_counter() - started)
        await delete(stub, sandbox.name)
    return times


def pool_members(registry_label: str) -> list[tuple[str, float]]:
    """(uid, seconds since its container started) of this controller's unclaimed containers."""
    out = subprocess.run(
        [
            "podman",
            "ps",
            "--filter",
            f"label=io.petri.registry={registry_label}",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    members = []
    for container in json.loads(out or "[]"):
        started = datetime.fromtimestamp(container["StartedAt"]).timestamp()
        members.append((container["Labels"]["io.petri.uid"], time.time() - started))
    return members


async def wait_pool_ready(registry_label: str, claimed: set[str]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        members = [m for m in pool_members(registry_label) if m[0] not in claimed]
        if len(members) >= POOL_SIZE and all(age > POOL_SETTLE_SECONDS for _, age in members):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("the warm pool did not refill in 120 s")


async def pool_creates(
    stub: "Stub", registry_label: str, count: int, profile: str, pandas: bool
) -> tuple[list[float], int]:
    """Like `creates`, each from a full pool; returns the times of those served by the pool
    and how many were not (their container was not among the members before the call)."""
    times, misses = [], 0
    for _ in range(count):
        await wait_pool_ready(registry_label, set())
        members = {uid for uid, _ in pool_members(registry_label)}
        started = time.perf_counter()
        sandbox = await create(stub, profile)
        if pandas:
            await first_pandas(stub, sandbox.name)
        elapsed = time.perf_counter() - started
        if sandbox.uid in members:
            times.append(elapsed)
        else:
            misses += 1
        await delete(stub, sandbox.name)
    return times, misses


async def round_trips(stub: "Stub", name: str, count: int) -> list[float]:
    times = []
    request = sandbox_pb2.ExecuteCodeRequest(name=name, code=ROUND_TRIP_CODE)
    for _ in range(count):
        started = time.perf_counter()
        response = await stub.ExecuteCode(request)
        times.append(time.perf_counter() - started)
        value = response.outputs[-1].text["text/plain"] if response.outputs else None
        if value != "2":
            raise RuntimeError(f"1+1 gave {value!r}: {response.error}")
    return times


async def throughput(stub: "Stub", names: list[str], seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def loop(name: str) -> None:
        nonlocal done
        request = sandbox_pb2.ExecuteCodeRequest(name=name, code=ROUND_TRIP_CODE)
        while time.perf_counter() < deadline:
            await stub.ExecuteCode(request)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(n) for n in names))
    return done / (time.perf_counter() - started)


def registry_label_of(state_dir: Path) -> str:
    """The label of a controller's containers, as SandboxManager derives it."""
    database = (state_dir / "petri.db").resolve()
    return hashlib.sha256(str(database).encode()).hexdigest()[:12]


async def measure(creates_n: int, round_trips_n: int, profile: str) -> LatencyFigures:
    figures = LatencyFigures()
    quotas = {
        "max_executes_per_minute": "10000000",
        "max_sandboxes_per_project": "1000",
        "default_image_profile": profile,
    }
    print(f"latency: cold creates, round trips, throughput ({profile} profile)", flush=True)
    async with (
        controller_process(**quotas, warm_pool="") as controller,
        channel_to(controller.address) as channel,
    ):
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        figures.samples["create cold"] = await creates(stub, creates_n, profile, pandas=False)
        figures.samples["create + pandas cold"] = await creates(
            stub, max(5, creates_n // 2), profile, pandas=True
        )
        gate = asyncio.Semaphore(8)  # under the server's limit of creates at once

        async def gated_create() -> sandbox_pb2.Sandbox:
            async with gate:
                return await create(stub, profile)

        names: list[str] = []
        # Each figure with as many sandboxes as it uses: idle ones cost a little CPU too
        # (the controller's container watcher lists them every 2 s).
        for parallel in (1, 10, 50):
            more = await asyncio.gather(*(gated_create() for _ in range(parallel - len(names))))
            names += [s.name for s in more]
            for sandbox in more:  # the first execution waits for the preload; not measured
                await round_trips(stub, sandbox.name, 3)
            if parallel == 1:
                await round_trips(stub, names[0], 50)
                figures.samples["1+1 round trip"] = await round_trips(stub, names[0], round_trips_n)
            figures.throughput[parallel] = await throughput(
                stub, names[:parallel], THROUGHPUT_SECONDS
            )
    print("latency: creates from the warm pool", flush=True)
    async with (
        controller_process(**quotas, warm_pool=f"size={POOL_SIZE}") as controller,
        channel_to(controller.address) as channel,
    ):
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        label = registry_label_of(controller.state_dir)
        pooled, misses = await pool_creates(stub, label, creates_n, profile, pandas=False)
        figures.samples["create from pool"] = pooled
        pooled, more_misses = await pool_creates(stub, label, creates_n, profile, pandas=True)
        figures.samples["create + pandas from pool"] = pooled
        figures.pool_misses = misses + more_misses
    return figures


def print_figures(figures: LatencyFigures, profile: str) -> None:
    targets = {
        "create from pool": "p50 ≤ 30, p99 ≤ 100",
        "create cold": "p50 ≤ 500",
        "create + pandas from pool": "p99 ≤ 1000",
        "create + pandas cold": "",
        "1+1 round trip": "p50 ≤ 3, p99 ≤ 10",
    }
    print_table(
        f"petri latency, milliseconds ({profile} profile, runc)",
        ["what", "n", "p50", "p90", "p99", "target"],
        [row(what, figures.samples[what], target) for what, target in targets.items()],
    )
    if figures.pool_misses:
        print(f"({figures.pool_misses} pool creates found the pool empty: left out above)")
    print_table(
        f"aggregate ExecuteCode `1+1` throughput, {THROUGHPUT_SECONDS:.0f} s each",
        ["sandboxes in parallel (and live)", "executes/s", "target"],
        [
            [str(n), f"{rate:.0f}", "≥ 500" if n == 10 else ""]
            for n, rate in figures.throughput.items()
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=20)
    parser.add_argument("--round-trips", type=int, default=1000)
    parser.add_argument("--profile", default="full")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.creates, args.round_trips, args.profile))
    print_figures(figures, args.profile)


if __name__ == "__main__":
    main()
