"""A petri node in a process of its own, to be frozen with SIGSTOP: the fast tier's (the real
service in role node, a fake podman, stand-in executors in the same process), on the shared
registry. It serves until SIGTERM.

    python -m tests.unit.gateway.node_process DATABASE_URL STATE_DIR RUNTIME_DIR PORT \
        KEEPALIVE_MS WAIT_SECONDS

The code "wait" runs WAIT_SECONDS sending nothing, once STATE_DIR/waiting is written (for the
test to know the execution reached the executor), then answers as any other code.
"""

import asyncio
import signal
import sys
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from controller.app import start_controller
from controller.sandboxes import worker_uids
from tests.unit.controller.fake_runtime import FakeRuntime
from tests.unit.controller.inprocess import PROFILE, fast_config
from tests.unit.controller.standin_executor import Batch, Execution, echo

WAIT = "wait"


@dataclass
class _Passwd:
    pw_dir: str


async def serve(argv: list[str]) -> None:
    database, state, runtime_dir, port, keepalive_ms, wait_seconds = argv
    config = fast_config(
        Path(state),
        Path(runtime_dir),
        listen=f"127.0.0.1:{port}",
        database_url=database,
        role="node",
        node_name="frozen",
        heartbeat_interval=timedelta(milliseconds=100),
        node_timeout=timedelta(seconds=1),
        node_keepalive=timedelta(milliseconds=int(keepalive_ms)),
        keep_running_on_shutdown=True,
    )
    # Worker uid reservations are host-wide (the user's home): keep the test's apart.
    home = config.state_dir / "home"
    pytest.MonkeyPatch().setattr(
        worker_uids, "pwd", types.SimpleNamespace(getpwuid=lambda _: _Passwd(str(home)))
    )

    async def wait(execution: Execution) -> AsyncIterator[Batch]:
        (config.state_dir / "waiting").write_text(execution.request.code)
        await asyncio.sleep(float(wait_seconds))
        async for batch in echo(execution):
            yield batch

    runtime = FakeRuntime({config.image_for(PROFILE)}, {WAIT: wait})
    controller = await start_controller(config, runtime=runtime)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        await controller.stop(grace=0.5)
        await runtime.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1:]))
