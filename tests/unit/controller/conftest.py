from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.store.registry import Registry
from controller.store.sqlite import SqliteRegistry


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = SqliteRegistry(tmp_path / "petri.db")
    await reg.open()
    yield reg
    await reg.close()
