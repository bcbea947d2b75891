"""podman's answers when a container goes while it is being looked at: gone, not a failure of
podman (which would cost the container check its whole round and start a health probe)."""

from pathlib import Path
from typing import Any

import podman.errors
import pytest

from controller.errors import Unavailable
from controller.runtime.podman import PodmanRuntime

VANISHED = "container 43deb111 does not exist in database: no such container"


class Containers:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def get(self, name: str) -> Any:
        raise self.error

    def remove(self, name: str, force: bool) -> None:
        raise self.error


def runtime_whose_containers_raise(error: Exception, tmp_path: Path) -> PodmanRuntime:
    runtime = PodmanRuntime(tmp_path / "podman.sock")
    runtime._client = type("Client", (), {"containers": Containers(error)})()
    return runtime


async def test_a_container_removed_during_its_inspection_is_gone(tmp_path: Path) -> None:
    runtime = runtime_whose_containers_raise(podman.errors.APIError(VANISHED), tmp_path)
    assert await runtime.status("petri-x") is None
    await runtime.remove("petri-x")  # removed by someone else meanwhile: done


async def test_other_podman_errors_are_still_failures(tmp_path: Path) -> None:
    runtime = runtime_whose_containers_raise(podman.errors.APIError("database is locked"), tmp_path)
    with pytest.raises(Unavailable, match="database is locked"):
        await runtime.status("petri-x")
