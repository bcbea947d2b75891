"""The container watcher (issue 16): what watching idle sandboxes costs, and how soon a dead one
is found.

For 10, then 50 idle live sandboxes on one controller: the controller's own CPU per minute,
and its podman services' (/proc/PID/stat utime+stime over a window), the `1+1` round trip
(median of sequential ExecuteCode calls on one of them), and how long a container killed with
`podman kill` takes to show no longer RUNNING in GetSandbox (TERMINATED). Idle checkpoints are
off, so that no save lands in the CPU window. Run it once on each version of the controller to
compare: `--controller-source DIR` runs the controller from another checkout (e.g. the commit
before the watcher) while the benchmark stays this one.

Run as the service user (scripts/bench does): python -m bench.watcher [--counts 10 50]
[--window 60] [--calls 300] [--profile test] [--controller-source DIR]
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import channel_to, controller_process, median, print_table
from bench.latency import create, round_trips
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

TICKS = os.sysconf("SC_CLK_TCK")
CREATE_CONCURRENCY = 4
# After the creates, before the CPU window: the last creates' after-work settles.
SETTLE_S = 5.0
KILLS = 3  # containers killed per count, for the time to TERMINATED
FOUND_WITHIN_S = 120.0


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def podman_services(controller_pid: int) -> list[int]:
    """The pids of the controller's own `podman system service`s (runc's and gVisor's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        if parent == controller_pid and b"system service" in command:
            found.append(int(entry.name))
    return found


async def cpu_per_minute(pids: list[int], window: float) -> list[float]:
    before = [cpu_seconds(pid) for pid in pids]
    await asyncio.sleep(window)
    after = [cpu_seconds(pid) for pid in pids]
    return [(b - a) * 60 / window for a, b in zip(before, after, strict=True)]


async def create_many(stub: "Stub", count: int, profile: str) -> list[sandbox_pb2.Sandbox]:
    gate = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def one() -> sandbox_pb2.Sandbox:
        async with gate:
            return await create(stub, profile)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def time_to_found(stub: "Stub", sandbox: sandbox_pb2.Sandbox) -> float:
    killed = time.monotonic()
    subprocess.run(["podman", "kill", f"petri-{sandbox.uid}"], capture_output=True, check=True)
    request = sandbox_pb2.GetSandboxRequest(name=sandbox.name)
    while (await stub.GetSandbox(request)).state == sandbox_pb2.Sandbox.RUNNING:
        if time.monotonic() - killed > FOUND_WITHIN_S:
            raise RuntimeError(f"{sandbox.name} was not found dead in {FOUND_WITHIN_S} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - killed


async def run(counts: list[int], window: float, calls: int, profile: str) -> None:
    # No idle checkpoints: their saves would land in the CPU window (and a killed sandbox
    # would come back PAUSED rather than TERMINATED; either is found).
    settings = {"warm_pool": "", "default_image_profile": profile, "checkpoint_idle_after": "0s"}
    rows = []
    async with controller_process(**settings) as controller, channel_to(controller.address) as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
        pid = controller.process.pid
        services = podman_services(pid)
        live: list[sandbox_pb2.Sandbox] = []
        for count in counts:
            live += await create_many(stub, count - len(live), profile)
            await asyncio.sleep(SETTLE_S)
            spent = await cpu_per_minute([pid, *services], window)
            probe = live[0].name
            await round_trips(stub, probe, 10)  # warm
            trips = await round_trips(stub, probe, calls)
            # Killed at the end, replaced before the next count: `count` stay live meanwhile.
            found = [await time_to_found(stub, sandbox) for sandbox in live[-KILLS:]]
            for sandbox in live[-KILLS:]:
                await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
            live = live[:-KILLS]
            rows.append(
                [
                    str(count),
                    f"{spent[0]:.2f}",
                    f"{sum(spent[1:]):.2f}",
                    f"{median(trips) * 1000:.1f}",
                    f"{statistics.fmean(trips) * 1000:.1f}",
                    f"{median(found):.2f}",
                ]
            )
            print(f"{count} live: done", flush=True)
    print_table(
        f"Idle live sandboxes: CPU over {window:.0f} s, {calls} sequential `1+1`, "
        f"{KILLS} containers killed",
        [
            "live",
            "controller CPU s/min",
            "podman service CPU s/min",
            "1+1 p50 ms",
            "1+1 mean ms",
            "kill → found s",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--window", type=float, default=60.0, help="seconds of CPU sampling")
    parser.add_argument("--calls", type=int, default=300, help="sequential 1+1 per count")
    parser.add_argument("--profile", default="test", help="the sandboxes' image profile")
    parser.add_argument(
        "--controller-source",
        type=Path,
        help="run the controller from this checkout (its controller/ and client/)",
    )
    args = parser.parse_args()
    if args.controller_source is not None:
        # `python -m controller` finds its package in its working directory first.
        source = args.controller_source.resolve()
        os.environ["PYTHONPATH"] = f"{source}:{source / 'client'}"
        os.chdir(source)
    asyncio.run(run(sorted(args.counts), args.window, args.calls, args.profile))


if __name__ == "__main__":
    main()
