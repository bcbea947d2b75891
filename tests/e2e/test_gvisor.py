"""The core cases again, in sandboxes that run under gVisor (runsc)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import execution_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.conftest import CreateSandbox
from tests.e2e.helpers import execute, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
GVISOR = sandbox_pb2.SandboxSpec(runtime=sandbox_pb2.SandboxSpec.GVISOR)


@pytest.fixture
async def gvisor_sandbox(
    create_sandbox: CreateSandbox, controller: Controller
) -> sandbox_pb2.Sandbox:
    if controller.gvisor_service is None:
        if os.environ.get("PETRI_REQUIRE_GVISOR"):
            pytest.fail("PETRI_REQUIRE_GVISOR is set but runsc is not installed")
        pytest.skip("gVisor's runsc is not installed on this host (apt-get install runsc)")
    return await create_sandbox(spec=GVISOR)


async def test_runs_under_gvisor_with_state_output_and_errors(
    stub: Stub, gvisor_sandbox: sandbox_pb2.Sandbox
) -> None:
    assert gvisor_sandbox.spec.runtime == sandbox_pb2.SandboxSpec.GVISOR
    name = gvisor_sandbox.name
    kernel = await execute(stub, name, "open('/proc/version').read()")
    assert "4.4.0" in (value_of(kernel) or "")  # gVisor's own kernel, not the host's
    await execute(stub, name, "x = 41")
    both = await execute(
        stub, name, "import sys\nprint('out'); print('err', file=sys.stderr)\nx + 1"
    )
    assert (both.stdout, both.stderr, value_of(both)) == ("out\n", "err\n", "42")
    failed = await execute(stub, name, "1 / 0")
    assert failed.error.ename == "ZeroDivisionError"
    crashed = await execute(stub, name, "import os; os._exit(3)")
    assert crashed.error.kind == execution_pb2.ExecutionError.INTERPRETER_EXITED
    assert value_of(await execute(stub, name, "'back'")) == "'back'"


async def test_files_and_timeouts_under_gvisor(
    stub: Stub, gvisor_sandbox: sandbox_pb2.Sandbox
) -> None:
    response = await execute(
        stub,
        gvisor_sandbox.name,
        "import pandas as pd\npd.read_csv('in.csv').describe().to_csv('out.csv')",
        files=[execution_pb2.File(path="in.csv", content=b"a\n1\n2\n3\n")],
    )
    assert [f.path for f in response.files] == ["out.csv"]
    interrupted = await execute(
        stub, gvisor_sandbox.name, "y = 1\nwhile True: pass", timeout={"seconds": 1}
    )
    assert interrupted.error.kind == execution_pb2.ExecutionError.TIMEOUT
    assert value_of(await execute(stub, gvisor_sandbox.name, "y")) == "1"


async def test_user_code_under_gvisor_has_no_network_and_no_way_out(
    stub: Stub, gvisor_sandbox: sandbox_pb2.Sandbox
) -> None:
    code = """
import os, socket
def attempt(fn):
    try:
        fn()
        return "succeeded"
    except OSError as exc:
        return type(exc).__name__
(
    attempt(lambda: socket.create_connection(("10.0.2.2", 22), timeout=2)),
    attempt(lambda: open("/run/petri/filler", "wb")),
    attempt(lambda: os.kill(os.getppid(), 9)),
    os.getuid(),
)
"""
    value = value_of(await execute(stub, gvisor_sandbox.name, code))
    assert value is not None and "succeeded" not in value
    assert int(value.rsplit(",", 1)[1].rstrip(")")) >= 10000  # user code is not root


async def test_gvisor_is_refused_clearly_where_runsc_is_missing(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    config = sibling_config(
        e2e_config,
        controller,
        "no-runsc",
        state_dir=tmp_path,
        runsc_binary="runsc-that-is-not-installed",
    )
    without = await start_controller(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{without.port}") as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateSandbox(
                    sandbox_pb2.CreateSandboxRequest(
                        parent="projects/e2e", sandbox=sandbox_pb2.Sandbox(spec=GVISOR)
                    )
                )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "runsc is not installed" in (caught.value.details() or "")
    finally:
        await without.stop(grace=1)
