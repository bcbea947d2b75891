"""What a cold create costs (issue 16): wall time of CreateSandbox and of create + a first
execution sent at once (`1+1`, `import pandas`, or all the preloaded modules: what a warm pool
member's interpreter holds), and the CPU one create spends, split by process:
the controller, its podman service (with the `runc start` it reaps), conmon (with `runc
create`), and inside the sandbox tini, the executor daemon and the worker (whose CPU is mostly
the preload of numpy, pandas and matplotlib.pyplot).

No warm pool: every create starts a container. The CPU of a sandbox's processes is read just
before it is deleted, after its first execution (which ends or stops the preload). Run as the
service user (scripts/bench does): python -m bench.cold_start [--creates N] [--profiles ...]
[--repositories A,B] (several image repositories: the same figures for each, one after the
other, to compare two builds of the image in one run).
"""

import argparse
import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import channel_to, controller_process, median, print_table
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

PARENT = "projects/bench"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class _Proc:
    ppid: int
    command: str
    # Its own CPU seconds, and those of its children it has reaped.
    own: float
    reaped: float


def _processes() -> dict[int, _Proc]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = _Proc(
            ppid=int(fields[1]),
            command=command,
            own=(int(fields[11]) + int(fields[12])) / TICKS,
            reaped=(int(fields[13]) + int(fields[14])) / TICKS,
        )
    return out


def _descendants(processes: dict[int, _Proc], root: int) -> list[int]:
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier.extend(p for p, proc in processes.items() if proc.ppid == pid)
    return found


def _host_cpu(processes: dict[int, _Proc], controller_pid: int) -> dict[str, float]:
    """The controller's CPU and its podman service's (each with what it reaped)."""
    out = {"controller": 0.0, "podman service": 0.0}
    for pid in _descendants(processes, controller_pid):
        proc = processes[pid]
        kind = "controller" if pid == controller_pid else "podman service"
        if kind == "controller" or "system service" in proc.command:
            out[kind] += proc.own + proc.reaped
    return out


def _sandbox_cpu(processes: dict[int, _Proc], container_name: str) -> dict[str, float]:
    """The CPU of the sandbox's conmon (with the `runc create` it reaped) and of the processes
    under it, by kind."""
    out = {"conmon + runc create": 0.0, "tini": 0.0, "executor daemon": 0.0, "worker": 0.0}
    conmons = [
        pid
        for pid, proc in processes.items()
        if "conmon" in proc.command.split(" ", 1)[0] and f" {container_name} " in proc.command
    ]
    for conmon in conmons:
        out["conmon + runc create"] += processes[conmon].own + processes[conmon].reaped
        for pid in _descendants(processes, conmon)[1:]:
            proc = processes[pid]
            if "executor.worker" in proc.command:
                kind = "worker"
            elif "-m executor" in proc.command:
                kind = "executor daemon"
            elif "tini" in proc.command:
                kind = "tini"
            else:
                continue  # user code's: none here
            out[kind] += proc.own + proc.reaped
    return out


# What the first execution runs, by the name it has in the tables.
FIRST_EXECUTIONS = {
    "1+1": ("1+1", "2"),
    "import pandas": ("import pandas\npandas.__version__", "."),
    # Everything the default preload imports: what a pool member's interpreter holds.
    "import all preloaded": ("import numpy, pandas, matplotlib.pyplot\n1", "1"),
}


@dataclass
class Figures:
    create: list[float] = field(default_factory=list)
    first_execution: list[float] = field(default_factory=list)
    # CPU seconds per create, by process kind.
    cpu: dict[str, list[float]] = field(default_factory=dict)


async def _execute(stub: "Stub", name: str, code: str, expected: str) -> None:
    response = await stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name, code=code))
    texts = [output.text.get("text/plain", "") for output in response.outputs]
    if response.HasField("error") or not any(expected in text for text in texts):
        raise RuntimeError(f"{code!r} went wrong: {response}")


async def _one(
    stub: "Stub", profile: str, first: str, controller_pid: int, figures: Figures
) -> None:
    """A cold create, its first execution sent at once, and the CPU it all took."""
    before = _host_cpu(_processes(), controller_pid)
    started = time.perf_counter()
    sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(
            parent=PARENT,
            sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
        )
    )
    figures.create.append(time.perf_counter() - started)
    await _execute(stub, sandbox.name, *FIRST_EXECUTIONS[first])
    figures.first_execution.append(time.perf_counter() - started)
    processes = _processes()
    spent = _host_cpu(processes, controller_pid)
    spent = {kind: spent[kind] - before[kind] for kind in spent}
    spent |= _sandbox_cpu(processes, f"petri-{sandbox.uid}")
    spent["all"] = sum(spent.values())
    for kind, cpu in spent.items():
        figures.cpu.setdefault(kind, []).append(cpu)
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


async def run(creates: int, profiles: list[str], repositories: list[str]) -> None:
    for repository in repositories:
        settings = {"warm_pool": "", "image_repository": repository}
        async with (
            controller_process(**settings) as controller,
            channel_to(controller.address) as channel,
        ):
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            pid = controller.process.pid
            for profile in profiles:
                await _one(stub, profile, "1+1", pid, Figures())  # warms podman and the cache
                by_first = {first: Figures() for first in FIRST_EXECUTIONS}
                for _ in range(creates):  # interleaved: a slower moment hits them all
                    for first, figures in by_first.items():
                        await _one(stub, profile, first, pid, figures)
                _report(repository, profile, creates, by_first)


def _report(repository: str, profile: str, creates: int, by_first: dict[str, Figures]) -> None:
    print_table(
        f"Cold create then a first execution sent at once, {repository}:{profile}, "
        f"medians of {creates} ({os.cpu_count()} cores)",
        ["first execution", "CreateSandbox ms", "create + execution ms", "CPU ms", "worker CPU ms"],
        [
            [
                first,
                f"{median(figures.create) * 1000:.0f}",
                f"{median(figures.first_execution) * 1000:.0f}",
                f"{median(figures.cpu['all']) * 1000:.0f}",
                f"{median(figures.cpu['worker']) * 1000:.0f}",
            ]
            for first, figures in by_first.items()
        ],
    )
    figures = by_first["import all preloaded"]
    print_table(
        f"CPU of a cold create whose first execution imports all the preload, by process, "
        f"{repository}:{profile}, medians of {creates}",
        ["process", "CPU ms"],
        [
            [kind, f"{median(values) * 1000:.0f}"]
            for kind, values in sorted(figures.cpu.items(), key=lambda item: -median(item[1]))
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--creates", type=int, default=7)
    parser.add_argument("--profiles", default="test,full", help="comma-separated")
    parser.add_argument(
        "--repositories",
        default=os.environ.get("PETRI_IMAGE_REPOSITORY", "localhost/petri-sandbox"),
        help="comma-separated image repositories, measured one after the other",
    )
    args = parser.parse_args()
    asyncio.run(run(args.creates, args.profiles.split(","), args.repositories.split(",")))


if __name__ == "__main__":
    main()
