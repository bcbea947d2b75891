"""File throughput through StreamExecuteCode: upload, download and round trip of 1, 10 and
100 MiB, the controller's peak RSS growth during the 100 MiB round trip, and a copy in and
out of the same sandbox (`podman exec -i ... cat`) as the baseline a user would otherwise
reach for.

Run as the service user (scripts/bench does): python -m bench.files [--repeats N]
"""

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.harness import (
    RunningController,
    channel_to,
    controller_process,
    median,
    print_table,
)
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub

MiB = 1 << 20
SIZES_MIB = (1, 10, 100)
TARGET_ROUND_TRIP_S = 2.0
TARGET_RSS_GROWTH = 64 * MiB


async def _requests(
    name: str, code: str, files: dict[str, bytes]
) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
    yield sandbox_pb2.StreamExecuteCodeRequest(
        start=sandbox_pb2.ExecuteCodeStart(name=name, code=code)
    )
    for path, data in files.items():
        view = memoryview(data)
        for start in range(0, len(data), MiB):
            yield sandbox_pb2.StreamExecuteCodeRequest(
                input_chunk=execution_pb2.FileChunk(
                    path=path, data=bytes(view[start : start + MiB]), final=start + MiB >= len(data)
                )
            )


async def _stream(
    stub: "SandboxServiceAsyncStub", name: str, code: str, files: dict[str, bytes]
) -> tuple[float, int]:
    """Runs one StreamExecuteCode call; returns its wall time and the bytes received."""
    started = time.perf_counter()
    received = 0
    async for response in stub.StreamExecuteCode(_requests(name, code, files)):
        if response.HasField("output_chunk"):
            received += len(response.output_chunk.data)
        if response.HasField("result") and response.result.HasField("error"):
            raise RuntimeError(response.result.error.evalue)
    return time.perf_counter() - started, received


async def _sample_rss(controller: RunningController, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, controller.rss_bytes())
        await asyncio.sleep(0.005)
    return peak


def _podman_cp_round_trip(container: str, data_path: Path) -> float:
    """In and out through `podman exec -i ... cat`: `podman cp` cannot write into a sandbox,
    whose user namespace leaves the service user itself unmapped (EOVERFLOW)."""
    started = time.perf_counter()
    with open(data_path, "rb") as source:
        subprocess.run(
            ["podman", "exec", "-i", container, "sh", "-c", "cat > /workspace/cp-in.bin"],
            stdin=source,
            check=True,
        )
    with tempfile.TemporaryDirectory() as out, open(f"{out}/back.bin", "wb") as sink:
        subprocess.run(
            ["podman", "exec", container, "cat", "/workspace/cp-in.bin"], stdout=sink, check=True
        )
    return time.perf_counter() - started


@dataclass(frozen=True)
class FileFigures:
    round_trip_100_mib_seconds: float  # 100 MiB in and the copy out, in one call
    upload_mib_per_second: dict[int, float]  # by size in MiB
    download_mib_per_second: dict[int, float]
    controller_rss_growth_bytes: int


async def run(repeats: int) -> FileFigures:
    uploads_by_size: dict[int, float] = {}
    downloads_by_size: dict[int, float] = {}
    async with controller_process() as controller, channel_to(controller.address) as channel:
        stub: SandboxServiceAsyncStub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        sandbox = await stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(parent="projects/bench", sandbox_id="files")
        )
        rows = []
        rss_growth = 0
        for size_mib in SIZES_MIB:
            data = os.urandom(size_mib * MiB)
            uploads, downloads, trips, cps = [], [], [], []
            for attempt in range(repeats):
                seconds, _ = await _stream(stub, sandbox.name, "pass", {"in.bin": data})
                uploads.append(seconds)
                seconds, got = await _stream(
                    stub, sandbox.name, "import shutil\nshutil.copyfile('in.bin', 'out.bin')", {}
                )
                assert got == len(data)
                downloads.append(seconds)
                stop = asyncio.Event()
                sampler = asyncio.create_task(_sample_rss(controller, stop))
                baseline = controller.rss_bytes()
                seconds, got = await _stream(
                    stub,
                    sandbox.name,
                    "import shutil\nshutil.copyfile('rt-in.bin', 'rt-out.bin')",
                    {"rt-in.bin": data},
                )
                stop.set()
                peak = await sampler
                assert got == len(data)
                trips.append(seconds)
                if size_mib == max(SIZES_MIB) and attempt == repeats - 1:
                    rss_growth = peak - baseline
            with tempfile.NamedTemporaryFile() as local:
                local.write(data)
                local.flush()
                for _ in range(repeats):
                    cps.append(_podman_cp_round_trip(f"petri-{sandbox.uid}", Path(local.name)))
            up, down, trip, cp = median(uploads), median(downloads), median(trips), median(cps)
            uploads_by_size[size_mib] = size_mib / up
            downloads_by_size[size_mib] = size_mib / down
            rows.append(
                [
                    f"{size_mib} MiB",
                    f"{size_mib / up:.0f} MiB/s ({up * 1000:.0f} ms)",
                    f"{size_mib / down:.0f} MiB/s ({down * 1000:.0f} ms)",
                    f"{trip * 1000:.0f} ms",
                    f"{cp * 1000:.0f} ms",
                    f"{trip / cp:.2f}",
                ]
            )
        print_table(
            f"StreamExecuteCode file transfer, median of {repeats} (sandbox {sandbox.name})",
            [
                "size",
                "upload",
                "download",
                "in + out",
                "podman exec cat in + out",
                "petri / podman exec",
            ],
            rows,
        )
        trip_100 = float(rows[-1][3].split()[0]) / 1000
        print(
            f"\n100 MiB in + out: {trip_100:.2f} s (target < {TARGET_ROUND_TRIP_S:.0f} s): "
            f"{'met' if trip_100 < TARGET_ROUND_TRIP_S else 'MISSED'}"
        )
        print(
            f"controller peak RSS growth during it: {rss_growth / MiB:.1f} MiB "
            f"(target < {TARGET_RSS_GROWTH // MiB} MiB): "
            f"{'met' if rss_growth < TARGET_RSS_GROWTH else 'MISSED'}"
        )
    return FileFigures(trip_100, uploads_by_size, downloads_by_size, rss_growth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(args.repeats))


if __name__ == "__main__":
    main()
