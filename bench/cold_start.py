"""What a cold create costs (issue 16): wall time of CreateSandbox, of create + a first `1+1`
and of create + a first `import pandas`, and the CPU one create spends, split by process:
the controller, its podman service (with the `runc start` it reaps), conmon (with `runc
create`), and inside the sandbox tini, the executor daemon and the worker (whose CPU is mostly
the preload of numpy, pandas and matplotlib.pyplot).

No warm pool: every create starts a container. The CPU of a sandbox's processes is read just
before it is deleted (after its first execution, which waits for the preload). Run as the
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
PANDAS_CODE = "import pandas\npandas.__version__"


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


@dataclass
class Figures:
    create: list[float] = field(default_factory=list)
    first_one_plus_one: list[float] = field(default_factory=list)
    first_pandas: list[float] = field(default_factory=list)
    # CPU seconds per create, by process kind (the `1+1` creates').
    cpu: dict[str, list[float]] = field(default_factory=dict)


async def _execute(stub: "Stub", name: str, code: str, expected: str) -> None:
    response = await stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name, code=code))
    texts = [output.text.get("text/plain", "") for output in response.outputs]
    if response.HasField("error") or not any(expected in text for text in texts):
        raise RuntimeError(f"{code!r} went wrong: {response}")


async def _one(stub: "Stub", profile: str, controller_pid: int, figures: Figures) -> None:
    before = _host_cpu(_processes(), controller_pid)
    started = time.perf_counter()
    sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(
            parent=PARENT,
            sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
        )
    )
    figures.create.append(time.perf_counter() - started)
    await _execute(stub, sandbox.name, "1+1", "2")
    figures.first_one_plus_one.append(time.perf_counter() - started)
    processes = _processes()
    spent = _host_cpu(processes, controller_pid)
    spent = {kind: spent[kind] - before[kind] for kind in spent}
    spent |= _sandbox_cpu(processes, f"petri-{sandbox.uid}")
    spent["all"] = sum(spent.values())
    for kind, cpu in spent.items():
        figures.cpu.setdefault(kind, []).append(cpu)
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    # Then one that imports pandas at once (it waits for the preload, or imports it itself).
    started = time.perf_counter()
    sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(
            parent=PARENT,
            sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
        )
    )
    await _execute(stub, sandbox.name, PANDAS_CODE, ".")
    figures.first_pandas.append(time.perf_counter() - started)
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


async def run(creates: int, profiles: list[str], repositories: list[str]) -> None:
    for repository in repositories:
        settings = {"warm_pool": "", "image_repository": repository}
        async with (
            controller_process(**settings) as controller,
            channel_to(controller.address) as channel,
        ):
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            for profile in profiles:
                figures = Figures()
                await _one(stub, profile, controller.process.pid, Figures())  # warms podman
                for _ in range(creates):
                    await _one(stub, profile, controller.process.pid, figures)
                _report(repository, profile, creates, figures)


def _report(repository: str, profile: str, creates: int, figures: Figures) -> None:
    ms = [
        ["CreateSandbox", f"{median(figures.create) * 1000:.0f}"],
        ["create + first `1+1`", f"{median(figures.first_one_plus_one) * 1000:.0f}"],
        ["create + first `import pandas`", f"{median(figures.first_pandas) * 1000:.0f}"],
    ]
    print_table(
        f"Cold create, {repository}:{profile}, median of {creates} ({os.cpu_count()} cores)",
        ["what", "ms (median)"],
        ms,
    )
    rows = [
        [kind, f"{median(values) * 1000:.0f}"]
        for kind, values in sorted(figures.cpu.items(), key=lambda item: -median(item[1]))
    ]
    print_table(
        f"CPU per cold create + first `1+1`, {repository}:{profile}, median of {creates}",
        ["process", "CPU ms (median)"],
        rows,
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
