"""Where the CPU of ExecuteCode `1+1` goes: client, controller, podman, and the sandboxes'
executors and workers, as CPU seconds per execution over a few seconds of throughput.

On a 2-core machine, aggregate executes/s is bounded by the CPU one execution costs across all
these processes; this splits that cost by process. Run as the service user:
python -m bench.cpu_split [--parallel N] [--seconds S]
"""

import argparse
import asyncio
import os
import resource
import time
from pathlib import Path

from bench.harness import channel_to, controller_process, print_table
from bench.latency import create, round_trips, throughput
from petri.v1 import sandbox_pb2_grpc

TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_by_process() -> dict[int, tuple[str, float]]:
    """(command, CPU seconds) of every process we can read, by pid."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (command, (int(fields[11]) + int(fields[12])) / TICKS)
    return out


def _kind(command: str, controller_pid: int, pid: int) -> str:
    if pid == controller_pid:
        return "controller"
    if "executor.worker" in command:
        return "workers"
    if "-m executor" in command:
        return "executors"
    if command.startswith(("podman", "/usr/bin/podman")) or "conmon" in command:
        return "podman and conmon"
    return ""


async def run(parallel: int, seconds: float) -> None:
    settings = {"max_executes_per_minute": "10000000", "warm_pool": ""}
    async with controller_process(**settings) as controller, channel_to(controller.address) as ch:
        stub = sandbox_pb2_grpc.SandboxServiceStub(ch)
        names = [(await create(stub, "full")).name for _ in range(parallel)]
        for name in names:
            await round_trips(stub, name, 3)
        before = _cpu_by_process()
        client_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        rate = await throughput(stub, names, seconds)
        elapsed = time.perf_counter() - started
        client_after = resource.getrusage(resource.RUSAGE_SELF)
        after = _cpu_by_process()
    executions = rate * elapsed
    spent: dict[str, float] = {
        "client (this benchmark)": (client_after.ru_utime + client_after.ru_stime)
        - (client_before.ru_utime + client_before.ru_stime)
    }
    for pid, (command, cpu) in after.items():
        kind = _kind(command, controller.process.pid, pid)
        if kind:
            spent[kind] = spent.get(kind, 0.0) + cpu - before.get(pid, (command, 0.0))[1]
    total = sum(spent.values())
    rows = [
        [kind, f"{cpu / executions * 1e6:.0f}", f"{cpu / total * 100:.0f} %"]
        for kind, cpu in sorted(spent.items(), key=lambda item: -item[1])
    ]
    rows.append(["all", f"{total / executions * 1e6:.0f}", "100 %"])
    print_table(
        f"CPU per ExecuteCode `1+1`, {parallel} sandboxes in parallel, {rate:.0f} executes/s "
        f"over {elapsed:.1f} s ({os.cpu_count()} cores)",
        ["process", "CPU µs per execution", "share"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(run(args.parallel, args.seconds))


if __name__ == "__main__":
    main()
