"""Running the client programs (the `petri` CLI, `petri mcp`, the examples) as subprocesses
against the session's in-process controller. They are started with asyncio's subprocesses:
the controller runs in pytest's event loop, which must keep turning while they run."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

from controller.app import Controller
from tests.e2e.helpers import PROJECT

# Generous: a cold sandbox start on a loaded host takes seconds, the whole call minutes at worst.
PROCESS_TIMEOUT = 300.0


def client_env(controller: Controller, **extra: str) -> dict[str, str]:
    """The environment of a client process: PETRI_* pointing at the test controller, and the
    checkout's packages first on the path (as the tests' own imports)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PETRI_")}
    env.update(
        PETRI_ADDR=f"127.0.0.1:{controller.port}",
        PETRI_PROJECT=PROJECT,
        PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class Done:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode()

    @property
    def err(self) -> str:
        return self.stderr.decode()


async def start_petri(
    controller: Controller, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "petri.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or client_env(controller),
    )


async def finish(process: asyncio.subprocess.Process, stdin: bytes | None = None) -> Done:
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(stdin), PROCESS_TIMEOUT)
    except TimeoutError:
        process.kill()
        raise
    assert process.returncode is not None
    return Done(process.returncode, stdout, stderr)


async def petri(
    controller: Controller, *args: str, stdin: bytes | None = None, cwd: str | None = None
) -> Done:
    """Runs `petri ARGS...` to its end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "petri.cli",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client_env(controller),
        cwd=cwd,
    )
    return await finish(process, stdin if stdin is not None else b"")


async def python(controller: Controller, *args: str) -> Done:
    """Runs `python ARGS...` (a script) with the client environment, to its end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client_env(controller),
    )
    return await finish(process)
