"""What the Python SDK costs over the raw stubs, against one controller it starts (a process
of its own, so the blocking client can be called straight from the benchmark's thread):

1. `1+1` round trips: the raw async stub's ExecuteCode and StreamExecuteCode, then
   `AsyncSandbox.run` and `Sandbox.run`, on one sandbox, interleaved round by round (which goes
   first rotates) so that drift in the machine's load falls on all alike: p50, p99, SDK / raw.
2. 100 MiB through the SDK from a local path: `run(files=...)`, `files.write`,
   `files.download`, each in a child process that runs only the client, timed there, with the
   child's peak RSS growth over the transfer (ru_maxrss before and after); and, for contrast,
   a naive client that holds the whole file as bytes (`run` and `write` of bytes, `read`).

Run as the service user (scripts/bench does):
python -m bench.client [--rounds N] [--round-trips N] [--transfers N] [--profile P]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import petri
from bench.harness import channel_to, controller_process, median, percentile, print_table
from bench.workloads import ROUND_TRIP_CODE
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

MiB = 1 << 20
BIG = 100 * MiB
ROUND_TRIP_VARIANTS = (
    "raw ExecuteCode",
    "raw StreamExecuteCode",
    "AsyncSandbox.run",
    "Sandbox.run",
)
# The child's modes: what it does with the 100 MiB file; the naive ones hold it all as bytes.
TRANSFERS = (
    ("run(files={p: Path})", "run-path"),
    ("files.write(p, Path)", "write-path"),
    ("files.download(p, dest)", "download-path"),
    ("run(files={p: bytes})", "run-bytes"),
    ("files.write(p, bytes)", "write-bytes"),
    ("files.read(p) + write", "read-bytes"),
)

# Runs only the client: connects to the sandbox, warms the channel up, then times one transfer
# and measures its RSS before it and its peak RSS over it. argv: mode, address, sandbox name,
# local path. The peak is VmHWM, reset after the warm-up (clear_refs 5): ru_maxrss, as
# tests/e2e/test_sdk.py reads it, starts at the parent's peak (kept across fork and exec), which
# hides any growth below it; it is reported too, for comparison.
CHILD = """
import json, resource, sys, time
from pathlib import Path
import petri

mode, addr, name, path = sys.argv[1:]
big = 100 << 20
size_code = "import os\\nos.path.getsize('big.bin')"

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

with petri.Client(addr=addr) as client:
    sb = petri.Sandbox.connect(name, client=client)
    sb.run("1", files={"warm.bin": b"x" * 1024})  # the channel and its threads, warmed up
    sb.files.write("warm2.bin", b"x" * 1024)
    sb.files.download("warm2.bin", path + ".warm")
    sb.files.read("warm2.bin")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before, maxrss_before = status("VmRSS"), maxrss()
    started = time.perf_counter()
    if mode == "run-path":
        got = int(sb.run(size_code, files={"big.bin": Path(path)}).text)
    elif mode == "write-path":
        got = sb.files.write("big.bin", Path(path)).size
    elif mode == "download-path":
        got = sb.files.download("big.bin", path + ".back").size
    elif mode == "run-bytes":
        data = Path(path).read_bytes()
        got = int(sb.run(size_code, files={"big.bin": data}).text)
    elif mode == "write-bytes":
        got = sb.files.write("big.bin", Path(path).read_bytes()).size
    elif mode == "read-bytes":
        got = Path(path + ".back").write_bytes(sb.files.read("big.bin"))
    seconds = time.perf_counter() - started
    after, maxrss_after = status("VmHWM"), maxrss()
if got != big:
    sys.exit(f"{mode}: {got} bytes arrived, not {big}")
