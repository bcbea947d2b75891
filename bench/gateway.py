"""What the gateway costs (issue 17's targets), in one run on a PostgreSQL, a podman service and
controller processes of its own (role node and role gateway, on free loopback ports):

1. The hop: `1+1` ExecuteCode round trips on one sandbox, straight to its node vs through a
   gateway, interleaved round by round (which goes first alternates) so that drift in the
   machine's load falls on both alike: p50, p99, their difference and ratio.
2. 100 MiB streams: WriteFile and ReadFile of 100 MiB in that sandbox, straight vs through the
   gateway, interleaved, median of N each; and the gateway's peak RSS growth over each of its
   transfers (VmHWM, reset through /proc/PID/clear_refs just before).
3. Two nodes vs one: the executes/s of concurrent clients each looping `1+1` on a sandbox of its
   own (bench.latency's throughput workload) through the gateway, first with one node behind it,
   then with two (the sandboxes where placement put them, each created once the gateway knew
   where the previous one went), then with one again (the second drained, holding none), so
   that drift falls on both figures alike.
4. Placement: creates through the gateway over three nodes (or two: --placement-nodes 2), one
   at a time, and how many each node got.

Every sandbox, process and the PostgreSQL cluster go at the end, Ctrl-C included. Run as the
service user (scripts/bench does): python -m bench.gateway [--rounds N] [--round-trips N]
[--transfers N] [--sandboxes N] [--seconds S] [--creates N] [--placement-nodes 2|3]
[--profile P] [--heartbeat DURATION]
"""

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bench.harness import (
    ControllerDirs,
    RunningController,
    channel_to,
    delete_all,
    median,
    percentile,
    print_table,
    start_controller_process,
)
from bench.latency import create, round_trips, throughput
from controller.runtime.container import LABEL_REGISTRY
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "bench"
MiB = 1 << 20
BIG = 100 * MiB
BIG_PATH = "big.bin"
SIDES = ("direct", "gateway")
TARGET_HOP_MS = 0.5
TARGET_STREAM_RATIO = 1.10
TARGET_NODES_RATIO = 0.85
# A spread is even when every node holds within this fraction of the mean.
TARGET_SPREAD = 0.2
# How often the gateway reads the membership table (controller.gateway.server's default): a
# node seen there is in the gateway's placement within this much.
GATEWAY_REFRESH_SECONDS = 1.0
WAIT_SECONDS = 60.0
WARM_UP_CALLS = 20


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


