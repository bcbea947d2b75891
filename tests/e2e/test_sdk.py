"""The Python SDK (petri.Sandbox, petri.AsyncSandbox) through the real service.

The session's controller runs in this test's event loop: the blocking SDK is called from a
thread (asyncio.to_thread), or its calls would wait for a loop they block."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

import petri
from controller.app import Controller, start_controller
from controller.config import Config
from petri import AsyncClient, AsyncSandbox, Client, Sandbox
from petri.sdk.requests import create_request
from petri.v1 import error_details_pb2
from tests.e2e.helpers import PROJECT, podman, sibling_config

pytestmark = pytest.mark.e2e

MIB = 1 << 20


@pytest.fixture
def client(controller: Controller) -> Iterator[Client]:
    with Client(addr=f"127.0.0.1:{controller.port}", project=PROJECT, token="") as made:
        yield made


@pytest.fixture
async def aclient(controller: Controller) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(addr=f"127.0.0.1:{controller.port}", project=PROJECT) as made:
        yield made


def unique_id() -> str:
    return f"sdk-{uuid.uuid4().hex[:10]}"


async def test_sync_create_run_list_update_and_delete(client: Client) -> None:
    label = unique_id()

    def scenario() -> str:
        with Sandbox.create(client=client, labels={"suite": label}, ttl=600) as sb:
            assert (
                sb.state == "RUNNING" and sb.name == f"projects/{PROJECT}/sandboxes/{sb.sandbox_id}"
            )
            ex = sb.run(
                "x = 20\nprint('hi')\nx + 1",
                files={"in/a.txt": "text", "b.bin": io.BytesIO(b"\x00\x01")},
            )
            assert (ex.ok, ex.stdout, ex.text, ex.execution_count) == (True, "hi\n", "21", 1)
            ex = sb.run("open('in/a.txt').read() + str(len(open('b.bin', 'rb').read()) + x)")
            assert ex.text == "'text22'"  # files and variables persist
            ex = sb.run("open('made.txt', 'w').write('abc')")
            assert [(f.path, f.content, f.mime_type) for f in ex.files] == [
                ("made.txt", b"abc", "text/plain")
            ]
            listed = list(Sandbox.list(filter=f'labels.suite = "{label}"', client=client))
            assert [s.name for s in listed] == [sb.name]
            sb.update(labels={"suite": label, "more": "1"}, display_name="SDK test")
            assert dict(sb.info.labels) == {"suite": label, "more": "1"}
            again = Sandbox.connect(sb.sandbox_id, client=client)
            assert again.name == sb.name and again.info.display_name == "SDK test"
            assert sb.refresh().info.execution_count == 3
            name = sb.name
        return name

    name = await asyncio.to_thread(scenario)
    with pytest.raises(petri.Deleted) as caught:  # the context manager deleted it
        await asyncio.to_thread(Sandbox.connect, name, client)
    assert caught.value.reason == "SANDBOX_DELETED" and caught.value.at is not None


async def test_async_create_run_list_and_delete(aclient: AsyncClient) -> None:
    label = unique_id()
    async with await AsyncSandbox.create(client=aclient, labels={"suite": label}) as sb:
        ex = await sb.run("y = 2\ny ** 10", files={"n.txt": b"5"})
        assert ex.ok and ex.text == "1024"
        ex = await sb.run("int(open('n.txt').read()) * y")
        assert ex.text == "10"
        names = [s.name async for s in AsyncSandbox.list(f'labels.suite = "{label}"', aclient)]
        assert names == [sb.name]
        await sb.update(ttl=timedelta(minutes=30))
        assert (await sb.refresh()).state == "RUNNING"
    with pytest.raises(petri.Deleted):
        await AsyncSandbox.connect(sb.sandbox_id, client=aclient)


async def test_keep_leaves_the_sandbox_after_the_block(aclient: AsyncClient) -> None:
    async with await AsyncSandbox.create(client=aclient, keep=True) as sb:
        pass
    kept = await AsyncSandbox.connect(sb.name, client=aclient)
    assert kept.state == "RUNNING" and kept.keep  # a connected sandbox is kept too
    await kept.delete()
    with pytest.raises(petri.NotFound):
        await kept.delete()
    await kept.delete(missing_ok=True)


async def test_async_stdout_arrives_while_the_code_still_runs(aclient: AsyncClient) -> None:
    async with await AsyncSandbox.create(client=aclient) as sb:
        first = asyncio.Event()
        lines: list[str] = []

        def on_stdout(text: str) -> None:
            lines.append(text)  # the line may come in pieces: print writes its end apart
            if "".join(lines) == "first\n":
                first.set()

        # The code never ends by itself: its first line can only have come live.
        code = "import time\nprint('first', flush=True)\ntime.sleep(3600)"
        run = asyncio.create_task(sb.run(code, on_stdout=on_stdout))
        await asyncio.wait_for(first.wait(), 60)
        assert not run.done()
        run.cancel()  # cancelling the call interrupts the code
        with pytest.raises(asyncio.CancelledError):
            await run
        assert (await sb.run("'after'", timeout=60)).text == "'after'"


async def test_sync_callbacks_run_live_and_an_exception_in_one_cancels(client: Client) -> None:
    class Seen(Exception):
        pass

    def on_stdout(text: str) -> None:
        raise Seen(text)

    def scenario() -> None:
        with Sandbox.create(client=client) as sb:
            with pytest.raises(Seen, match="first"):
                sb.run(
                    "import time\nprint('first', flush=True)\ntime.sleep(3600)", on_stdout=on_stdout
                )
            outputs: list[petri.Result] = []
            ex = sb.run("display(1)\n2", on_output=outputs.append, timeout=60)
            assert [r.text for r in outputs] == ["1", "2"] and ex.results == outputs

    await asyncio.to_thread(scenario)


async def test_a_figure_is_a_png_and_an_error_has_its_traceback(aclient: AsyncClient) -> None:
    async with await AsyncSandbox.create(client=aclient) as sb:
        ex = await sb.run("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])")
        figures = [r for r in ex.results if r.png is not None]
        assert len(figures) == 1 and figures[0].kind == "display"
        assert figures[0].png is not None and figures[0].png.startswith(b"\x89PNG\r\n\x1a\n")
        assert "image/png" in figures[0].mime_types

        ex = await sb.run("def f():\n    return 1 / 0\nf()")
        assert not ex.ok and ex.error is not None
        assert (ex.error.kind, ex.error.ename, ex.error.evalue) == (
            "exception",
            "ZeroDivisionError",
            "division by zero",
        )
        assert "return 1 / 0" in ex.error.rendered
        assert ex.error.rendered.rstrip().endswith("ZeroDivisionError: division by zero")


async def test_typed_errors_not_found_invalid_argument_already_exists_deleted(
    aclient: AsyncClient,
) -> None:
    with pytest.raises(petri.NotFound) as caught:
        await AsyncSandbox.connect(f"never-{unique_id()}", client=aclient)
    assert type(caught.value) is petri.NotFound and caught.value.reason == "SANDBOX_NOT_FOUND"

    with pytest.raises(petri.InvalidArgument) as invalid:
        await AsyncSandbox.create(sandbox_id="Not_A_Valid_Id", client=aclient)
    assert "sandbox_id" in invalid.value.message

    sandbox_id = unique_id()
    async with await AsyncSandbox.create(sandbox_id=sandbox_id, client=aclient) as sb:
        with pytest.raises(petri.AlreadyExists):
            await AsyncSandbox.create(sandbox_id=sandbox_id, client=aclient)
    with pytest.raises(petri.Deleted) as deleted:
        await sb.run("1")
    assert deleted.value.at is not None
    assert abs(deleted.value.at.timestamp() - time.time()) < 120


async def test_expired(aclient: AsyncClient) -> None:
    sb = await AsyncSandbox.create(ttl=2, client=aclient)
    expire_time = sb.info.expire_time.ToDatetime().timestamp()
    deadline = time.monotonic() + 30
    while True:
        try:
            await sb.refresh()
        except petri.NotFound as exc:
            gone = exc
            break
        assert time.monotonic() < deadline, "the sandbox outlived its ttl by 30 s"
        await asyncio.sleep(0.2)
    assert isinstance(gone, petri.Expired) and gone.reason == "SANDBOX_EXPIRED"
    assert gone.at is not None and abs(gone.at.timestamp() - expire_time) < 30
    with pytest.raises(petri.Expired):
        await sb.run("1")


async def test_terminated(aclient: AsyncClient) -> None:
    async with await AsyncSandbox.create(client=aclient) as sb:
        await asyncio.to_thread(podman, "rm", "-f", f"petri-{sb.info.uid}")
        deadline = time.monotonic() + 30
        while (await sb.refresh()).state != "TERMINATED":
            assert time.monotonic() < deadline, sb.info
            await asyncio.sleep(0.2)
        with pytest.raises(petri.Terminated) as caught:
            await sb.run("1")
        assert caught.value.why == sb.info.state_message and "container" in caught.value.why
        assert isinstance(caught.value, petri.FailedPrecondition)


async def test_quota_exceeded(
    e2e_config: Config, controller: Controller, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = sibling_config(
        e2e_config,
        controller,
        "sdk-quota",
        state_dir=tmp_path_factory.mktemp("sdk-quota"),
        max_sandboxes_per_project=1,
    )
    running = await start_controller(config)
    try:
        async with (
            AsyncClient(addr=f"127.0.0.1:{running.port}", project=PROJECT) as small,
            await AsyncSandbox.create(client=small),
        ):
            with pytest.raises(petri.QuotaExceeded) as caught:
                await AsyncSandbox.create(client=small)
            assert (caught.value.quota, caught.value.limit) == ("max_sandboxes_per_project", 1)
            assert isinstance(caught.value, petri.ResourceExhausted)
    finally:
        await running.stop(grace=1)


async def test_unavailable_when_nothing_listens() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and is closed now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with AsyncClient(addr=f"127.0.0.1:{port}") as nowhere:
        started = time.monotonic()
        with pytest.raises(petri.Unavailable):
            await AsyncSandbox.create(client=nowhere)
        assert time.monotonic() - started >= 1  # retried with backoff before giving up


async def test_a_create_repeated_with_its_request_id_returns_the_same_sandbox(
    aclient: AsyncClient,
) -> None:
    request = create_request(aclient.project, labels={"suite": unique_id()})
    first = await aclient.call(aclient.stub.CreateSandbox, request, timeout=180)
    try:
        second = await aclient.call(aclient.stub.CreateSandbox, request, timeout=180)
        assert (second.name, second.uid) == (first.name, first.uid)
    finally:
        await AsyncSandbox(first, aclient).delete()


async def test_sync_files(client: Client, tmp_path: Path) -> None:
    local = tmp_path / "local.bin"
    local.write_bytes(b"\x00\x01" * 1000)

    def scenario() -> None:
        with Sandbox.create(client=client) as sb:
            progress: list[int] = []
            info = sb.files.write("data/local.bin", local, on_progress=progress.append)
            assert (info.path, info.type, info.size) == ("data/local.bin", "file", 2000)
            assert progress == [2000]
            sb.files.write("notes.txt", "héllo")
            assert sb.files.read("notes.txt") == "héllo".encode()
            assert sb.run("len(open('data/local.bin', 'rb').read())").text == "2000"
            listed = {f.path: f.type for f in sb.files.list(recursive=True)}
            assert listed == {"data": "directory", "data/local.bin": "file", "notes.txt": "file"}
            assert [f.path for f in sb.files.list("data")] == ["data/local.bin"]
            back = tmp_path / "back.bin"
            assert sb.files.download("data/local.bin", back).size == 2000
            assert back.read_bytes() == local.read_bytes()
            sb.files.remove("data", recursive=True)
            with pytest.raises(petri.NotFound):
                sb.files.read("data/local.bin")
            sb.files.remove("data", missing_ok=True)
            with pytest.raises(petri.InvalidArgument):
                sb.files.read("../etc/passwd")

    await asyncio.to_thread(scenario)


async def test_async_files(aclient: AsyncClient, tmp_path: Path) -> None:
    async with await AsyncSandbox.create(client=aclient) as sb:
        info = await sb.files.write("a.txt", io.BytesIO(b"abc"))
        assert info.size == 3 and info.modify_time is not None
        assert await sb.files.read("a.txt") == b"abc"
        assert [f.path for f in await sb.files.list()] == ["a.txt"]
        sink = io.BytesIO()
        assert (await sb.files.download("a.txt", sink)).size == 3 and sink.getvalue() == b"abc"
        await sb.files.remove("a.txt")
        with pytest.raises(petri.NotFound):
            await sb.files.remove("a.txt")
        assert await sb.files.list() == []


# A client in a process of its own, that measures its own peak memory around a 100 MiB transfer:
# VmHWM, reset to the current RSS after the warm-up (clear_refs 5). Not ru_maxrss: a child's
# starts at its parent's RSS (this test process, which holds the controller), hiding growth.
_MEASURE = """
import json, sys
from pathlib import Path
import petri

