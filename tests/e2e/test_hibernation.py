"""Hibernation end to end, through the real API into real rootless podman sandboxes: pause and
resume keep values and files, unsaved names are listed, code on a paused sandbox resumes it,
idle sandboxes pause on their own, a simulated reboot brings sandboxes back from their
checkpoints, deletes and expiry of paused sandboxes, a disk that fills up, and a malicious
pickle that runs nothing outside its own sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from controller.app import Controller, start_controller
from controller.config import Config
from controller.pool_targets import PoolTarget
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, podman, sibling_config, value_of
from tests.e2e.test_full_image import full_image  # noqa: F401 (a fixture)
from tests.filesystems import small_filesystem

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

RUNNING = sandbox_pb2.Sandbox.RUNNING
PAUSED = sandbox_pb2.Sandbox.PAUSED
TERMINATED = sandbox_pb2.Sandbox.TERMINATED
WAIT_SECONDS = 60.0


@contextlib.asynccontextmanager
async def hibernating(
    e2e_config: Config, controller: Controller, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Controller, Stub]]:
    """A controller of its own (its registry, its checkpoints) beside the session's."""
    name = f"h{uuid.uuid4().hex[:6]}"
    config = sibling_config(
        e2e_config,
        controller,
        name,
        state_dir=tmp_path / "state",
        hibernate_interval=timedelta(milliseconds=200),
        **overrides,
    )
    running = await start_controller(config)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{running.port}", options=[("grpc.max_receive_message_length", 128 << 20)]
        ) as channel:
            yield running, sandbox_pb2_grpc.SandboxServiceStub(channel)
    finally:
        await running.stop(grace=1)
        label = f"label=io.petri.registry={running.manager.registry_label}"
        names = podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split()
        if names:
            podman("rm", "-f", *names)


async def create(stub: Stub, **fields: Any) -> sandbox_pb2.Sandbox:
    sandbox: sandbox_pb2.Sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox_pb2.Sandbox(**fields))
    )
    return sandbox


async def pause(stub: Stub, name: str) -> sandbox_pb2.Sandbox:
    paused: sandbox_pb2.Sandbox = await stub.PauseSandbox(
        sandbox_pb2.PauseSandboxRequest(name=name)
    )
    return paused


async def wait_state(
    stub: Stub, name: str, state: sandbox_pb2.Sandbox.State.ValueType
) -> sandbox_pb2.Sandbox:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))
        if got.state == state:
            return got
        if time.monotonic() > deadline:
            pytest.fail(
                f"{name} is {sandbox_pb2.Sandbox.State.Name(got.state)}, not "
                f"{sandbox_pb2.Sandbox.State.Name(state)}, after {WAIT_SECONDS} s"
            )
        await asyncio.sleep(0.1)


def containers_of(running: Controller) -> set[str]:
    label = f"label=io.petri.registry={running.manager.registry_label}"
    return set(podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split())


SESSION = r"""
import numpy as np, pandas as pd, threading, socket, sqlite3, os, stat
array = np.arange(12, dtype=np.float32).reshape(3, 4)
frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
class Model:
    def __init__(self, slope): self.slope = slope
    def predict(self, x): return self.slope * x + offset
offset = 1
model = Model(np.polyfit([0, 1, 2], [0, 2, 4], 1)[0])
square = lambda v: v * v
def counter():
    count = 0
    def step():
        nonlocal count
        count += 1
        return count
    return step
step = counter(); step()
def helper(v): return square(v) + offset
generator = (i for i in range(3))
lock = threading.Lock()
handle = open("data.bin", "wb")
sock = socket.socket()
thread = threading.Thread(target=lambda: None)
database = sqlite3.connect(":memory:")
os.makedirs("deep/er", exist_ok=True)
open("deep/er/script.sh", "w").write("#!/bin/sh\necho hi\n")
os.chmod("deep/er/script.sh", 0o750)
open("data.bin", "wb").write(bytes(range(256)) * 100)
open(os.fsencode("caf\xe9-\udcff.txt"), "wb").write(b"latin-1 name")
os.symlink("data.bin", "link")
os.mkdir("empty")
deep_path = "d"
os.mkdir(deep_path)
for _ in range(1499):  # os.makedirs recurses, once per level
    deep_path += "/d"
    os.mkdir(deep_path)
open(deep_path + "/bottom", "w").write("1,500 levels down")
"""
CHECK = r"""
import hashlib, os, stat
(
    array.sum(), list(frame.b), model.predict(10), square(7), step(), helper(3),
    hashlib.sha256(open("data.bin", "rb").read()).hexdigest()[:12],
    oct(stat.S_IMODE(os.stat("deep/er/script.sh").st_mode)),
    open(os.fsencode("caf\xe9-\udcff.txt"), "rb").read(), os.readlink("link"),
    os.listdir("empty"), np.__name__, pd.__name__,
    open("/".join(["d"] * 1500) + "/bottom").read(),
)
"""


