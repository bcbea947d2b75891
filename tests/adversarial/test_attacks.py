"""Hostile code against real sandboxes. Each case asserts that the attack fails, that the
controller and a neighbour sandbox keep answering normally, and that the victim either keeps
working or is reported TERMINATED with a reason."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller
from petri.v1 import execution_pb2, sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.helpers import PARENT, execute, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


@pytest.fixture
async def neighbour(create_sandbox: CreateSandbox, stub: Stub) -> sandbox_pb2.Sandbox:
    sandbox = await create_sandbox()
    await execute(stub, sandbox.name, "mine = 'untouched'")
    return sandbox


@pytest.fixture(params=["runc", "gvisor"])
async def victim(
    request: pytest.FixtureRequest,
    create_sandbox: CreateSandbox,
    controller: Controller,
) -> sandbox_pb2.Sandbox:
    """The attacked sandbox, under each runtime this host has."""
    runtime = sandbox_pb2.SandboxSpec.RUNC
    if request.param == "gvisor":
        if controller.gvisor_service is None:
            if os.environ.get("PETRI_REQUIRE_GVISOR"):
                pytest.fail("PETRI_REQUIRE_GVISOR is set but runsc is not installed")
            pytest.skip("gVisor's runsc is not installed on this host")
        runtime = sandbox_pb2.SandboxSpec.GVISOR
    return await create_sandbox(spec=sandbox_pb2.SandboxSpec(runtime=runtime))


def under_gvisor(victim: sandbox_pb2.Sandbox) -> bool:
    return victim.spec.runtime == sandbox_pb2.SandboxSpec.GVISOR


async def assert_unharmed(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    """The service and the neighbour answer normally; the victim works or says why not."""
    listed = await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
    assert neighbour.name in {s.name for s in listed.sandboxes}
    check = "import subprocess\n(mine, subprocess.run(['true']).returncode)"
    response = await execute(stub, neighbour.name, check, timeout={"seconds": 60})
    assert value_of(response) == "('untouched', 0)", response
    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=victim.name))
    if got.state == sandbox_pb2.Sandbox.TERMINATED:
        assert got.state_message
        return
    assert got.state == sandbox_pb2.Sandbox.RUNNING
    after = await execute(stub, victim.name, "'still here'", timeout={"seconds": 60})
    assert value_of(after) == "'still here'", after


async def run_attack(
    stub: Stub, victim: sandbox_pb2.Sandbox, code: str, timeout: int = 30
) -> sandbox_pb2.ExecuteCodeResponse:
    return await execute(stub, victim.name, code, timeout={"seconds": timeout})


def in_a_child(code: str) -> str:
    """Code that runs `code` in a child interpreter and ends with what it printed: whatever
    the attempt changes (a namespace it entered) leaves the sandbox's interpreter as it was."""
    return (
        "import subprocess, sys\n"
        f"done = subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True)\n"
        "done.stdout.strip() or done.stderr[-2000:]"
    )


async def wait_terminated(stub: Stub, victim: sandbox_pb2.Sandbox) -> None:
    """The victim's runtime gave up (gVisor's sandbox can): the service must say why."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=victim.name))
        if got.state == sandbox_pb2.Sandbox.TERMINATED:
            assert got.state_message
            return
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.5)


async def test_no_network_at_all(
    stub: Stub, controller: Controller, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    code = f"""
import socket
def attempt(fn):
    try:
        fn()
        return "succeeded"
    except OSError as exc:
        return type(exc).__name__
results = {{
    "controller port on 127.0.0.1": attempt(lambda: socket.create_connection(("127.0.0.1", {controller.port}), timeout=2)),
    "a host address": attempt(lambda: socket.create_connection(("10.0.2.2", 22), timeout=2)),
    "dns": attempt(lambda: socket.getaddrinfo("pypi.org", 443)),
    "raw socket": attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)),
    "packet socket": attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
}}
results
"""
    response = await run_attack(stub, victim, code)
    results = eval(value_of(response) or "{}")
    assert results and "succeeded" not in results.values(), results
    await assert_unharmed(stub, neighbour, victim)


async def test_host_files_and_controller_state_are_out_of_reach(
    stub: Stub, controller: Controller, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    state = controller.config.database_path
    sockets = controller.config.runtime_dir / "s" / neighbour.uid / "executor.sock"
    code = f"""
