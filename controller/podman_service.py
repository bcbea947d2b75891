"""Starts the rootless `podman system service` the controller talks to, and keeps it alive.

The service dies with the controller (a parent-death signal set with util-linux `setpriv`),
so a controller killed with SIGKILL leaves no orphaned service behind.

Seen on our hosts: the service's socket file can vanish while its process keeps running (after
other podman commands of the same user). The watchdog notices a dead process or a missing
socket and starts a fresh service; sandboxes are unaffected (conmon keeps them running).
"""

import asyncio
import contextlib
import os
import shutil
from pathlib import Path

import structlog

from controller.errors import Unavailable

log = structlog.get_logger()

START_TIMEOUT = 15.0  # seconds for a new service to create its socket
WATCH_INTERVAL = 1.0
STOP_GRACE = 5.0
_SETPRIV = shutil.which("setpriv")
_DIE_WITH_PARENT = (_SETPRIV, "--pdeathsig", "TERM", "--") if _SETPRIV else ()


class PodmanService:
    def __init__(
        self,
        binary: str,
        socket_path: Path,
        log_path: Path,
        oci_runtime: Path | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._binary = binary
        # podman 4.3's API ignores a per-container runtime: a service whose every container
        # runs under another runtime (gVisor) is started with --runtime instead.
        self._global_args = ("--runtime", str(oci_runtime)) if oci_runtime else ()
        self._log_path = log_path
        self._process: asyncio.subprocess.Process | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.restarts = 0

    def __repr__(self) -> str:
        pid = self._process.pid if self._process else None
        return f"<PodmanService socket={self.socket_path} pid={pid} restarts={self.restarts}>"

    async def start(self) -> None:
        await self._spawn()
        self._watchdog = asyncio.create_task(self._watch(), name="podman-service-watchdog")

    async def _spawn(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with open(self._log_path, "ab") as log_file:  # noqa: ASYNC230 - a local append open
            try:
                self._process = await asyncio.create_subprocess_exec(
                    *_DIE_WITH_PARENT,
                    self._binary,
                    *self._global_args,
                    "system",
                    "service",
                    "--time=0",
                    f"unix://{self.socket_path}",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                )
            except FileNotFoundError as exc:
                raise Unavailable(
                    f"cannot start the podman API service: {self._binary!r} not found; "
                    "install podman or pass --podman-socket"
                ) from exc
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        while not self.socket_path.exists():
            if self._process.returncode is not None:
                raise Unavailable(
                    f"podman system service exited with status {self._process.returncode}; "
                    f"see {self._log_path}"
                )
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"podman system service did not create {self.socket_path}")
            await asyncio.sleep(0.05)
        log.info("podman service started", pid=self._process.pid, socket=str(self.socket_path))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            process = self._process
            dead = process is None or process.returncode is not None
            if dead or not self.socket_path.exists():
                log.warning(
                    "podman service lost, restarting",
                    process_exited=dead,
                    socket_exists=self.socket_path.exists(),
                )
                await self._terminate()
                try:
                    await self._spawn()
                    self.restarts += 1
                except Unavailable as exc:
                    log.error("podman service restart failed", error=str(exc))

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self._terminate()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