async def test_pause_and_resume_keep_values_and_files_and_list_what_was_lost(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    async with hibernating(e2e_config, controller, tmp_path) as (running, stub):
        sandbox = await create(stub)
        answer = await execute(stub, sandbox.name, SESSION)
        assert not answer.HasField("error"), answer.error
        before = value_of(await execute(stub, sandbox.name, CHECK))
        assert before is not None and "'data.bin'" in before

        paused = await pause(stub, sandbox.name)
        assert paused.state == PAUSED and paused.checkpoint.size_bytes > 0
        deadline = time.monotonic() + WAIT_SECONDS  # removed just after the answer
        while f"petri-{sandbox.uid}" in containers_of(running):  # no container at all
            assert time.monotonic() < deadline, "the paused sandbox's container stayed"
            await asyncio.sleep(0.1)
        unsaved = {lost.name: lost.reason for lost in paused.checkpoint.lost_names}
        assert set(unsaved) == {"generator", "lock", "handle", "sock", "thread", "database"}
        assert unsaved["handle"] == "an open file"
        assert "generator" in unsaved["generator"]
        listed = await stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter="state = PAUSED")
        )
        assert sandbox.name in {s.name for s in listed.sandboxes}

        # Code on a paused sandbox resumes it first; the response says so.
        after = await execute(stub, sandbox.name, CHECK)
        assert after.namespace_restored and not after.HasField("error"), after.error
        # step() counts on from where it was: 2 before the pause, 3 after it.
        assert value_of(after) == before.replace(", 2, ", ", 3, ", 1)
        assert {lost.name for lost in after.lost_names} == set(unsaved)
        assert after.incarnation != sandbox.incarnation
        assert after.execution_count == 3  # the count carries on
        again = await execute(
            stub, sandbox.name, "'generator' in globals(), round(float(model.slope), 6)"
        )
        assert not again.namespace_restored and value_of(again) == "(False, 2.0)"


async def test_an_idle_sandbox_pauses_on_its_own_and_resumes_from_the_warm_pool(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    pool = (PoolTarget(size=1),)
    async with hibernating(e2e_config, controller, tmp_path, warm_pool=pool) as (running, stub):
        quick = await create(stub, auto_pause_after=Duration(seconds=1))
        never = await create(stub, auto_pause_after=Duration())
        await execute(stub, quick.name, "x = 41")
        await execute(stub, never.name, "y = 1")
        await wait_state(stub, quick.name, PAUSED)
        got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=never.name))
        assert got.state == RUNNING
        deadline = time.monotonic() + WAIT_SECONDS
        while not (pool_members := running.manager.warm_pool.ready_uids()):
            assert time.monotonic() < deadline, "the warm pool did not refill"
            await asyncio.sleep(0.1)
        answer = await execute(stub, quick.name, "x + 1")
        assert answer.namespace_restored and value_of(answer) == "42"
        # It took the container of the ready pool member: no cold start.
        record = await running.registry.get_live("e2e", quick.name.rpartition("/")[2])
        assert record is not None and record.container_name in {
            f"petri-{uid}" for uid in pool_members
        }


