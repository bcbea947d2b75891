"""Fixtures of the tests that run several controller processes on one PostgreSQL (role node,
role gateway)."""

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.config import Config
from controller.runtime.podman_service import PodmanService
from tests.postgres import fresh_database


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@pytest.fixture
async def podman_socket(e2e_config: Config) -> AsyncIterator[Path]:
    """One podman service that both nodes use, as two controllers on one host would."""
    directory = Path(f"{e2e_config.runtime_dir}-nodes-{uuid.uuid4().hex[:6]}")
    directory.mkdir(mode=0o700)
    service = PodmanService("podman", directory / "podman.sock", directory / "podman.log")
    await service.start()
    yield service.socket_path
    await service.stop()
