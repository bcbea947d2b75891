"""A sandbox cannot reach into another through the host side of its socket directory, nor
call its own executor."""

from __future__ import annotations

import asyncio
import json
import os
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller
from petri.v1 import sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.helpers import execute, kill_executor, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


async def test_user_code_cannot_touch_its_executor_or_its_socket(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    code = """
import os, signal
def attempt(fn):
    try:
        fn()
        return "succeeded"
    except OSError as exc:
        return type(exc).__name__
(
    attempt(lambda: os.remove("/run/petri/executor.sock")),
    attempt(lambda: open("/run/petri/filler", "wb").write(b"x")),
    attempt(lambda: os.kill(os.getppid(), signal.SIGKILL)),
    attempt(lambda: os.kill(1, signal.SIGKILL)),
)
"""
    response = await execute(stub, sandbox.name, code)
    assert value_of(response) == (
        "('PermissionError', 'PermissionError', 'PermissionError', 'PermissionError')"
    )
    assert value_of(await execute(stub, sandbox.name, "'alive'")) == "'alive'"


async def test_a_socket_redirected_to_a_neighbour_does_not_reach_it(
    stub: Stub, create_sandbox: CreateSandbox, controller: Controller
) -> None:
    """Were a sandbox's socket path ever redirected to a neighbour's socket (user code cannot
    do it: see above; here the test does it from the host), calls would not reach the
    neighbour: its executor refuses calls meant for another sandbox."""
    attacker, victim = await create_sandbox(), await create_sandbox()
    await execute(stub, victim.name, "visits = 0")
    socket_root = controller.config.runtime_dir / "s"
    redirect = (
        f"rm -f {socket_root / attacker.uid / 'executor.sock'} && "
        f"ln -s {socket_root / victim.uid / 'executor.sock'} "
        f"{socket_root / attacker.uid / 'executor.sock'}"
    )
    podman("unshare", "sh", "-c", redirect)
    # Its executor dies, so that the controller has to connect again.
    kill_executor(f"petri-{attacker.uid}")

    for _ in range(30):  # each call must fail; none may run in the victim
        try:
            response = await execute(stub, attacker.name, "visits += 1\nvisits")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.FAILED_PRECONDITION,
            ), exc.details()
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                break
        else:
            pytest.fail(f"the attacker's code ran somewhere: {response}")
        await asyncio.sleep(0.2)
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=attacker.name))
    assert got.state == sandbox_pb2.Sandbox.TERMINATED
    assert value_of(await execute(stub, victim.name, "visits")) == "0"


@pytest.mark.parametrize("runtime", ["RUNC", "GVISOR"])
async def test_user_code_can_neither_call_its_executor_nor_read_its_key(
    stub: Stub, create_sandbox: CreateSandbox, controller: Controller, runtime: str
) -> None:
    """User code can reach its executor's socket (the controller needs it open to a uid the
    container does not know), so the executor wants a key with every call, kept where user
    code cannot read it. User code tries every id it can find (its sandbox's uid is in its
    mountinfo) and reads what it can; the test knows the key from podman's side."""
    if runtime == "GVISOR" and controller.gvisor_service is None:
        if os.environ.get("PETRI_REQUIRE_GVISOR"):
            pytest.fail("PETRI_REQUIRE_GVISOR is set but runsc is not installed")
        pytest.skip("gVisor's runsc is not installed on this host (apt-get install runsc)")
    spec = sandbox_pb2.SandboxSpec(runtime=sandbox_pb2.SandboxSpec.Runtime.Value(runtime))
    sandbox = await create_sandbox(spec=spec)
    code = r"""
import glob, json, os, re, socket
import grpc
from petri.v1 import executor_pb2, executor_pb2_grpc

def read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("latin-1")
    except OSError as exc:
        return type(exc).__name__

paths = ["/proc/self/mountinfo", "/run/.containerenv", "/run/petri/executor.key",
         *glob.glob("/proc/[0-9]*/environ"), *glob.glob("/proc/[0-9]*/cmdline")]
seen = {path: read(path) for path in paths}
others = [p for p in glob.glob("/proc/[0-9]*") if int(p[6:]) != os.getpid()]
memory = {}
for path in [p + "/mem" for p in others]:
    try:
        open(path, "rb").close()
        memory[path] = "opened"
    except OSError as exc:
        memory[path] = type(exc).__name__
guesses = {""} | set(re.findall(r"[0-9a-f]{32}", "".join(seen.values())))
guesses |= {v for k, v in os.environ.items() if k.startswith("PETRI")}
try:
    socket.socket(socket.AF_UNIX).connect("/run/petri/executor.sock")
    connect = "connected"
except OSError as exc:
    connect = type(exc).__name__
answers = {}
with grpc.insecure_channel("unix:/run/petri/executor.sock") as channel:
    executor = executor_pb2_grpc.ExecutorStub(channel)
    for guess in sorted(guesses):
        for name in ("petri-sandbox-uid", "petri-executor-key"):
            try:
                request, metadata = executor_pb2.GetStatusRequest(), ((name, guess),)
                executor.GetStatus(request, metadata=metadata, timeout=10)
                answers[name + "=" + guess] = "answered"
            except grpc.RpcError as exc:
                answers[name + "=" + guess] = exc.code().name
print(json.dumps({"seen": seen, "answers": answers, "memory": memory, "connect": connect}))
"""
    response = await execute(stub, sandbox.name, code)
    assert not response.HasField("error"), response.error
    found = json.loads(response.stdout)
    assert f"petri-sandbox-uid={sandbox.uid}" in found["answers"]  # it found its uid, and
    if runtime == "RUNC":  # an ACL denies user code's uid the socket's directory
        assert found["connect"] == "PermissionError"
        assert set(found["answers"].values()) == {"UNAVAILABLE"}
    elif found["connect"] == "connected":  # gVisor's gofer has no ACLs: no key, no answer
        assert set(found["answers"].values()) == {"PERMISSION_DENIED"}
    else:
        assert set(found["answers"].values()) == {"UNAVAILABLE"}
    assert found["seen"]["/run/petri/executor.key"] in ("FileNotFoundError", "PermissionError")
    assert "opened" not in found["memory"].values()  # the executor's memory, say
    container = f"petri-{sandbox.uid}"
    key = podman(
        "inspect", "--format", '{{index .Config.Labels "io.petri.executor-key"}}', container
    ).strip()
    assert len(key) >= 32 and key not in response.stdout
    assert value_of(await execute(stub, sandbox.name, "'still works'")) == "'still works'"
