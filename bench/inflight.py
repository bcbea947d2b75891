"""Memory of the controller under big requests: peak and settled RSS of a controller process
(with a tokens file) while 4 callers at once send it a huge ExecuteCode.

Scenarios, each on a fresh controller so its peak (VmHWM) is its own:
  no-token   4 x ExecuteCode with 180 MiB of code and no token
  token      the same with a valid token
  token-files  4 x ExecuteCode with a valid token and a 100 MiB input file (the API's limit)
               into one real sandbox

Run as the service user: python -m bench.inflight [--source DIR] [--scenario NAME ...]
(--source runs the controller from another checkout, to measure older code the same way.)
"""

import argparse
import asyncio
import hashlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from bench.harness import (
    ControllerDirs,
    RunningController,
    channel_to,
    print_table,
    start_controller_process,
)
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub

MiB = 1 << 20
TOKEN = "bench-inflight-token"
CALLS = 4
SETTLE_SECONDS = 5.0
SCENARIOS = ("no-token", "token", "token-files")


def _status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _tokens_file(directory: Path) -> Path:
    path = directory / "tokens.toml"
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    path.write_text(f'[[tokens]]\nname = "bench"\nprojects = ["bench"]\nsha256 = "{digest}"\n')
    return path


async def _call(
    stub: "SandboxServiceAsyncStub",
    request: sandbox_pb2.ExecuteCodeRequest,
    metadata: tuple[tuple[str, str], ...],
) -> str:
    try:
        await stub.ExecuteCode(request, metadata=metadata, timeout=300)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
    return "OK"


async def _scenario(name: str, profile: str) -> list[str]:
    dirs = ControllerDirs.fresh()
    tokens = _tokens_file(dirs.state_dir)
    try:
        running: RunningController = await start_controller_process(
            dirs, tokens_file=str(tokens), warm_pool="", default_image_profile=profile
        )
    except BaseException:
        dirs.remove()
        raise
    auth = (("authorization", f"Bearer {TOKEN}"),)
    try:
        pid = running.process.pid
        async with channel_to(running.address) as channel:
            stub: SandboxServiceAsyncStub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            target = "projects/bench/sandboxes/nothing-here"
            if name == "token-files":
                sandbox = await stub.CreateSandbox(
                    sandbox_pb2.CreateSandboxRequest(parent="projects/bench"), metadata=auth
                )
                target = sandbox.name
                request = sandbox_pb2.ExecuteCodeRequest(
                    name=target,
                    code="import os; os.path.getsize('in.bin')",
                    files=[execution_pb2.File(path="in.bin", content=os.urandom(100 * MiB))],
                )
            else:
                request = sandbox_pb2.ExecuteCodeRequest(name=target, code="#" * (180 * MiB))
            metadata = () if name == "no-token" else auth
            baseline = _status_field(pid, "VmRSS")
            started = time.monotonic()
            statuses = await asyncio.gather(*(_call(stub, request, metadata) for _ in range(CALLS)))
            elapsed = time.monotonic() - started
            del request
            peak = _status_field(pid, "VmHWM")
            await asyncio.sleep(SETTLE_SECONDS)
            settled = _status_field(pid, "VmRSS")
            if name == "token-files":
                await stub.DeleteSandbox(
                    sandbox_pb2.DeleteSandboxRequest(name=target), metadata=auth
                )
        counts = Counter(statuses)
        return [
            name,
            f"{baseline / MiB:.0f}",
            f"{peak / MiB:.0f}",
            f"{settled / MiB:.0f}",
            f"{elapsed:.1f}",
            ", ".join(f"{count} {status}" for status, count in sorted(counts.items())),
        ]
    finally:
        running.process.terminate()
        running.process.wait(30)
        dirs.remove()


async def run(scenarios: list[str], profile: str) -> None:
    rows = [await _scenario(name, profile) for name in scenarios]
    print_table(
        f"controller RSS in MiB, {CALLS} concurrent ExecuteCode calls "
        f"(settled: {SETTLE_SECONDS:.0f} s after)",
        ["scenario", "before", "peak", "settled", "seconds", "statuses"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, help="checkout to run the controller from")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    parser.add_argument("--profile", default="test", help="image profile of the sandbox")
    args = parser.parse_args()
    if args.source is not None:
        # `python -m controller` imports from its working directory first.
        os.environ["PYTHONPATH"] = f"{args.source}:{os.environ.get('PYTHONPATH', '')}"
        os.chdir(args.source)
    asyncio.run(run(args.scenario or list(SCENARIOS), args.profile))


if __name__ == "__main__":
    main()