import os
def read(path):
    try:
        with open(path, "rb") as f:
            return f.read(64) and "read"
    except OSError as exc:
        return type(exc).__name__
{{
    "registry": read({str(state)!r}),
    "registry via /proc/1/root": read("/proc/1/root" + {str(state)!r}),
    "neighbour socket": read({str(sockets)!r}),
    "host home": os.path.exists({os.path.expanduser("~")!r}),
    "pid 1": open("/proc/1/cmdline").read().split("\\0")[0],
    "processes": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())[:3],
}}
"""
    response = await run_attack(stub, victim, code)
    results = eval(value_of(response) or "{}")
    unreadable = ("FileNotFoundError", "PermissionError")
    assert results["registry"] in unreadable
    assert results["registry via /proc/1/root"] in unreadable
    assert results["neighbour socket"] in unreadable
    assert results["host home"] is False
    assert results["pid 1"].endswith("tini")  # a process tree of its own
    await assert_unharmed(stub, neighbour, victim)


async def test_mount_ptrace_and_setuid_gain_nothing(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    code = """
import ctypes, os, subprocess
libc = ctypes.CDLL(None, use_errno=True)
mounted = libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)
mount_errno = ctypes.get_errno()
PTRACE_ATTACH = 16
traced = libc.ptrace(PTRACE_ATTACH, 999999, None, None)  # a pid outside this sandbox's view
setuid_files = subprocess.run(
    ["find", "/", "-xdev", "-perm", "-4000", "-type", "f"], capture_output=True, text=True
).stdout.split()
escalations = [
    subprocess.run([f, "--version"], capture_output=True).returncode for f in setuid_files
]
uid_after = os.getuid()
PR_GET_NO_NEW_PRIVS = 39
(mounted, mount_errno, traced, uid_after, len(setuid_files), libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0))
"""
    response = await run_attack(stub, victim, code)
    mounted, mount_errno, traced, _, _, no_new_privs = eval(value_of(response) or "()")
    assert mounted == -1 and mount_errno == 1  # EPERM
    assert traced == -1
    assert no_new_privs == 1  # setuid binaries cannot raise privileges
    await assert_unharmed(stub, neighbour, victim)


NAMESPACE_ATTEMPTS = """
import ctypes, errno, os, shutil, subprocess
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x20000, 0x10000000, 0x40000000, 17
SYS_clone, SYS_clone3 = 56, 435

def alone(attempt):
    # In a process of its own: one that worked must not change what the next one meets.
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, attempt().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    return os.read(read, 200).decode() or "no answer"

def called(result):
    return errno.errorcode[ctypes.get_errno()] if result == -1 else "succeeded"

def cloned(result):
    if result == 0:
        os._exit(0)  # the child of a clone that worked
    if result > 0:
        os.waitpid(result, 0)
        return "succeeded"
    return errno.errorcode[ctypes.get_errno()]

def os_unshare():
    try:
        os.unshare(os.CLONE_NEWUSER)
        return "succeeded"
    except OSError as exc:
        return errno.errorcode[exc.errno]

clone_args = (ctypes.c_uint64 * 8)(CLONE_NEWUSER, 0, 0, 0, SIGCHLD, 0, 0, 0)
results = {
    "os.unshare(CLONE_NEWUSER)": alone(os_unshare),
    "unshare(CLONE_NEWNS | CLONE_NEWNET)": alone(
        lambda: called(libc.unshare(CLONE_NEWNS | CLONE_NEWNET))
    ),
    "clone(CLONE_NEWUSER)": alone(
        lambda: cloned(libc.syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0))
    ),
    "clone3(CLONE_NEWUSER)": alone(
        lambda: cloned(libc.syscall(SYS_clone3, ctypes.byref(clone_args), ctypes.sizeof(clone_args)))
    ),
    "setns": alone(lambda: called(libc.setns(os.open("/proc/self/ns/net", os.O_RDONLY), 0))),
}
if shutil.which("unshare"):  # util-linux, as an attacker would use it
    done = subprocess.run(
        ["unshare", "-Urmn", "sh", "-c", "mount -t tmpfs none /mnt && echo mounted"],
        capture_output=True, text=True,
    )
    results["unshare -Urmn"] = "succeeded" if "mounted" in done.stdout else done.stderr[-100:]
