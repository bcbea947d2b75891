"""`petri exec ... | head`: the reader goes away; the CLI stops the code and exits quietly."""

from __future__ import annotations

import asyncio
import shlex
import sys

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