async def test_a_simulated_reboot_brings_back_paused_and_checkpointed_sandboxes(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    """The controller dies and podman loses every container (a reboot, a crash): a sandbox
    paused or saved while idle comes back from its checkpoint, saying so; one never saved is
    TERMINATED, saying why. Nothing is silently gone."""
    config = sibling_config(
        e2e_config,
        controller,
        f"r{uuid.uuid4().hex[:6]}",
        state_dir=tmp_path / "state",
        hibernate_interval=timedelta(milliseconds=200),
        checkpoint_idle_after=timedelta(seconds=1),
        keep_running_on_shutdown=True,  # the "crash": nothing is paused on the way down
    )
    first = await start_controller(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            paused = await create(stub)
            await execute(stub, paused.name, "a = 'paused'")
            await pause(stub, paused.name)
            idle = await create(stub)
            await execute(stub, idle.name, "b = 'idle'")
            deadline = time.monotonic() + WAIT_SECONDS
            while not (
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=idle.name))
            ).HasField("checkpoint"):
                assert time.monotonic() < deadline, "no idle checkpoint"
                await asyncio.sleep(0.1)
            busy = await create(stub, auto_pause_after=Duration())
            first.reaper.stop()  # from here on, nothing saves it
            await execute(stub, busy.name, "c = 'never saved'")
    finally:
        await first.stop(grace=1)
    names = containers_of(first)
    assert names, "the running sandboxes outlived their controller"
    podman("rm", "-f", *names)  # the reboot

    second = await start_controller(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=idle.name))
            assert got.state == PAUSED and "resumes from its checkpoint of" in got.state_message
            for sandbox, code, value in ((paused, "a", "'paused'"), (idle, "b", "'idle'")):
                answer = await execute(stub, sandbox.name, code)
                assert answer.namespace_restored and value_of(answer) == value
            lost = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=busy.name))
            assert lost.state == TERMINATED
            assert lost.state_message == (
                "found at controller start: its container is gone, and it had no checkpoint"
            )
    finally:
        await second.stop(grace=1)
        names = containers_of(second)
        if names:
            podman("rm", "-f", *names)


async def test_a_pause_waits_for_the_execution_in_progress(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    async with hibernating(e2e_config, controller, tmp_path) as (_, stub):
        sandbox = await create(stub)
        call = asyncio.ensure_future(
            execute(stub, sandbox.name, "import time\ntime.sleep(1.5)\ndone = True\n'slept'")
        )
        await asyncio.sleep(0.5)  # the execution is under way (it sleeps 1.5 s)
        paused = await pause(stub, sandbox.name)
        assert value_of(await call) == "'slept'"
        assert paused.state == PAUSED and paused.execution_count == 1
        answer = await execute(stub, sandbox.name, "done")
        assert answer.namespace_restored and value_of(answer) == "True"


async def test_delete_and_expiry_of_paused_sandboxes(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    async with hibernating(e2e_config, controller, tmp_path) as (running, stub):
        deleted, expiring = await create(stub), await create(stub)
        for sandbox in (deleted, expiring):
            await pause(stub, sandbox.name)
        checkpoints = running.config.checkpoint_path
        assert sorted(os.listdir(checkpoints)) == sorted(
            [f"{deleted.uid}.ckpt", f"{expiring.uid}.ckpt"]
        )
        # Its time runs out once it is paused (a fixed short TTL raced slow pauses).
        await stub.UpdateSandbox(
            sandbox_pb2.UpdateSandboxRequest(
                sandbox=sandbox_pb2.Sandbox(name=expiring.name, ttl=Duration(nanos=1000))
            )
        )
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=deleted.name))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await execute(stub, deleted.name, "1")
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        deadline = time.monotonic() + WAIT_SECONDS
        while True:  # paused time counts toward the TTL
            try:
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=expiring.name))
            except grpc.aio.AioRpcError as exc:
                assert "expired at" in (exc.details() or "")
                break
            assert time.monotonic() < deadline, "the paused sandbox did not expire"
            await asyncio.sleep(0.2)
        assert os.listdir(checkpoints) == []