print(results)
"""


async def test_no_new_namespaces(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    """A user namespace would hold every capability over its own mounts and network (a tmpfs
    no limit counts, packet sockets) and expose the kernel's namespace code: refused."""
    response = await run_attack(stub, victim, in_a_child(NAMESPACE_ATTEMPTS))
    results = eval(eval(value_of(response) or "''") or "{}")
    assert "unshare -Urmn" in results, results  # the image has util-linux
    assert "succeeded" not in results.values(), results
    if not under_gvisor(victim):  # Debian's runsc says EPERM to every refused call
        assert results["clone3(CLONE_NEWUSER)"] == "ENOSYS"  # so the C library uses clone
        for call in ("os.unshare(CLONE_NEWUSER)", "clone(CLONE_NEWUSER)", "setns"):
            assert results[call] == "EPERM", results
    await assert_unharmed(stub, neighbour, victim)


SOCKET_ATTEMPTS = """
import ctypes, errno, socket
libc = ctypes.CDLL(None, use_errno=True)

def attempt(family, kind, protocol=0):
    try:
        socket.socket(family, kind, protocol).close()
        return "succeeded"
    except OSError as exc:
        return errno.errorcode[exc.errno]

AF_VSOCK, AF_PACKET, AF_NETLINK, AF_ALG, AF_KEY = 40, 17, 16, 38, 15
results = {
    "vsock": attempt(AF_VSOCK, socket.SOCK_STREAM),
    "packet": attempt(AF_PACKET, socket.SOCK_RAW),
    "netlink audit": attempt(AF_NETLINK, socket.SOCK_RAW, 9),
    "netlink netfilter": attempt(AF_NETLINK, socket.SOCK_RAW, 12),
    "netlink generic": attempt(AF_NETLINK, socket.SOCK_RAW, 16),
    "crypto": attempt(AF_ALG, socket.SOCK_SEQPACKET),
    "key": attempt(AF_KEY, socket.SOCK_RAW, 2),
}
# The kernel reads the family as an int: high bits must not slip vsock past a filter.
fd = libc.syscall(41, ctypes.c_long((1 << 32) | AF_VSOCK), socket.SOCK_STREAM, 0)
results["vsock, high bits set"] = errno.errorcode[ctypes.get_errno()] if fd == -1 else "succeeded"
print(results)
"""


