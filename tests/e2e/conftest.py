"""Fixtures of the tests that run several controller processes on one PostgreSQL (role node,
role gateway)."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from controller.config import Config
from tests.e2e.cluster import podman_service
from tests.postgres import fresh_database


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@pytest.fixture
async def podman_socket(e2e_config: Config) -> AsyncIterator[Path]:
    """One podman service that both nodes use, as two controllers on one host would."""
    async with podman_service(e2e_config) as socket_path:
        yield socket_path
