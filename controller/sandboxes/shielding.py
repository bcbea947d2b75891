"""Steps that must run to their end once begun, whoever waits for them."""

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def shielded(step: Awaitable[T]) -> T:
    """Runs `step` to its end even if the caller is cancelled meanwhile."""
    return await asyncio.shield(asyncio.ensure_future(step))