print(json.dumps({
    "seconds": seconds, "growth": after - before, "maxrss_growth": maxrss_after - maxrss_before,
    "before": before, "maxrss_before": maxrss_before,
}))
"""


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.1f} / {five:.1f} / {fifteen:.1f}"


async def _start(name: str) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
    yield sandbox_pb2.StreamExecuteCodeRequest(
        start=sandbox_pb2.ExecuteCodeStart(name=name, code=ROUND_TRIP_CODE)
    )


async def raw_execute(stub: "Stub", name: str) -> None:
    response = await stub.ExecuteCode(
        sandbox_pb2.ExecuteCodeRequest(name=name, code=ROUND_TRIP_CODE)
    )
    if response.HasField("error"):
        raise RuntimeError(response.error.evalue)


async def raw_stream(stub: "Stub", name: str) -> None:
    async for response in stub.StreamExecuteCode(_start(name)):
        if response.HasField("result") and response.result.HasField("error"):
            raise RuntimeError(response.result.error.evalue)


@dataclass
class Sides:
    """One callable per variant, each doing one `1+1` round trip and checking its answer."""

    calls: dict[str, Callable[[], Awaitable[None]]]


async def round_trips(sides: Sides, rounds: int, count: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {variant: [] for variant in ROUND_TRIP_VARIANTS}
    for variant in ROUND_TRIP_VARIANTS:  # warm every channel and path up; not measured
        for _ in range(20):
            await sides.calls[variant]()
    for number in range(rounds):
        shift = number % len(ROUND_TRIP_VARIANTS)
        for variant in ROUND_TRIP_VARIANTS[shift:] + ROUND_TRIP_VARIANTS[:shift]:
            call = sides.calls[variant]
            for _ in range(count):
                started = time.perf_counter()
                await call()
                samples[variant].append(time.perf_counter() - started)
        print(f"client: round {number + 1}/{rounds} done (load {load()})", flush=True)
    return samples


def report_round_trips(samples: dict[str, list[float]], profile: str) -> None:
    rows = []
    stream, unary = samples["raw StreamExecuteCode"], samples["raw ExecuteCode"]
    for variant in ROUND_TRIP_VARIANTS:
        times = samples[variant]
        rows.append(
            [
                variant,
                str(len(times)),
                f"{median(times) * 1000:.2f}",
                f"{percentile(times, 0.99) * 1000:.2f}",
                f"{median(times) / median(stream):.3f}",
                f"{percentile(times, 0.99) / percentile(stream, 0.99):.3f}",
                f"{median(times) / median(unary):.3f}",
            ]
        )
    print_table(
        f"`1+1` round trips ({profile} profile), ms; ratios to the raw async stub's calls",
        [
            "variant",
            "round trips",
            "p50",
            "p99",
            "p50 / raw stream",
            "p99 / raw stream",
            "p50 / raw unary",
        ],
        rows,
    )


def transfer(mode: str, address: str, name: str, path: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, mode, address, name, str(path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} client failed: {done.stderr[-3000:]}")
    measured: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return measured


def transfers(address: str, name: str, repeats: int) -> None:
    seconds: dict[str, list[float]] = {mode: [] for _, mode in TRANSFERS}
    growth: dict[str, list[float]] = {mode: [] for _, mode in TRANSFERS}
    maxrss_growth: dict[str, list[float]] = {mode: [] for _, mode in TRANSFERS}
    baselines: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="petri-bench-client-") as scratch:
        big = Path(scratch) / "big.bin"
        with big.open("wb") as out:  # a chunk at a time: the children inherit this peak
            for _ in range(BIG // MiB):
                out.write(os.urandom(MiB))
        with petri.Client(addr=address) as client:  # what the downloads read
            petri.Sandbox.connect(name, client=client).files.write("big.bin", big)
        for number in range(repeats):
            shift = number % len(TRANSFERS)
            for _, mode in TRANSFERS[shift:] + TRANSFERS[:shift]:
                measured = transfer(mode, address, name, big)
                seconds[mode].append(measured["seconds"])
                growth[mode].append(measured["growth"])
                maxrss_growth[mode].append(measured["maxrss_growth"])
                baselines.append((measured["before"], measured["maxrss_before"]))
            print(f"client: transfers {number + 1}/{repeats} done (load {load()})", flush=True)
    rows = []
    for what, mode in TRANSFERS:
        took = median(seconds[mode])
        rows.append(
            [
                what,
                f"{took:.2f}",
                f"{BIG / MiB / took:.0f}",
                f"{median(growth[mode]) / MiB:.1f}",
                f"{max(growth[mode]) / MiB:.1f}",
                f"{median(maxrss_growth[mode]) / MiB:.1f}",
            ]
        )
    print_table(
        f"100 MiB through the blocking SDK, a child process each, median of {repeats} "
        "(the last three hold the whole file as bytes, for contrast)",
        ["call", "seconds", "MiB/s", "peak RSS growth MiB", "(max)", "ru_maxrss growth MiB"],
        rows,
    )
    rss, inherited = median([b[0] for b in baselines]), median([b[1] for b in baselines])
    print(
        f"(a warmed-up client's RSS before the transfer: {rss / MiB:.0f} MiB; its ru_maxrss then: "
        f"{inherited / MiB:.0f} MiB, the parent's peak, inherited)"
    )


async def run(rounds: int, count: int, repeats: int, profile: str) -> None:
    print(f"load average at the start (1 / 5 / 15 min): {load()}")
    settings = {
        "max_executes_per_minute": "10000000",
        "default_image_profile": profile,
        "warm_pool": "",
        "checkpoint_idle_after": "0s",  # no background saves during the measurements
        "default_auto_pause_after": "0s",
    }
    async with (
        controller_process(**settings) as controller,
        channel_to(controller.address) as channel,
        petri.AsyncClient(addr=controller.address, project="bench") as async_client,
    ):
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        sandbox = await stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(
                parent="projects/bench",
                sandbox_id="client",
                sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=profile)),
            )
        )
        name = sandbox.name
        async_sandbox = await petri.AsyncSandbox.connect(name, client=async_client)
        with petri.Client(addr=controller.address, project="bench") as client:
            # The controller is another process: the blocking call may hold this thread.
            sync_sandbox = petri.Sandbox.connect(name, client=client)

            async def sdk_async() -> None:
                if (await async_sandbox.run(ROUND_TRIP_CODE)).text != "2":
                    raise RuntimeError("AsyncSandbox.run did not answer 2")

            async def sdk_sync() -> None:
                if sync_sandbox.run(ROUND_TRIP_CODE).text != "2":
                    raise RuntimeError("Sandbox.run did not answer 2")

            sides = Sides(
                {
                    "raw ExecuteCode": lambda: raw_execute(stub, name),
                    "raw StreamExecuteCode": lambda: raw_stream(stub, name),
                    "AsyncSandbox.run": sdk_async,
                    "Sandbox.run": sdk_sync,
                }
            )
            samples = await round_trips(sides, rounds, count)
        report_round_trips(samples, profile)
        await asyncio.to_thread(transfers, controller.address, name, repeats)
    print(f"\nload average at the end (1 / 5 / 15 min): {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=100, help="per round and variant")
    parser.add_argument("--transfers", type=int, default=3, help="of each 100 MiB call")
    parser.add_argument("--profile", default="test")
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.round_trips, args.transfers, args.profile))


if __name__ == "__main__":
    main()
