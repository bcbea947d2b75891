"""`petri exec` and its local side: a stdout whose reader goes away, a bad --save-outputs."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

import pytest

from controller.app import Controller
from petri.v1 import sandbox_pb2
from tests.e2e.client_processes import PROCESS_TIMEOUT, client_env
from tests.e2e.client_processes import petri as petri_cli

pytestmark = pytest.mark.e2e


async def test_exec_into_a_closed_pipe_cancels_the_code_and_exits_quietly(
    controller: Controller, sandbox: sandbox_pb2.Sandbox
) -> None:
    name = sandbox.name.rsplit("/", 1)[-1]
    code = "import itertools\nfor i in itertools.count():\n    print(i, flush=True)"
    petri = shlex.join([sys.executable, "-m", "petri.cli", "exec", name, code])
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        f"{petri} | head -n 1; echo ${{PIPESTATUS[0]}} >&2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client_env(controller),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), PROCESS_TIMEOUT)
    assert stdout == b"0\n"
    assert stderr == b"141\n"  # SIGPIPE's status, and not a word on stderr
    # The endless loop was cancelled: the sandbox runs the next code (else it would queue).
    after = await petri_cli(controller, "exec", name, "'after'")
    assert (after.code, after.out) == (0, "'after'\n"), after.err


async def test_a_bad_save_outputs_directory_fails_before_the_code_runs(
    controller: Controller, sandbox: sandbox_pb2.Sandbox, tmp_path: Path
) -> None:
    name = sandbox.name.rsplit("/", 1)[-1]
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    code = "open('ran', 'w').close()\ndisplay(1)"
    done = await petri_cli(controller, "exec", name, code, "--save-outputs", str(not_a_dir))
    assert done.code == 11 and "file" in done.err
    ran = await petri_cli(controller, "exec", name, "import os\nos.path.exists('ran')")
    assert (ran.code, ran.out) == (0, "False\n"), ran.err
