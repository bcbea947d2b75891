"""The rootless `podman system service` the controller talks to, and the watch that keeps it
able to start containers.

PodmanService starts the service with a stable working directory (`/`): conmon, which the
service starts for every container, fails every start ("[conmon:e] Failed to get working
directory") once that directory is deleted, e.g. a source tree that a script re-staged. The
service dies with the controller (a parent-death signal set with util-linux `setpriv`), so a
controller killed with SIGKILL leaves no orphaned service behind.

PodmanHealth answers whether containers can be started through one service, for the health
service: every second it looks at the service's process, socket and working directory and
pings its API; after any sign of trouble (one of those, or a podman call that failed) it
proves the answer with a probe container. A service of the controller's own is restarted until
the probe passes; sandboxes are unaffected (conmon keeps them running). Seen on our hosts: the
socket file can vanish while its process keeps running (after other podman commands of the
same user).
"""

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from controller.errors import FailedPrecondition, PetriError, Unavailable

log = structlog.get_logger()

START_TIMEOUT = 15.0  # seconds for a new service to create its socket
STOP_GRACE = 5.0
# The service's working directory: one that no script re-stages or deletes.
WORKING_DIRECTORY = "/"
_SETPRIV = shutil.which("setpriv")
_DIE_WITH_PARENT = (_SETPRIV, "--pdeathsig", "TERM", "--") if _SETPRIV else ()

# PodmanHealth: how often it looks, how long a ping and a probe container may take, and the
# pauses between restarts of a service that stays broken (doubling up to the longest).
WATCH_INTERVAL = 1.0
PING_TIMEOUT = 5.0
PROBE_TIMEOUT = 30.0
RESTART_PAUSE_FIRST = 1.0
RESTART_PAUSE_LONGEST = 30.0
# How much of the end of the service's log is searched for the error that explains a failure.
LOG_TAIL_BYTES = 16384


class PodmanService:
    def __init__(
        self,
        binary: str,
        socket_path: Path,
        log_path: Path,
        oci_runtime: Path | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.log_path = log_path
        self._binary = binary
        # podman 4.3's API ignores a per-container runtime: a service whose every container
        # runs under another runtime (gVisor) is started with --runtime instead.
        self._global_args = ("--runtime", str(oci_runtime)) if oci_runtime else ()
        self._process: asyncio.subprocess.Process | None = None
        self.restarts = 0

    def __repr__(self) -> str:
        pid = self._process.pid if self._process else None
        return f"<PodmanService socket={self.socket_path} pid={pid} restarts={self.restarts}>"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        self.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with open(self.log_path, "ab") as log_file:  # noqa: ASYNC230 - a local append open
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
                    cwd=WORKING_DIRECTORY,
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
                    f"see {self.log_path}"
                )
            if asyncio.get_running_loop().time() > deadline:
                raise Unavailable(f"podman system service did not create {self.socket_path}")
            await asyncio.sleep(0.05)
        log.info("podman service started", pid=self._process.pid, socket=str(self.socket_path))

    def problem(self) -> str | None:
        """What is wrong with the service that a look from outside can tell, or None."""
        process = self._process
        if process is None or process.returncode is not None:
            status = process.returncode if process else None
            return f"the podman service exited (status {status})"
        if not self.socket_path.exists():
            return f"the podman service's socket {self.socket_path} vanished"
        try:
            cwd = os.readlink(f"/proc/{process.pid}/cwd")
        except OSError:
            return None  # it is exiting; the next look says so
        if cwd.endswith(" (deleted)"):
            return "the podman service's working directory was deleted"
        return None

    async def restart(self, reason: str) -> None:
        """Stops the service and starts a new one; raises Unavailable if that fails."""
        log.warning("restarting the podman service", reason=reason, socket=str(self.socket_path))
        await self._terminate()
        await self.start()
        self.restarts += 1

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)  # a stopped (hung) service sees TERM once woken
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def stop(self) -> None:
        await self._terminate()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)


async def ping(socket_path: Path) -> None:
    """Returns when podman's API answers /_ping on socket_path with 200; raises OSError, or
    TimeoutError after PING_TIMEOUT."""
    async with asyncio.timeout(PING_TIMEOUT):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(b"GET /_ping HTTP/1.1\r\nHost: podman\r\nConnection: close\r\n\r\n")
            status = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    if status.split(b" ")[1:2] != [b"200"]:
        raise OSError(f"it answered {status[:80]!r}")


