from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from controller.store.postgres import PostgresRegistry
from controller.store.registry import Registry
from controller.store.sqlite import SqliteRegistry
from tests.postgres import fresh_database

MakeRegistry = Callable[[], Registry]


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """The session's PostgreSQL, with tables of this test's own."""
    yield from fresh_database(postgres_url)


@pytest.fixture(params=["sqlite", "postgres"])
def make_registry(request: pytest.FixtureRequest, tmp_path: Path) -> MakeRegistry:
    """Makes registries (not yet open) on one store, of each backend in turn: the protocol's
    tests hold for both."""
    if request.param == "sqlite":
        return lambda: SqliteRegistry(tmp_path / "petri.db")
    url: str = request.getfixturevalue("pg_url")
    return lambda: PostgresRegistry(url, timeout=2.0)


@pytest.fixture
async def registry(make_registry: MakeRegistry) -> AsyncIterator[Registry]:
    reg = make_registry()
    await reg.open()
    yield reg
    await reg.close()