mode, addr, path = sys.argv[1:]
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)

with petri.Client(addr=addr, project="e2e") as client, petri.Sandbox.create(client=client) as sb:
    sb.run("1", files={"warm.bin": b"x" * 1024})  # the channel and its threads, warmed up
    if mode == "files":
        sb.files.write("warm2.bin", b"x" * 1024)
        sb.files.download("warm2.bin", path + ".warm")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    if mode == "run":
        code = "import os\\nos.path.getsize('big.bin')"
        check = sb.run(code, files={"big.bin": Path(path)}, timeout=300).text
    else:
        sb.files.write("big.bin", Path(path))
        sb.files.download("big.bin", path + ".back")
        check = str(Path(path + ".back").stat().st_size)
    after = status("VmHWM")
print(json.dumps({"before": before, "after": after, "check": check}))
"""


async def measure(mode: str, controller: Controller, big: Path) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _MEASURE,
        mode,
        f"127.0.0.1:{controller.port}",
        str(big),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, err.decode()[-3000:]
    measured: dict[str, object] = json.loads(out.decode().splitlines()[-1])
    print(f"100 MiB {mode}: peak RSS {measured['before']} -> {measured['after']} bytes")
    return measured


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        for i in range(100):
            out.write(bytes([i]) * MIB)
    return big


@pytest.mark.parametrize("mode", ["run", "files"])
async def test_100_mib_from_a_path_keeps_client_memory_flat(
    controller: Controller, big_file: Path, mode: str
) -> None:
    measured = await measure(mode, controller, big_file)
    assert measured["check"] == str(100 * MIB)
    growth = int(str(measured["after"])) - int(str(measured["before"]))
    assert growth < 40 * MIB, f"peak RSS grew by {growth / MIB:.1f} MiB for a 100 MiB file"


async def test_grpcurl_shows_the_error_info(controller: Controller) -> None:
    """The details are google.rpc's, on the wire: a generic client finds them."""
    name = f"projects/{PROJECT}/sandboxes/never-{unique_id()}"
    process = await asyncio.create_subprocess_exec(
        "grpcurl",
        "-plaintext",
        "-d",
        json.dumps({"name": name}),
        f"127.0.0.1:{controller.port}",
        "petri.v1.SandboxService/GetSandbox",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    text = out.decode()
    assert process.returncode != 0, text
    assert "Code: NotFound" in text, text
    assert "type.googleapis.com/google.rpc.ErrorInfo" in text, text
    detail = json.loads(text[text.index("{") : text.rindex("}") + 1])
    if "@value" in detail:
        # The server's reflection knows no google.rpc.ErrorInfo (it reflects petri.v1's
        # wire-identical copy): grpcurl shows the raw message, which decodes as one.
        info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["@value"]))
        assert (info.reason, info.domain) == ("SANDBOX_NOT_FOUND", "petri")
    else:
        # It does when googleapis-common-protos is loaded in the server (the [otel] extra
        # brings it): grpcurl then decodes the fields itself.
        assert (detail["reason"], detail["domain"]) == ("SANDBOX_NOT_FOUND", "petri"), text
