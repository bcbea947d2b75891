"""PodmanService and PodmanHealth against a stand-in `podman system service`: a small process
that answers /_ping on the unix socket it is given, as podman's API does."""

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.errors import FailedPrecondition, Unavailable
from controller.runtime import podman_service
from controller.runtime.podman_service import PodmanHealth, PodmanService

FAKE_PODMAN = f"""#!{sys.executable}
import asyncio, os, sys
socket_path = sys.argv[-1].removeprefix("unix://")
if os.environ.get("FAKE_PODMAN_CWD"):
    os.chdir(os.environ["FAKE_PODMAN_CWD"])
with open(socket_path + ".cwd", "w") as f:
    f.write(os.getcwd())

async def answer(reader, writer):
    await reader.readline()
    writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nOK")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_unix_server(answer, socket_path)
    await server.serve_forever()

asyncio.run(main())
"""


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[PodmanService]:
    binary = tmp_path / "podman"
    binary.write_text(FAKE_PODMAN)
    binary.chmod(0o755)
    running = PodmanService(str(binary), tmp_path / "run" / "podman.sock", tmp_path / "log")
    yield running
    await running.stop()


async def test_the_service_runs_in_slash_not_in_the_callers_directory(
    service: PodmanService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Started from a source tree that a script may re-stage (delete), conmon would fail
    # every container start once it is gone.
    (tmp_path / "src").mkdir()
    monkeypatch.chdir(tmp_path / "src")
    await service.start()
    assert Path(f"{service.socket_path}.cwd").read_text() == "/"
    assert service.problem() is None


async def test_a_deleted_working_directory_is_a_problem(
    service: PodmanService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "doomed").mkdir()
    monkeypatch.setenv("FAKE_PODMAN_CWD", str(tmp_path / "doomed"))
    await service.start()
    assert service.problem() is None
    shutil.rmtree(tmp_path / "doomed")
    assert service.problem() == "the podman service's working directory was deleted"


async def test_a_vanished_socket_is_a_problem(service: PodmanService) -> None:
    await service.start()
    service.socket_path.unlink()
    assert service.problem() == f"the podman service's socket {service.socket_path} vanished"


class Watched:
    """A PodmanHealth with a scripted probe; its flips arrive on a queue."""

    def __init__(self, service: PodmanService, probe_errors: list[Exception]) -> None:
        self.flips: asyncio.Queue[bool] = asyncio.Queue()
        self.probes = 0
        self._errors = probe_errors
        self.health = PodmanHealth("runc", service.socket_path, service, self._probe, self._changed)

    async def _probe(self) -> None:
        self.probes += 1
        if self._errors:
            raise self._errors.pop(0)

    async def _changed(self) -> None:
        await self.flips.put(self.health.healthy)

    async def next_flip(self) -> bool:
        return await asyncio.wait_for(self.flips.get(), 10)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podman_service, "WATCH_INTERVAL", 0.05)


@pytest.mark.usefixtures("fast")
async def test_a_dead_service_is_unhealthy_then_restarted_and_proved(
    service: PodmanService,
) -> None:
    await service.start()
    watched = Watched(service, [])
    watched.health.start()
    try:
        assert service.pid is not None
        os.kill(service.pid, signal.SIGKILL)
        assert await watched.next_flip() is False
        assert "exited" in watched.health.reason
        assert await watched.next_flip() is True
        assert service.restarts == 1 and watched.probes == 1 and service.problem() is None
    finally:
        await watched.health.stop()


@pytest.mark.usefixtures("fast")
async def test_a_failed_call_is_proved_by_a_probe_and_a_failing_probe_restarts(
    service: PodmanService,
) -> None:
    await service.start()
    watched = Watched(service, [Unavailable("podman failed to start a probe: exit status 1")])
    watched.health.start()
    try:
        watched.health.suspect("podman failed to create and start a sandbox container")
        assert await watched.next_flip() is False
        assert "exit status 1" in watched.health.reason
        assert await watched.next_flip() is True
        assert service.restarts == 1 and watched.probes == 2
    finally:
        await watched.health.stop()


@pytest.mark.usefixtures("fast")
async def test_a_missing_image_is_unhealthy_but_no_reason_to_restart(
    service: PodmanService,
) -> None:
    await service.start()
    missing = FailedPrecondition("image localhost/petri-sandbox:full is not built")
    watched = Watched(service, [missing, missing])
    watched.health.start()
    try:
        watched.health.suspect("podman failed to create and start a sandbox container")
        assert await watched.next_flip() is False
        assert await watched.next_flip() is True
        assert service.restarts == 0 and watched.probes == 3
    finally:
        await watched.health.stop()
