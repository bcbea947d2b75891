from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from controller.store.registry import Registry


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[Registry]:
    reg = Registry(tmp_path / "petri.db")
    await reg.open()
    yield reg
    await reg.close()