def registry_label(node: str) -> str:
    """The label of a node's containers (controller.sandboxes.provisioner)."""
    return hashlib.sha256(f"node/{node}".encode()).hexdigest()[:12]


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Cluster:
    """The benchmark's PostgreSQL, podman service, nodes and gateways, all in `base`."""

    profile: str
    heartbeat: str  # the nodes' --heartbeat-interval
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="petri-bench-gw-")))
    url: str = ""
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    podman: subprocess.Popen[bytes] | None = None
    nodes: dict[str, RunningController] = field(default_factory=dict)
    gateways: list[RunningController] = field(default_factory=list)
    dirs: list[ControllerDirs] = field(default_factory=list)
    registry: PostgresRegistry | None = None

    @property
    def podman_socket(self) -> Path:
        return self.base / "podman.sock"

    def settings(self) -> dict[str, str]:
        return {
            "database_url": self.url,
            "default_image_profile": self.profile,
            "max_executes_per_minute": "10000000",
            "max_sandboxes_per_project": "1000",
        }

    async def start(self) -> None:
        # Sessions of their own, for this and the processes below: a Ctrl-C at the terminal
        # reaches only the benchmark, whose cleanup then still has them to delete through.
        done = subprocess.run(
            [ROOT / "scripts" / "postgres", "start", self.base / "pg"],
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"scripts/postgres start failed: {done.stderr[-2000:]}")
        self.url = done.stdout.strip()
        self.registry = PostgresRegistry(self.url, max_connections=2)
        await self.registry.open()
        with open(self.base / "podman.log", "ab") as log:
            self.podman = subprocess.Popen(
                ["podman", "system", "service", "--time=0", f"unix://{self.podman_socket}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",  # conmon needs a working directory that stays
                start_new_session=True,
            )
        deadline = time.monotonic() + WAIT_SECONDS
        while not self.podman_socket.exists():
            if self.podman.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the podman service did not start: see {self.base}")
            await asyncio.sleep(0.05)

    async def add_node(self, letter: str) -> str:
        name = f"bench-{letter}-{self.suffix}"
        dirs = ControllerDirs.fresh()
        self.dirs.append(dirs)
        self.nodes[name] = await start_controller_process(
            dirs,
            **self.settings(),
            role="node",
            node_name=name,
            heartbeat_interval=self.heartbeat,
            podman_socket=str(self.podman_socket),
            warm_pool="",
            preload="",  # nothing measured here imports anything
            checkpoint_idle_after="0s",  # no background saves during the measurements
            default_auto_pause_after="0s",
        )
        await self.wait_nodes(lambda listed: name in listed)
        return name

    async def add_gateway(self) -> RunningController:
        dirs = ControllerDirs.fresh()
        self.dirs.append(dirs)
        gateway = await start_controller_process(dirs, **self.settings(), role="gateway")
        self.gateways.append(gateway)
        return gateway

    async def wait_nodes(self, ready: Callable[[dict[str, int]], bool]) -> None:
        """Waits until the live nodes' sandbox counts (by name, as they last heartbeated) are
        `ready`, then until the gateways have read them."""
        assert self.registry is not None
        members = PostgresNodes(self.registry)
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            listed = {node.name: node.sandboxes for node in await members.list_nodes()}
            if ready({name: count for name, count in listed.items() if name in self.nodes}):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not heartbeat as awaited: {listed}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2 * GATEWAY_REFRESH_SECONDS)

    async def drain(self, node: str, draining: bool) -> None:
        """As `python -m controller drain NODE [--undo]` does: gateways place nothing on it."""
        assert self.registry is not None
        await PostgresNodes(self.registry).set_draining(node, draining)

    async def holder(self, sandbox_name: str) -> str:
        assert self.registry is not None
        record = await self.registry.get_live(PROJECT, sandbox_name.rpartition("/")[2])
        return record.node if record is not None else "(none)"

    async def close(self) -> None:
        if self.gateways:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
                async with asyncio.timeout(120):
                    await delete_all(self.gateways[0].address, PROJECT)
        for process in [g.process for g in self.gateways] + [
            n.process for n in self.nodes.values()
        ]:
            await asyncio.to_thread(stop_process, process)
        if self.podman is not None and self.podman.poll() is None:
            for name in self.nodes:  # what a delete left, if any did not go through
                leftover = subprocess.run(
                    [
                        "podman",
                        "ps",
                        "-aq",
                        "--filter",
                        f"label={LABEL_REGISTRY}={registry_label(name)}",
                    ],
                    capture_output=True,
                    text=True,
                ).stdout.split()
                if leftover:
                    subprocess.run(["podman", "rm", "-f", *leftover], capture_output=True)
            stop_process(self.podman)
        if self.registry is not None:
            await self.registry.close()
        subprocess.run(
            [ROOT / "scripts" / "postgres", "stop", self.base / "pg"],
            capture_output=True,
            timeout=120,
            start_new_session=True,
        )
        for dirs in self.dirs:
            dirs.remove()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.asynccontextmanager
async def cluster(profile: str, heartbeat: str) -> AsyncIterator[Cluster]:
    running = Cluster(profile, heartbeat)
    try:
        await running.start()
        yield running
    finally:
        await running.close()


@contextlib.asynccontextmanager
async def stub_to(address: str) -> AsyncIterator["Stub"]:
    async with channel_to(address) as channel:
        yield sandbox_pb2_grpc.SandboxServiceStub(channel)