async def test_no_unusual_socket_families(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    """vsock reaches the hypervisor past --network none; packet, netlink beyond routes, crypto
    and key sockets are kernel attack surface user code has no use for."""
    response = await run_attack(stub, victim, in_a_child(SOCKET_ATTEMPTS))
    results = eval(eval(value_of(response) or "''") or "{}")
    assert results and "succeeded" not in results.values(), results
    await assert_unharmed(stub, neighbour, victim)


async def test_ordinary_python_still_works(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    """What the seccomp profile refuses is nothing ordinary code needs."""
    code = """
import concurrent.futures, multiprocessing, socket, subprocess, threading
checks = {"subprocess": subprocess.run(["true"]).returncode == 0}
thread = threading.Thread(target=lambda: None)
thread.start()
thread.join()
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    checks["threads"] = list(pool.map(abs, [-1, -2, -3])) == [1, 2, 3]
with multiprocessing.get_context("fork").Pool(2) as pool:
    checks["processes"] = pool.map(abs, [-1, -2]) == [1, 2]
lock = multiprocessing.Lock()  # a POSIX semaphore in /dev/shm
checks["lock"] = lock.acquire(timeout=5)
a, b = socket.socketpair()
a.sendall(b"x")
checks["socketpair"] = b.recv(1) == b"x"
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname()[:2], timeout=5)
accepted, _ = server.accept()
client.sendall(b"y")
checks["loopback tcp"] = accepted.recv(1) == b"y"
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
checks["inet6"] = True
checks["getaddrinfo"] = len(socket.getaddrinfo("localhost", 80)) > 0
checks["interfaces"] = [name for _, name in socket.if_nameindex()] == ["lo"]
checks
"""
    response = await run_attack(stub, victim, code)
    checks = eval(value_of(response) or "{}")
    assert checks and all(checks.values()), (checks, response.error)
    await assert_unharmed(stub, neighbour, victim)


async def test_killing_pid_1(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    code = """
import os, signal
outcomes = []
for sig in (signal.SIGKILL, signal.SIGTERM):
    try:
        os.kill(1, sig)
        outcomes.append("sent")
    except PermissionError:
        outcomes.append("refused")
outcomes
"""
    response = await run_attack(stub, victim, code)
    assert value_of(response) == "['refused', 'refused']", response
    await assert_unharmed(stub, neighbour, victim)


async def stream_attack(
    stub: Stub, victim: sandbox_pb2.Sandbox, code: str, timeout: int
) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeResponse]:
    async def requests() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
        start = sandbox_pb2.ExecuteCodeStart(name=victim.name, code=code)
        start.timeout.FromSeconds(timeout)
        yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

    async for response in stub.StreamExecuteCode(requests()):
        yield response


async def test_a_fork_bomb_starves_only_itself(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    bomb = "import os\nprint('bombing', flush=True)\nwhile True:\n    os.fork()"
    stderr, result = "", None
    try:
        async for event in stream_attack(stub, victim, bomb, timeout=20):
            which = event.WhichOneof("event")
            if which == "stdout":
                await assert_unharmed_neighbour(stub, neighbour)  # the bomb is going off
            elif which == "stderr":
                stderr += event.stderr
            elif which == "result":
                result = event.result
    except grpc.aio.AioRpcError:
        await wait_terminated(stub, victim)
    else:
        assert result is not None
        # Under gVisor, whose forks are slow, the bomb may not reach the process limit
        # within its timeout: it is then interrupted like any code that runs too long.
        assert result.error.ename in ("BlockingIOError", "TimeoutError"), (result, stderr[-2000:])
        if result.error.ename == "BlockingIOError":
            # The bomb hit the sandbox's own process limit. Either what it left running held
            # half the limit and was stopped with the interpreter (the caller is told the
            # variables are gone), or its children had already died of the limit themselves
            # (under gVisor, typically) and the namespace is kept. Either way few are left.
            if result.namespace_reset:
                assert "process limit" in stderr, stderr[-2000:]
            await wait_few_processes(stub, victim)
    await assert_unharmed(stub, neighbour, victim)


async def wait_few_processes(stub: Stub, victim: sandbox_pb2.Sandbox) -> None:
    """Fewer than 20 processes are left in the victim within 30 s: children of a bomb that
    hit the limit may still be dying when its result arrives."""
    count = """
import os, time
deadline = time.monotonic() + 30
while (left := len([p for p in os.listdir('/proc') if p.isdigit()])) >= 20:
    if time.monotonic() > deadline:
        break
    time.sleep(0.05)
left
"""
    response = await execute(stub, victim.name, count, timeout={"seconds": 60})
    assert int(value_of(response) or 999) < 20, response


async def assert_unharmed_neighbour(stub: Stub, neighbour: sandbox_pb2.Sandbox) -> None:
    check = "import subprocess\n(mine, subprocess.run(['true']).returncode)"
    response = await execute(stub, neighbour.name, check, timeout={"seconds": 60})
    assert value_of(response) == "('untouched', 0)", response


async def test_a_memory_bomb_gets_memory_error_and_keeps_the_namespace(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, victim.name, "kept = 'yes'")
    response = await run_attack(
        stub, victim, "hog = []\nwhile True:\n    hog.append(bytearray(100 << 20))", timeout=60
    )
    assert response.error.ename == "MemoryError"
    assert value_of(await execute(stub, victim.name, "del hog\nkept")) == "'yes'"
    await assert_unharmed(stub, neighbour, victim)


async def test_filling_the_disk_stops_at_the_sandbox_quota(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    code = """
import errno
def fill(path):
    written = 0
    try:
        with open(path, "wb") as f:
            while True:
                f.write(b"x" * (16 << 20))
                written += 16 << 20
    except OSError as exc:
        return (written >> 20, errno.errorcode[exc.errno])
(fill("/workspace/fill"), fill("/tmp/fill"), fill("/dev/shm/fill"))
"""
    response = await run_attack(stub, victim, code, timeout=120)
    filled = eval(value_of(response) or "()")
    (workspace_mib, error_1), (tmp_mib, error_2), (shm_mib, error_3) = filled
    assert error_1 == error_2 == error_3 == "ENOSPC"
    assert workspace_mib <= 1024 and tmp_mib <= 256 and shm_mib <= 64
    await execute(
        stub,
        victim.name,
        "import os\nfor path in ('/workspace/fill', '/tmp/fill', '/dev/shm/fill'):\n"
        "    os.remove(path)",
    )
    await assert_unharmed(stub, neighbour, victim)


async def test_a_hundred_million_lines_are_cut_not_stored(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    code = "import sys\nline = b'y' * 9 + b'\\n'\nfor _ in range(100_000):\n    sys.stdout.buffer.write(line * 1000)"
    response = await run_attack(stub, victim, code, timeout=120)
    assert response.output_truncated
    assert len(response.stdout.encode()) <= (10 << 20) + 200
    await assert_unharmed(stub, neighbour, victim)


async def test_an_input_named_dot_dot_is_refused(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    request = sandbox_pb2.ExecuteCodeRequest(
        name=victim.name,
        code="print('never')",
        files=[execution_pb2.File(path="../../x", content=b"escape")],
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteCode(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    listing = await execute(
        stub, victim.name, "import os\n(os.listdir('/workspace'), os.path.exists('/x'))"
    )
    assert value_of(listing) == "([], False)"
    await assert_unharmed(stub, neighbour, victim)


async def test_a_one_gigabyte_request_is_refused_cheaply(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    huge = execution_pb2.File(path="huge.bin", content=b"\0" * (1 << 30))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=victim.name, code="1", files=[huge])
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    del huge
    await assert_unharmed(stub, neighbour, victim)


async def test_a_flood_of_a_thousand_executes(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    await execute(stub, victim.name, "count = 0")

    async def one() -> str | None:
        return value_of(await execute(stub, victim.name, "count += 1\ncount"))

    flood = [asyncio.create_task(one()) for _ in range(1000)]
    await asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED)
    await assert_unharmed_neighbour(stub, neighbour)  # while the rest of the flood is queued
    values = await asyncio.gather(*flood)
    assert sorted(int(v or 0) for v in values) == list(range(1, 1001))
    await assert_unharmed(stub, neighbour, victim)


async def test_a_planted_executor_package_is_never_imported(
    stub: Stub, neighbour: sandbox_pb2.Sandbox, victim: sandbox_pb2.Sandbox
) -> None:
    """User code plants `executor/` in /workspace (the interpreter's working directory) and
    restarts its interpreter: the new one must not import it, so its limits stay."""
    before = value_of(
        await execute(stub, victim.name, "import resource\nresource.getrlimit(resource.RLIMIT_AS)")
    )
    plant = (
        "import os\n"
        "os.makedirs('executor', exist_ok=True)\n"
        "open('executor/__init__.py', 'w').write('import resource; resource.setrlimit = lambda *a: None')\n"
        "open('executor/worker.py', 'w').write('raise SystemExit(\"planted\")')\n"
        "os._exit(0)"
    )
    crashed = await run_attack(stub, victim, plant)
    assert crashed.namespace_reset
    after = await execute(
        stub, victim.name, "import resource\nresource.getrlimit(resource.RLIMIT_AS)"
    )
    assert value_of(after) == before and before != "(-1, -1)"
    await assert_unharmed(stub, neighbour, victim)