def last_error(log_path: Path) -> str:
    """The service log's last error line (conmon's included), for the log; empty if none."""
    try:
        with open(log_path, "rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
            lines = file.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if "level=error" in line or ":e]" in line:
            return line.strip()[:500]
    return ""


class PodmanHealth:
    """Whether containers can be started through one podman service (`healthy`), told to
    `on_change` at every flip, with the reason logged; heals a service of the controller's own.

    `probe` starts and removes one container (PodmanRuntime.probe). `suspect` is for a podman
    call that failed: the next look, at once, proves the service with a probe."""

    def __init__(
        self,
        name: str,
        socket_path: Path,
        service: PodmanService | None,
        probe: Callable[[], Awaitable[None]],
        on_change: Callable[[], Awaitable[None]],
    ) -> None:
        self.name = name
        self.healthy = True
        self.reason = ""
        self._socket_path = socket_path
        self._service = service
        self._probe = probe
        self._on_change = on_change
        self._suspected = False
        self._wake = asyncio.Event()
        self._restart_at = 0.0
        self._restart_pause = RESTART_PAUSE_FIRST
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"unhealthy ({self.reason})"
        return f"<PodmanHealth {self.name} {state}>"

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name=f"podman-health-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def suspect(self, error: str) -> None:
        if not self._suspected:
            log.info("a podman call failed: probing the service", runtime=self.name, error=error)
        self._suspected = True
        self._wake.set()

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            try:
                problem, curable = await self._find_problem()
            except Exception:  # the watch must outlive any surprise; the next look retries
                log.exception("checking the podman service failed", runtime=self.name)
                continue
            if problem is None:
                await self._set(True, "")
                self._restart_pause = RESTART_PAUSE_FIRST
                continue
            self._suspected = True  # back to healthy only through a probe that passes
            await self._set(False, problem)
            if curable:
                await self._heal(problem)

    async def _find_problem(self) -> tuple[str | None, bool]:
        """The reason containers cannot be started now, or None; and whether a restart of
        the service may cure it."""
        if self._service is not None:
            problem = self._service.problem()
            if problem is not None:
                return problem, True
        try:
            await ping(self._socket_path)
        except TimeoutError:  # before OSError, its base
            return f"podman does not answer on {self._socket_path} within {PING_TIMEOUT} s", True
        except OSError as exc:
            return f"podman does not answer on {self._socket_path}: {exc}", True
        if not self._suspected:
            return None, False
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await self._probe()
        except FailedPrecondition as exc:  # an image to build, not a service to restart
            return f"a probe container cannot start: {exc}", False
        except PetriError as exc:
            return f"a probe container cannot start: {exc}", True
        except TimeoutError:
            return f"a probe container did not start within {PROBE_TIMEOUT:.0f} s", True
        except Exception as exc:  # podman refused the probe's request: ours to fix, not podman's
            return f"a probe container cannot start: {exc!r}", False
        self._suspected = False
        return None, False

    async def _set(self, healthy: bool, reason: str) -> None:
        if healthy == self.healthy and reason == self.reason:
            return
        was_healthy = self.healthy
        self.healthy, self.reason = healthy, reason
        if healthy:
            log.info("podman can start containers again", runtime=self.name)
        else:
            error = last_error(self._service.log_path) if self._service else ""
            log.error(
                "podman cannot start containers: health is NOT_SERVING",
                runtime=self.name,
                reason=reason,
                **({"service_log": error} if error else {}),
            )
        if healthy != was_healthy:
            await self._on_change()

    async def _heal(self, problem: str) -> None:
        if self._service is None:
            return  # someone else's service (--podman-socket): theirs to restart
        loop = asyncio.get_running_loop()
        if loop.time() < self._restart_at:
            return
        error = last_error(self._service.log_path)
        try:
            await self._service.restart(f"{problem}; {error}" if error else problem)
        except Unavailable as exc:
            log.error("podman service restart failed", runtime=self.name, error=str(exc))
        self._restart_at = loop.time() + self._restart_pause
        self._restart_pause = min(RESTART_PAUSE_LONGEST, self._restart_pause * 2)
        self._wake.set()  # prove the new service at once
