"""What every benchmark needs: a real controller in its own process (so its memory can be
measured alone), a channel to it, medians and percentiles, and a table printer."""

import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from petri.v1 import sandbox_pb2, sandbox_pb2_grpc


@dataclass
class RunningController:
    process: subprocess.Popen[bytes]
    address: str
    state_dir: Path

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class ControllerDirs:
    """Where a controller keeps its registry and sockets: reuse them to restart it."""

    state_dir: Path
    runtime_dir: Path

    @classmethod
    def fresh(cls) -> "ControllerDirs":
        base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
        return cls(
            state_dir=Path(tempfile.mkdtemp(prefix="petri-bench-state-")),
            runtime_dir=Path(tempfile.mkdtemp(prefix="petri-bench-", dir=base)),
        )

    def remove(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)


async def start_controller_process(dirs: ControllerDirs, **settings: str) -> RunningController:
    """Starts `python -m controller` on a free loopback port and waits until it is healthy."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PETRI_LISTEN": address,
        "PETRI_STATE_DIR": str(dirs.state_dir),
        "PETRI_RUNTIME_DIR": str(dirs.runtime_dir),
        "PETRI_LOG_LEVEL": "warning",
        **{f"PETRI_{k.upper()}": v for k, v in settings.items()},
    }
    with open(dirs.state_dir / "controller.log", "ab") as log:
        # A session of its own: a Ctrl-C at the terminal reaches only the benchmark, whose
        # cleanup then deletes its sandboxes through the controller before stopping it.
        process = subprocess.Popen(
            [sys.executable, "-m", "controller"], env=env, stderr=log, start_new_session=True
        )
    running = RunningController(process, address, dirs.state_dir)
    try:
        await wait_healthy(address, process)
    except BaseException:
        # Else it outlives the benchmark, holding its podman service and the caller's stdout.
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    return running


async def delete_all(address: str, project: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        page = await stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(parent=f"projects/{project}", page_size=1000)
        )
        for sandbox in page.sandboxes:
            await stub.DeleteSandbox(
                sandbox_pb2.DeleteSandboxRequest(name=sandbox.name, allow_missing=True)
            )


@contextlib.asynccontextmanager
async def controller_process(**settings: str) -> AsyncIterator[RunningController]:
    """A controller with a fresh registry; stopped, with its sandboxes deleted, after."""
    dirs = ControllerDirs.fresh()
    try:
        running = await start_controller_process(dirs, **settings)
    except BaseException:
        dirs.remove()
        raise
    try:
        yield running
    finally:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await delete_all(running.address, "bench")
        running.process.terminate()
        running.process.wait(30)
        dirs.remove()


async def wait_healthy(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the controller exited with {process.returncode}")
            try:
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the controller did not become healthy in 60 s")


def channel_to(address: str) -> grpc.aio.Channel:
    limit = 256 << 20
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=False)]
    print(f"\n{title}")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
