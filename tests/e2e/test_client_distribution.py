"""The client distribution (client/, petri-client) on its own: installed from the source tree
into a fresh venv, it type-checks the examples under mypy --strict, runs the quickstart against
the service, and loads none of the service's dependencies."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

import pytest

from controller.app import Controller
from tests.e2e.helpers import PROJECT

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
_BUILD_LEFTOVERS = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")

# A user's code, typed against the SDK: mypy --strict must accept it as it is.
TYPED_SNIPPET = """
import asyncio
from datetime import timedelta

import petri
from petri import AsyncSandbox, Execution, Sandbox


def sync_use(client: petri.Client) -> str | None:
    with Sandbox.create(ttl=timedelta(minutes=5), client=client) as sb:
        ex: Execution = sb.run("1 + 1", files={"a.txt": b"x"}, on_stdout=print)
        png: bytes | None = ex.results[0].png if ex.results else None
        infos: list[petri.FileInfo] = sb.files.list(recursive=True)
        del png, infos
        return ex.text


async def async_use() -> int:
    try:
        async with await AsyncSandbox.create() as sb:
            ex = await sb.run("print('hi')")
            return len(ex.stdout)
    except petri.QuotaExceeded as exc:
        return exc.limit or 0
    except petri.NotFound as exc:
        return len(exc.reason)


print(asyncio.run(async_use()))
"""

# Neither the service's dependencies nor the extras' (the SDK needs grpcio and protobuf only).
SERVICE_ONLY = ("podman", "structlog", "apscheduler", "controller", "executor", "rich", "mcp")


async def run(
    *args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 300, ok: bool = True
) -> str:
    process = await asyncio.create_subprocess_exec(
        *map(str, args),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout)
    text = out.decode(errors="replace")
    assert (process.returncode == 0) is ok, f"{args}: {text[-4000:]}"
    return text


async def test_the_client_installs_alone_type_checks_and_runs_the_quickstart(
    controller: Controller, tmp_path: Path
) -> None:
    # The repository is not on the path: only what the venv installed counts.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    await run(sys.executable, "-m", "venv", venv, cwd=tmp_path, env=env)
    python = venv / "bin" / "python"
    # From a copy: pip builds in the source tree (build/, *.egg-info), which is not the test's
    # to leave things in.
    source = shutil.copytree(ROOT / "client", tmp_path / "client", ignore=_BUILD_LEFTOVERS)
    await run(
        # With its extras: examples/mcp_agent_loop.py imports the mcp package.
        python,
        "-m",
        "pip",
        "install",
        "--quiet",
        f"{source}[cli,mcp]",
        "mypy",
        cwd=tmp_path,
        env=env,
    )

    snippet = tmp_path / "snippet.py"
    snippet.write_text(TYPED_SNIPPET)
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert examples
    await run(
        python,
        "-m",
        "mypy",
        "--strict",
        "--no-incremental",
        snippet,
        *examples,
        cwd=tmp_path,
        env=env,
    )

    # The types are real ones, not Any: a wrong use is an error.
    wrong = tmp_path / "wrong.py"
    wrong.write_text("import petri\n\ncount: int = petri.Sandbox.create().run('1').text\n")
    said = await run(python, "-m", "mypy", "--strict", wrong, cwd=tmp_path, env=env, ok=False)
    assert 'expression has type "str | None", variable has type "int"' in said, said

    imported = await run(
        python,
        "-c",
        "import sys, petri; petri.Sandbox, petri.AsyncSandbox, petri.errors.Expired; "
        "print(petri.__file__); print(sorted({m.split('.')[0] for m in sys.modules}))",
        cwd=tmp_path,
        env=env,
    )
    where, modules = imported.splitlines()[-2:]
    assert where.startswith(str(venv)), where  # the installed copy, not the source tree
    assert not set(SERVICE_ONLY) & set(eval(modules)), modules

    out = await run(
        python,
        ROOT / "examples" / "quickstart.py",
        cwd=tmp_path,
        env={**env, "PETRI_ADDR": f"127.0.0.1:{controller.port}", "PETRI_PROJECT": PROJECT},
    )
    lines = out.splitlines()
    assert lines[0].startswith("value: 42 | figure: ") and lines[0].endswith(" PNG bytes"), out
    assert int(lines[0].split()[4]) > 1000, out
    assert lines[1] == "file: out.txt hello", out
