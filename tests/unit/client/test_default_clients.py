"""The default AsyncClient is one per event loop; one of a loop that has closed is dropped (its
channel, which refers to the loop, would otherwise keep it, and a connection, forever)."""

from __future__ import annotations

import asyncio
import gc

from petri.sdk import connection


async def _default() -> connection.AsyncClient:
    client = connection.default_async_client()
    assert connection.default_async_client() is client  # one per loop
    return client


def test_a_closed_loops_default_async_client_is_dropped() -> None:
    clients = [asyncio.run(_default()) for _ in range(5)]
    assert len({id(c) for c in clients}) == 5
    del clients
    gc.collect()
    assert len(connection._default_async) <= 1
