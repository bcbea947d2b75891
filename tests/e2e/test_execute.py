"""Running code in real sandboxes through the public API."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from petri.v1 import execution_pb2, sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.helpers import execute, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


async def test_variables_persist_between_calls(stub: Stub, sandbox: sandbox_pb2.Sandbox) -> None:
    first = await execute(stub, sandbox.name, "x = 41")
    assert value_of(first) is None and not first.HasField("error")
    second = await execute(stub, sandbox.name, "x + 1")
    assert value_of(second) == "42"
    assert second.execution_count == 2
    assert second.duration.ToNanoseconds() > 0
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert got.execution_count == 2
    assert got.last_active_time.ToDatetime() >= sandbox.create_time.ToDatetime()


async def test_stdout_and_stderr_come_back_separately(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    response = await execute(
        stub,
        sandbox.name,
        "import sys, os\nprint('hello')\nprint('oops', file=sys.stderr)\n"
        "os.system('echo from-a-shell')\nNone",
    )
    assert response.stdout == "hello\nfrom-a-shell\n"
    assert response.stderr == "oops\n"


async def test_an_exception_is_a_result_and_the_sandbox_keeps_working(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "kept = 'yes'")
    failed = await execute(stub, sandbox.name, "def f():\n    raise ValueError('bad value')\nf()")
    assert failed.error.kind == execution_pb2.ExecutionError.EXCEPTION
    assert failed.error.ename == "ValueError"
    assert failed.error.evalue == "bad value"
    assert failed.error.traceback[0] == "Traceback (most recent call last):"
    assert any("raise ValueError('bad value')" in line for line in failed.error.traceback)
    assert failed.error.traceback[-1] == "ValueError: bad value"
    assert value_of(await execute(stub, sandbox.name, "kept")) == "'yes'"


async def test_os_exit_is_reported_and_the_sandbox_works_after_it(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "lost = 1\nopen('kept.txt', 'w').write('file survives')")
    crashed = await execute(stub, sandbox.name, "import os; os._exit(3)")
    assert crashed.error.kind == execution_pb2.ExecutionError.INTERPRETER_EXITED
    assert "exited with status 3" in crashed.error.evalue
    assert crashed.namespace_reset
    assert crashed.incarnation != sandbox.incarnation

    after = await execute(stub, sandbox.name, "open('kept.txt').read()")
    assert value_of(after) == "'file survives'"
    gone = await execute(stub, sandbox.name, "lost")
    assert gone.error.ename == "NameError"
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert got.state == sandbox_pb2.Sandbox.RUNNING
    assert got.incarnation == crashed.incarnation


async def test_a_timeout_interrupts_the_code_and_keeps_variables(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, sandbox.name, "counter = 0")
    response = await execute(
        stub,
        sandbox.name,
        "while True:\n    counter += 1",
        timeout={"seconds": 1},
    )
    assert response.error.kind == execution_pb2.ExecutionError.TIMEOUT
    assert not response.namespace_reset
    assert value_of(await execute(stub, sandbox.name, "counter > 0")) == "True"


async def test_two_sandboxes_do_not_share_variables_or_files(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    one, two = await create_sandbox(), await create_sandbox()
    await execute(stub, one.name, "secret = 'one'\nopen('/workspace/secret.txt', 'w').write('1')")
    response = await execute(
        stub,
        two.name,
        "import os\n(os.path.exists('/workspace/secret.txt'), 'secret' in globals())",
    )
    assert value_of(response) == "(False, False)"


async def test_user_code_has_no_network_no_capabilities_and_a_read_only_root(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    code = """
import os, socket
def tcp():
    try:
        socket.create_connection(("10.0.2.2", 80), timeout=1)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
def write_root():
    try:
        open("/usr/evil", "w")
        return "written"
    except OSError as exc:
        return type(exc).__name__
caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapPrm"))]
nnp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0]
ifaces = sorted(name for _, name in socket.if_nameindex())
(tcp(), write_root(), caps, nnp, ifaces, os.getcwd(), os.getuid() >= 10000)
"""
    response = await execute(stub, sandbox.name, code)
    assert not response.HasField("error"), response.error
    assert value_of(response) == (
        "('OSError', 'OSError', ['0000000000000000', '0000000000000000'], '1', ['lo'], "
        "'/workspace', True)"
    )


async def test_user_code_of_each_sandbox_runs_as_a_uid_of_its_own(
    create_sandbox: CreateSandbox, stub: Stub
) -> None:
    """Every sandbox shares one user namespace mapping (one copy of the image on disk); the
    kernel tells their user code apart by uid: processes, limits and signals."""
    sandboxes = [await create_sandbox() for _ in range(3)]
    uids = [value_of(await execute(stub, s.name, "import os\nos.getuid()")) for s in sandboxes]
    assert len(set(uids)) == 3


async def test_a_segfault_is_reported_and_the_sandbox_works_after_it(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    crashed = await execute(stub, sandbox.name, "import ctypes\nctypes.string_at(0)")
    assert crashed.error.kind == execution_pb2.ExecutionError.INTERPRETER_EXITED
    assert "SIGSEGV" in crashed.error.evalue and crashed.namespace_reset
    assert value_of(await execute(stub, sandbox.name, "6 * 7")) == "42"