async def test_a_full_disk_leaves_the_sandbox_running_and_says_so(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    with small_filesystem("8m") as disk:
        async with hibernating(
            e2e_config, controller, tmp_path, checkpoint_dir=disk / "checkpoints"
        ) as (_, stub):
            sandbox = await create(stub)
            await execute(stub, sandbox.name, "import os\nbig = os.urandom(16 << 20)\nsmall = 1")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pause(stub, sandbox.name)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = caught.value.details() or ""
            assert "No space left on device" in details and "still RUNNING" in details
            got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
            assert got.state == RUNNING
            answer = await execute(stub, sandbox.name, "len(big) + small")
            assert value_of(answer) == str((16 << 20) + 1) and not answer.namespace_restored
            assert os.listdir(disk / "checkpoints") == []  # no partial file left


MALICIOUS = r"""
import os
class Trap:
    def __reduce__(self):
        # Runs wherever this pickle is loaded: it leaves a note of where that was.
        return (os.system, ("echo uid=$(id -u) pid=$$ host=$(cat /etc/hostname) > "
                            "/workspace/unpickled-here; touch {host_marker}",))
trap = Trap()
"""


async def test_a_malicious_pickle_runs_only_inside_its_own_sandbox(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    """A namespace is user code's output: loading it runs user code. It is only ever loaded by
    the sandbox's own worker, as user code's uid, never by the controller or the daemon."""
    host_marker = tmp_path / "pwned"
    async with hibernating(e2e_config, controller, tmp_path) as (running, stub):
        sandbox = await create(stub)
        await execute(stub, sandbox.name, MALICIOUS.format(host_marker=host_marker))
        await pause(stub, sandbox.name)
        assert not host_marker.exists()  # the controller never loaded it
        answer = await execute(stub, sandbox.name, "open('unpickled-here').read()")
        assert answer.namespace_restored
        note = value_of(answer)
        assert note is not None and "uid=0" not in note  # not the sandbox's root (the daemon)
        assert not host_marker.exists()  # nor anything on the host
        # The checkpoint file holds the pickle as bytes: the controller moved, never read it.
        saved = (running.config.checkpoint_path / f"{sandbox.uid}.ckpt").read_bytes()
        assert b"unpickled-here" in saved


async def test_a_gvisor_sandbox_pauses_and_resumes_under_gvisor(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    """gVisor sandboxes hibernate with the same namespace tier (docs/hibernation.md says why
    not runsc's own checkpoint), and come back under gVisor."""
    if controller.gvisor_service is None:
        if os.environ.get("PETRI_REQUIRE_GVISOR"):
            pytest.fail("PETRI_REQUIRE_GVISOR is set but runsc is not installed")
        pytest.skip("gVisor's runsc is not installed on this host (apt-get install runsc)")
    async with hibernating(e2e_config, controller, tmp_path) as (_, stub):
        spec = sandbox_pb2.SandboxSpec(runtime=sandbox_pb2.SandboxSpec.GVISOR)
        sandbox = await create(stub, spec=spec)
        await execute(stub, sandbox.name, "x = [1, 2, 3]\nopen('f.txt', 'w').write('kept')")
        assert (await pause(stub, sandbox.name)).state == PAUSED
        answer = await execute(
            stub, sandbox.name, "x, open('f.txt').read(), '4.4.0' in open('/proc/version').read()"
        )
        assert answer.namespace_restored
        assert value_of(answer) == "([1, 2, 3], 'kept', True)"


FITTED = r"""
import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
features = np.arange(20, dtype=float).reshape(10, 2)
model = make_pipeline(StandardScaler(), LinearRegression()).fit(features, features @ [2.0, 3.0] + 1)
"""


@pytest.mark.usefixtures("full_image")  # fails without the full image under CI
async def test_a_fitted_scikit_learn_model_survives_a_pause(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    async with hibernating(e2e_config, controller, tmp_path) as (_, stub):
        spec = sandbox_pb2.SandboxSpec(image_profile="full")
        sandbox = await create(stub, spec=spec)
        answer = await execute(stub, sandbox.name, FITTED)
        assert not answer.HasField("error"), answer.error
        await pause(stub, sandbox.name)
        answer = await execute(
            stub, sandbox.name, "round(float(model.predict([[4.0, 5.0]])[0]), 6)"
        )
        assert answer.namespace_restored and list(answer.lost_names) == []
        assert value_of(answer) == "24.0"