def status_bytes(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak(pid: int) -> int:
    """Sets the process's VmHWM to its VmRSS and returns that."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return status_bytes(pid, "VmRSS")


# Part 1: the hop.


@dataclass
class Hop:
    samples: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SIDES})


async def hop(stubs: dict[str, "Stub"], name: str, rounds: int, count: int) -> Hop:
    figures = Hop()
    for side in SIDES:  # the channels and the first executions: not measured
        await round_trips(stubs[side], name, WARM_UP_CALLS)
    for number in range(rounds):
        for side in SIDES if number % 2 == 0 else SIDES[::-1]:
            figures.samples[side] += await round_trips(stubs[side], name, count)
    return figures


def report_hop(figures: Hop, rounds: int) -> bool:
    direct, gateway = figures.samples["direct"], figures.samples["gateway"]
    difference = (median(gateway) - median(direct)) * 1000
    met = difference <= TARGET_HOP_MS
    rows = [
        [
            side,
            str(len(times)),
            f"{median(times) * 1000:.2f}",
            f"{percentile(times, 0.99) * 1000:.2f}",
            "",
        ]
        for side, times in figures.samples.items()
    ]
    rows.append(
        [
            "gateway - direct",
            "",
            f"{difference:+.2f}",
            f"{(percentile(gateway, 0.99) - percentile(direct, 0.99)) * 1000:+.2f}",
            f"p50 ≤ +{TARGET_HOP_MS} ms: {'met' if met else 'MISSED'}",
        ]
    )
    rows.append(
        [
            "gateway / direct",
            "",
            f"{median(gateway) / median(direct):.3f}",
            f"{percentile(gateway, 0.99) / percentile(direct, 0.99):.3f}",
            "",
        ]
    )
    print_table(
        f"1. the hop: `1+1` ExecuteCode round trips, ms ({rounds} interleaved rounds)",
        ["path", "round trips", "p50", "p99", "target"],
        rows,
    )
    return met


# Part 2: 100 MiB streams.


async def _chunks(name: str, data: bytes) -> AsyncIterator[files_pb2.WriteFileRequest]:
    view = memoryview(data)
    for start in range(0, len(data), MiB):
        yield files_pb2.WriteFileRequest(
            name=name if start == 0 else "",
            chunk=execution_pb2.FileChunk(
                path=BIG_PATH, data=bytes(view[start : start + MiB]), final=start + MiB >= len(data)
            ),
        )


async def write_big(stub: "Stub", name: str, data: bytes) -> None:
    info = await stub.WriteFile(_chunks(name, data))
    if info.size != len(data):
        raise RuntimeError(f"WriteFile wrote {info.size} bytes, not {len(data)}")


async def read_big(stub: "Stub", name: str, data: bytes) -> None:
    got = 0
    async for chunk in stub.ReadFile(files_pb2.ReadFileRequest(name=name, path=BIG_PATH)):
        got += len(chunk.data)
    if got != len(data):
        raise RuntimeError(f"ReadFile read {got} bytes, not {len(data)}")


@dataclass
class Streams:
    # Seconds, by operation, then by side.
    seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # The gateway's peak RSS growth over each of its transfers, bytes, by operation.
    growth: dict[str, list[int]] = field(default_factory=dict)


async def streams(stubs: dict[str, "Stub"], name: str, gateway_pid: int, repeats: int) -> Streams:
    data = os.urandom(BIG)
    operations: dict[str, Callable[[Stub], Awaitable[None]]] = {
        "WriteFile": lambda stub: write_big(stub, name, data),
        "ReadFile": lambda stub: read_big(stub, name, data),
    }
    figures = Streams(
        {op: {s: [] for s in SIDES} for op in operations}, {op: [] for op in operations}
    )
    for operation in operations.values():  # the channels' windows grown: not measured
        for side in SIDES:
            await operation(stubs[side])
    for number in range(repeats):
        for op, operation in operations.items():
            for side in SIDES if number % 2 == 0 else SIDES[::-1]:
                before = reset_peak(gateway_pid)
                started = time.perf_counter()
                await operation(stubs[side])
                figures.seconds[op][side].append(time.perf_counter() - started)
                if side == "gateway":
                    figures.growth[op].append(status_bytes(gateway_pid, "VmHWM") - before)
        print(f"gateway: 100 MiB transfers {number + 1}/{repeats} done (load {load()})", flush=True)
    return figures


def report_streams(figures: Streams, repeats: int) -> bool:
    rows, all_met = [], True
    for op, sides in figures.seconds.items():
        direct, gateway = median(sides["direct"]), median(sides["gateway"])
        met = gateway / direct <= TARGET_STREAM_RATIO
        all_met &= met
        rows.append(
            [
                op,
                f"{direct:.2f} ({BIG / MiB / direct:.0f} MiB/s)",
                f"{gateway:.2f} ({BIG / MiB / gateway:.0f} MiB/s)",
                f"{gateway / direct:.3f}",
                f"{median(figures.growth[op]) / MiB:.1f} / {max(figures.growth[op]) / MiB:.1f}",
                f"≤ {TARGET_STREAM_RATIO:.2f}: {'met' if met else 'MISSED'}",
            ]
        )
    print_table(
        f"2. 100 MiB streams, seconds, median of {repeats} interleaved",
        [
            "call",
            "direct",
            "through the gateway",
            "gateway / direct",
            "gateway peak RSS growth MiB (median / max)",
            "target",
        ],
        rows,
    )
    return all_met


# Part 3: two nodes vs one.


async def executes_per_second(
    cluster_: Cluster, stub: "Stub", sandboxes: int, seconds: float, *, spread_out: bool
) -> tuple[float, dict[str, int]]:
    """Creates `sandboxes` through the gateway, runs the throughput workload on them for
    `seconds`, deletes them; returns the executes/s and the sandboxes per node.

    With `spread_out`, the creates go one at a time, each once the gateway has read the previous
    one in its node's heartbeat: back to back, placement sees the counts of a heartbeat ago and
    may put them all on one node (part 4 measures that); here two nodes are to share the work."""
    names: list[str] = []
    for _ in range(sandboxes):
        names.append((await create(stub, cluster_.profile)).name)
        if spread_out:
            await cluster_.wait_nodes(lambda counts: sum(counts.values()) == len(names))
    try:
        spread = {node: 0 for node in cluster_.nodes}
        for name in names:
            node = await cluster_.holder(name)
            spread[node] = spread.get(node, 0) + 1
            await round_trips(stub, name, 3)  # the first execution: not measured
        rate = await throughput(stub, names, seconds)
    finally:
        for name in names:
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))
    return rate, spread


# The phases of part 3, in order: one node, two, one again (the second drained, placing
# nothing) so that a drift in the machine's load over the part falls on both figures alike.
PHASES = ("1 node", "2 nodes", "1 node again (the other drained)")


def report_nodes(
    rates: dict[str, tuple[float, dict[str, int]]], sandboxes: int, seconds: float
) -> bool:
    one = (rates[PHASES[0]][0] + rates[PHASES[2]][0]) / 2
    two = rates[PHASES[1]][0]
    met = two / one >= TARGET_NODES_RATIO
    rows = [
        [phase, f"{rate:.0f}", ", ".join(str(n) for n in spread.values()), ""]
        for phase, (rate, spread) in rates.items()
    ]
    rows.append(
        [
            "two / one (the mean of both)",
            f"{two / one:.3f}",
            "",
            f"≥ {TARGET_NODES_RATIO:.2f}: {'met' if met else 'MISSED'}",
        ]
    )
    if sum(1 for n in rates[PHASES[1]][1].values() if n) < 2:
        print(
            "\n(placement put every sandbox on one node: the two-node figure is one node's, with "
            "a second one idle)"
        )
    print_table(
        f"3. executes/s of {sandboxes} clients looping `1+1` on a sandbox each through the "
        f"gateway, {seconds:.0f} s each",
        ["behind the gateway", "executes/s", "sandboxes per node", "target"],
        rows,
    )
    return met


# Part 4: placement.


async def placement(cluster_: Cluster, stub: "Stub", creates: int) -> dict[str, int]:
    spread = {node: 0 for node in cluster_.nodes}
    names = []
    try:
        for _ in range(creates):
            names.append((await create(stub, cluster_.profile)).name)
            node = await cluster_.holder(names[-1])
            spread[node] = spread.get(node, 0) + 1
    finally:
        for name in names:
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))
    return spread


def report_placement(spread: dict[str, int], creates: int, heartbeat: str) -> bool:
    mean = creates / len(spread)
    met = all(abs(count - mean) <= TARGET_SPREAD * mean for count in spread.values())
    rows = [[node, str(count), f"{count / mean:.2f}"] for node, count in spread.items()]
    rows.append(
        [
            "target",
            "",
            f"each within ±{TARGET_SPREAD:.0%} of the mean: {'met' if met else 'MISSED'}",
        ]
    )
    print_table(
        f"4. placement: {creates} creates through the gateway, one at a time, over "
        f"{len(spread)} nodes (heartbeats every {heartbeat})",
        ["node", "sandboxes", "/ mean"],
        rows,
    )
    return met


@dataclass(frozen=True)
class Parameters:
    rounds: int
    round_trips: int
    transfers: int
    sandboxes: int
    seconds: float
    creates: int
    placement_nodes: int
    profile: str
    heartbeat: str


async def run(p: Parameters) -> None:
    print(f"load average at the start (1 / 5 / 15 min): {load()}", flush=True)
    met: dict[str, bool] = {}
    async with cluster(p.profile, p.heartbeat) as running:
        await running.add_node("a")
        gateway = await running.add_gateway()
        node = next(iter(running.nodes.values()))
        async with stub_to(node.address) as direct, stub_to(gateway.address) as through:
            stubs = {"direct": direct, "gateway": through}
            sandbox = await through.CreateSandbox(
                sandbox_pb2.CreateSandboxRequest(
                    parent=f"projects/{PROJECT}",
                    sandbox_id="hop",
                    sandbox=sandbox_pb2.Sandbox(
                        spec=sandbox_pb2.SandboxSpec(image_profile=p.profile)
                    ),
                )
            )
            print(f"gateway: 1. the hop (load {load()})", flush=True)
            met["hop"] = report_hop(
                await hop(stubs, sandbox.name, p.rounds, p.round_trips), p.rounds
            )
            print(f"\ngateway: 2. 100 MiB streams (load {load()})", flush=True)
            met["streams"] = report_streams(
                await streams(stubs, sandbox.name, gateway.process.pid, p.transfers), p.transfers
            )
            await through.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
            print(f"\ngateway: 3. one node, two, one again (load {load()})", flush=True)
            rates = {}
            for phase in PHASES:
                if phase == PHASES[1]:
                    second = await running.add_node("b")
                elif phase == PHASES[2]:
                    await running.drain(second, True)
                await running.wait_nodes(lambda counts: not any(counts.values()))
                rates[phase] = await executes_per_second(
                    running, through, p.sandboxes, p.seconds, spread_out=phase == PHASES[1]
                )
            await running.drain(second, False)
            met["nodes"] = report_nodes(rates, p.sandboxes, p.seconds)
            if p.placement_nodes == 3:
                await running.add_node("c")
            await running.wait_nodes(
                lambda counts: len(counts) == p.placement_nodes and not any(counts.values())
            )
            print(f"\ngateway: 4. placement (load {load()})", flush=True)
            met["placement"] = report_placement(
                await placement(running, through, p.creates), p.creates, p.heartbeat
            )
    print(f"\nload average at the end (1 / 5 / 15 min): {load()}")
    print(
        "targets: " + ", ".join(f"{part} {'met' if ok else 'MISSED'}" for part, ok in met.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15, help="of the hop's round trips")
    parser.add_argument("--round-trips", type=int, default=40, help="per round and path")
    parser.add_argument("--transfers", type=int, default=5, help="of each 100 MiB call and path")
    parser.add_argument("--sandboxes", type=int, default=10, help="clients of part 3")
    parser.add_argument("--seconds", type=float, default=20.0, help="of each part 3 figure")
    parser.add_argument("--creates", type=int, default=30, help="of part 4")
    parser.add_argument("--placement-nodes", type=int, choices=(2, 3), default=3)
    parser.add_argument("--profile", default="test")
    parser.add_argument(
        "--heartbeat", default="2s", help="the nodes' --heartbeat-interval (their default: 2s)"
    )
    args = parser.parse_args()
    try:
        asyncio.run(
            run(
                Parameters(
                    args.rounds,
                    args.round_trips,
                    args.transfers,
                    args.sandboxes,
                    args.seconds,
                    args.creates,
                    args.placement_nodes,
                    args.profile,
                    args.heartbeat,
                )
            )
        )
    except KeyboardInterrupt:
        # run's cleanup has run: the sandboxes, processes and PostgreSQL are gone.
        raise SystemExit("interrupted: everything the benchmark started is stopped") from None


if __name__ == "__main__":
    main()
