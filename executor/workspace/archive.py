"""The whole workspace as a tar archive, streamed out and back in, for checkpoints.

GNU tar does the work (pax format: any name, any depth, modes, mtimes, empty directories,
symlinks as symlinks, hard links), always as user code's uid: it reads the workspace with
exactly user code's rights, and an archive that was tampered with can write only what user
code could write itself (tar also refuses `..` members, strips leading slashes and does not
write through a symlink it extracted).
"""

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from executor.workspace.inputs import WorkspaceFull
from petri.protocol import CHECKPOINT_CHUNK_BYTES

__all__ = ["ArchiveFailed", "Extraction", "InvalidArchive", "archive", "remove"]

log = logging.getLogger("petri.executor")

# What is kept of tar's complaints (it writes one line per file it cannot handle).
MAX_TAR_MESSAGE_CHARS = 1000
_STDERR_KEPT_BYTES = 16 * 1024
_TAR_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}  # names as bytes; messages in English
# GNU tar's exit status when some files changed while they were read (1) or it failed (2).
_TAR_FILES_DIFFER = 1


class ArchiveFailed(Exception):
    """The workspace cannot be archived whole (tar's message says which file)."""


class InvalidArchive(Exception):
    """The archive cannot be extracted (tar's message says why)."""


def _tar() -> str:
    return shutil.which("tar", path=_TAR_ENV["PATH"]) or "tar"


def _as_user(user: int | None) -> dict[str, Any]:
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


async def _start_tar(args: list[str], user: int | None, **pipes: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        _tar(),
        *args,
        cwd="/",
        env=_TAR_ENV,
        stderr=asyncio.subprocess.PIPE,
        limit=CHECKPOINT_CHUNK_BYTES,
        **pipes,
        **_as_user(user),
    )


async def _read_stderr(process: asyncio.subprocess.Process) -> bytes:
    """tar's complaints, the first few KiB of them (the rest is read and dropped)."""
    assert process.stderr is not None
    kept = bytearray()
    while data := await process.stderr.read(65536):
        kept += data[: max(_STDERR_KEPT_BYTES - len(kept), 0)]
    return bytes(kept)


def _message(stderr: bytes) -> str:
    """tar's bounded words, without its closing line."""
    lines = [
        line
        for line in stderr.decode(errors="backslashreplace").splitlines()
        if line and "Exiting with failure status" not in line
    ]
    text = "; ".join(lines) or "no message"
    if len(text) > MAX_TAR_MESSAGE_CHARS:
        text = text[:MAX_TAR_MESSAGE_CHARS] + "..."
    return text


def _status(returncode: int) -> str:
    if returncode < 0:
        return f"tar was killed by signal {-returncode}"
    return f"tar exited with status {returncode}"


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


async def archive(
    workspace: Path, user: int | None, send: Callable[[bytes], Awaitable[None]]
) -> int:
    """Streams an archive of everything under `workspace` to `send`, in chunks of at most
    CHECKPOINT_CHUNK_BYTES; the bytes sent. ArchiveFailed when tar could not read some file
    (or could not run): the archive sent is then incomplete and must be dropped."""
    args = ["--create", "--format=posix", "--numeric-owner", "--file=-", "-C", str(workspace), "."]
    try:
        process = await _start_tar(args, user, stdin=asyncio.subprocess.DEVNULL, stdout=-1)
    except OSError as exc:
        raise ArchiveFailed(f"cannot run tar to archive the workspace: {exc}") from exc
    assert process.stdout is not None
    stderr = asyncio.create_task(_read_stderr(process))
    sent = 0
    try:
        while True:
            chunk = await process.stdout.read(CHECKPOINT_CHUNK_BYTES)
            if not chunk:
                break
            # Whole chunks (a pipe gives at most 64 KiB at a time): fewer, fuller messages.
            while len(chunk) < CHECKPOINT_CHUNK_BYTES:
                more = await process.stdout.read(CHECKPOINT_CHUNK_BYTES - len(chunk))
                if not more:
                    break
                chunk += more
            await send(chunk)
            sent += len(chunk)
        status = await process.wait()
        said = await stderr
    except BaseException:
        await _kill(process)
        stderr.cancel()
        raise
    if status == _TAR_FILES_DIFFER:  # the archive holds the file as it was at some moment
        log.warning("files changed while the workspace was archived: %s", _message(said))
    elif status != 0:
        raise ArchiveFailed(
            f"the workspace cannot be archived whole: {_message(said)} ({_status(status)})"
        )
    return sent


class Extraction:
    """An archive extracted into the workspace as its chunks arrive (tar reads them from its
    stdin): `write` each chunk, then `finish`; or `abort`."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self._stderr = asyncio.create_task(_read_stderr(process))
        self._stopped_reading = False

    @classmethod
    async def start(cls, workspace: Path, user: int | None) -> "Extraction":
        args = [
            "--extract",
            "--file=-",
            "-C",
            str(workspace),
            "--preserve-permissions",
            "--no-same-owner",
        ]
        try:
            process = await _start_tar(args, user, stdin=-1, stdout=asyncio.subprocess.DEVNULL)
        except OSError as exc:
            raise InvalidArchive(f"cannot run tar to extract the workspace: {exc}") from exc
        return cls(process)

    async def write(self, chunk: bytes) -> None:
        """Gives tar the next chunk; once tar has stopped reading (it failed), does nothing:
        `finish` says why."""
        stdin = self._process.stdin
        assert stdin is not None
        if self._stopped_reading:
            return
        try:
            stdin.write(chunk)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._stopped_reading = True

    async def finish(self) -> None:
        """Waits for tar to extract the rest. InvalidArchive when it failed; WorkspaceFull
        when the workspace had no room."""
        stdin = self._process.stdin
        assert stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.close()
            await stdin.wait_closed()
        status = await self._process.wait()
        said = await self._stderr
        if status == 0:
            return
        message = _message(said)
        if "No space left on device" in message or "Disk quota exceeded" in message:
            raise WorkspaceFull(f"the workspace is full: {message}")
        raise InvalidArchive(f"the workspace archive cannot be extracted: {message}")

    async def abort(self) -> None:
        await _kill(self._process)
        self._stderr.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr


async def remove(workspace: Path, names: list[str], user: int | None) -> None:
    """Removes these entries of the workspace (trees, as deep as they are), as user code's
    uid: what an abandoned extraction wrote, with the rights it was written with."""
    rm = shutil.which("rm", path=_TAR_ENV["PATH"]) or "rm"
    process = await asyncio.create_subprocess_exec(
        rm,
        "-rf",
        "--",
        *(str(workspace / name) for name in names),
        cwd="/",
        env=_TAR_ENV,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        **_as_user(user),
    )
    _, said = await process.communicate()
    if process.returncode:
        log.warning("an abandoned restore left files: %s", _message(said[:_STDERR_KEPT_BYTES]))
