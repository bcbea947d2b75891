"""The `petri` command line, run as a subprocess against the real controller and sandboxes."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from controller.app import Controller
from petri.v1 import sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.client_processes import PROCESS_TIMEOUT, finish, petri, start_petri
from tests.e2e.helpers import PARENT, podman

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
MiB = 1 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def box_id(sandbox: sandbox_pb2.Sandbox) -> str:
    return sandbox.name.rsplit("/", 1)[-1]


def assert_one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("petri: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


async def test_create_get_ls_rm(controller: Controller, stub: Stub) -> None:
    sandbox_id = f"cli-{uuid.uuid4().hex[:8]}"
    tag = uuid.uuid4().hex[:8]
    try:
        done = await petri(
            controller, "create", "--id", sandbox_id, "-l", f"cli={tag}", "--ttl", "10m", "--json"
        )
        assert done.code == 0, done.err
        created = json.loads(done.out)
        assert created["name"] == f"{PARENT}/sandboxes/{sandbox_id}"
        assert created["state"] == "RUNNING" and created["labels"] == {"cli": tag}

        done = await petri(controller, "get", sandbox_id, "--json")
        assert done.code == 0 and json.loads(done.out)["uid"] == created["uid"]
        # A full name works as well as the bare id.
        done = await petri(controller, "get", created["name"])
        assert done.code == 0 and sandbox_id in done.out and "RUNNING" in done.out

        done = await petri(controller, "ls", "--filter", f"labels.cli = {tag}", "--json")
        listed = json.loads(done.out)
        assert [s["name"] for s in listed["sandboxes"]] == [created["name"]]
        assert listed["truncated"] is False
        done = await petri(controller, "ls", "-f", f"labels.cli = {tag}")
        assert done.code == 0 and sandbox_id in done.out and f"cli={tag}" in done.out

        done = await petri(controller, "rm", sandbox_id, "--json")
        assert done.code == 0 and json.loads(done.out) == {"deleted": [sandbox_id]}
        done = await petri(controller, "get", sandbox_id)
        assert done.code == 3, done.err
        assert_one_error_line(done.err)
        done = await petri(controller, "rm", sandbox_id)
        assert done.code == 3
        done = await petri(controller, "rm", sandbox_id, "--missing-ok")
        assert done.code == 0, done.err
    finally:
        await stub.DeleteSandbox(
            sandbox_pb2.DeleteSandboxRequest(
                name=f"{PARENT}/sandboxes/{sandbox_id}", allow_missing=True
            )
        )


async def test_errors_are_one_line_with_a_code_per_class(controller: Controller) -> None:
    done = await petri(controller, "get", "no-such-box")
    line = assert_one_error_line(done.err)
    assert done.code == 3 and "NOT_FOUND" in line
    done = await petri(controller, "create", "--id", "Not_Valid")
    assert done.code == 5 and "INVALID_ARGUMENT" in assert_one_error_line(done.err)
    done = await petri(controller, "create", "--ttl", "soon")
    assert done.code == 2 and "not a duration" in assert_one_error_line(done.err)
    done = await petri(controller, "exec", "no-such-box")
    assert done.code == 2 and "no code" in assert_one_error_line(done.err)


async def test_ls_limit_says_there_are_more(
    controller: Controller, create_sandbox: CreateSandbox
) -> None:
    tag = uuid.uuid4().hex[:8]
    for _ in range(2):
        await create_sandbox(labels={"many": tag})
    done = await petri(controller, "ls", "-f", f"labels.many = {tag}", "--limit", "1", "--json")
    listed = json.loads(done.out)
    assert len(listed["sandboxes"]) == 1 and listed["truncated"] is True
    done = await petri(controller, "ls", "-f", f"labels.many = {tag}", "--all", "--json")
    assert len(json.loads(done.out)["sandboxes"]) == 2


async def test_exec_streams_output_while_the_code_runs(
    controller: Controller, sandbox: sandbox_pb2.Sandbox
) -> None:
    code = (
        "import os, sys, time\n"
        "print('first', flush=True)\n"
        "print('to stderr', file=sys.stderr, flush=True)\n"
        "while not os.path.exists('release'):\n"
        "    time.sleep(0.02)\n"
        "print('second')\n"
    )
    process = await start_petri(controller, "exec", box_id(sandbox), code)
    assert process.stdout is not None and process.stderr is not None
    try:
        # Both lines arrive while the code still waits for the release file.
        first = await asyncio.wait_for(process.stdout.readline(), PROCESS_TIMEOUT)
        assert first == b"first\n"
        err = await asyncio.wait_for(process.stderr.readline(), PROCESS_TIMEOUT)
        assert err == b"to stderr\n"
        assert process.returncode is None
        await asyncio.to_thread(
            podman, "exec", f"petri-{sandbox.uid}", "touch", "/workspace/release"
        )
        done = await finish(process)
    finally:
        if process.returncode is None:
            process.kill()
    assert done.code == 0, done.err
    assert done.out == "second\n"


async def test_exec_exit_codes(controller: Controller, sandbox: sandbox_pb2.Sandbox) -> None:
    name = box_id(sandbox)
    done = await petri(controller, "exec", name, "x = 20\nx * 2 + 2")
    assert (done.code, done.out) == (0, "42\n"), done.err

    done = await petri(controller, "exec", name, "def f():\n    return 1 / 0\nf()")
    assert done.code == 1
    assert "ZeroDivisionError" in done.err and "return 1 / 0" in done.err
    assert done.err.strip().splitlines()[-1] == "petri: the code raised ZeroDivisionError (exit 1)"

    done = await petri(controller, "exec", name, "--timeout", "1s", "import time\ntime.sleep(60)")
    assert done.code == 124, done.err
    assert "the code timed out (exit 124)" in done.err

    # The variables survived the failures.
    done = await petri(controller, "exec", name, "x")
    assert (done.code, done.out) == (0, "20\n")


async def test_exec_code_from_stdin_and_file(
    controller: Controller, sandbox: sandbox_pb2.Sandbox, tmp_path: Path
) -> None:
    name = box_id(sandbox)
    done = await petri(controller, "exec", name, "-", stdin=b"y = 41\nprint('from stdin')\ny + 1")
    assert (done.code, done.out) == (0, "from stdin\n42\n"), done.err
    script = tmp_path / "script.py"
    script.write_text("y * 2\n")
    done = await petri(controller, "exec", name, "-f", str(script))
    assert (done.code, done.out) == (0, "82\n"), done.err
    done = await petri(controller, "exec", name, "-f", "-", stdin=b"y - 1")
    assert (done.code, done.out) == (0, "40\n"), done.err


async def test_exec_json(controller: Controller, sandbox: sandbox_pb2.Sandbox) -> None:
    done = await petri(
        controller,
        "exec",
        box_id(sandbox),
        "--json",
        "print('hi')\nopen('o.txt', 'w').write('x')\n1/0",
    )
    assert done.code == 1
    document = json.loads(done.out)
    assert document["stdout"] == "hi\n" and document["exit_code"] == 1
    assert document["error"]["kind"] == "exception"
    assert document["error"]["ename"] == "ZeroDivisionError"
    assert [f["path"] for f in document["files"]] == ["o.txt"]
    done = await petri(controller, "exec", box_id(sandbox), "--json", "{'a': 1}")
    document = json.loads(done.out)
    assert document["error"] is None and document["exit_code"] == 0
    assert document["results"] == [{"kind": "result", "data": {"text/plain": "{'a': 1}"}}]


async def test_exec_rich_outputs_summarized_and_saved(
    controller: Controller, sandbox: sandbox_pb2.Sandbox, tmp_path: Path
) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 3, 2])\n"
        "_ = open('report.txt', 'w').write('done')\n"
    )
    saved = tmp_path / "outputs"
    done = await petri(controller, "exec", box_id(sandbox), code, "--save-outputs", str(saved))
    assert done.code == 0, done.err
    assert done.out.startswith("[image/png ") and "KB]" in done.out
    assert (saved / "output-1.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (saved / "report.txt").read_text() == "done"
    assert "report.txt" in done.err


async def test_cp_in_and_out_byte_exact(
    controller: Controller, sandbox: sandbox_pb2.Sandbox, tmp_path: Path
) -> None:
    name = box_id(sandbox)
    data = os.urandom(3 * MiB + 12345)
    local = tmp_path / "data.bin"
    local.write_bytes(data)
    done = await petri(controller, "cp", str(local), f"{name}:in/data.bin", "--json")
    assert done.code == 0, done.err
    assert json.loads(done.out)["size"] == len(data)
    done = await petri(
        controller,
        "exec",
        name,
        "import hashlib\nhashlib.sha256(open('in/data.bin','rb').read()).hexdigest()",
    )
    import hashlib

    assert done.out.strip() == repr(hashlib.sha256(data).hexdigest())

    back = tmp_path / "back"
    back.mkdir()
    done = await petri(controller, "cp", f"{name}:in/data.bin", str(back))
    assert done.code == 0, done.err
    assert (back / "data.bin").read_bytes() == data
    assert not [p for p in back.iterdir() if p.name != "data.bin"]  # no partial file left

    # A directory destination takes the source's name; stdin in, stdout out.
    done = await petri(controller, "cp", "-", f"{sandbox.name}:notes.txt", stdin=b"hello\n")
    assert done.code == 0, done.err
    done = await petri(controller, "cp", f"{name}:notes.txt", "-")
    assert (done.code, done.stdout) == (0, b"hello\n")

    done = await petri(controller, "cp", f"{name}:missing.bin", str(tmp_path / "x"))
    assert done.code == 3 and "NOT_FOUND" in assert_one_error_line(done.err)
    assert not (tmp_path / "x").exists()
    done = await petri(controller, "cp", str(tmp_path / "absent"), f"{name}:a")
    assert done.code == 11 and "absent" in assert_one_error_line(done.err)


async def test_pause_resume_and_profiles(
    controller: Controller, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = box_id(sandbox)
    done = await petri(controller, "pause", name)
    assert (done.code, done.out) == (0, f"{name}: PAUSED\n"), done.err
    done = await petri(controller, "resume", name, "--json")
    assert done.code == 0 and json.loads(done.out)["state"] == "RUNNING"
    done = await petri(controller, "profiles", "--json")
    assert done.code == 0, done.err
    names = [p["name"] for p in json.loads(done.out)["image_profiles"]]
    assert "imageProfiles/test" in names
