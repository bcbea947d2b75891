"""Moves between nodes in a real PostgreSQL (controller.store.moves): a move's one-time token is
found only by its target, the take-over switches the sandbox's row only if it still names the
source and is PAUSED (compare-and-set) and consumes the move, and a source that gives the move
up first leaves the target nothing to take over."""

from collections.abc import AsyncIterator

import psycopg
import pytest

from controller.records import State
from controller.store.moves import PostgresMoves
from controller.store.postgres import PostgresRegistry
from tests.unit.controller.test_registry import T0, record

TOKEN = "t" * 43
UID = "uid-s"


@pytest.fixture
async def source(pg_url: str) -> AsyncIterator[PostgresRegistry]:
    """Node n1's registry, holding sandbox s PAUSED."""
    registry = PostgresRegistry(pg_url, node="n1")
    await registry.open()
    await registry.insert(record("s", state=State.PAUSED))
    yield registry
    await registry.close()


async def node_of(registry: PostgresRegistry) -> str:
    found = await registry.get_live("p", "s")
    assert found is not None
    return found.node


async def test_a_move_is_found_only_with_its_token_by_its_target(
    source: PostgresRegistry, pg_url: str
) -> None:
    moves = PostgresMoves(source)
    await moves.begin(UID, "n1", "n2", True, TOKEN)
    found = await moves.find(UID, TOKEN, "n2")
    assert found is not None and (found.source, found.resume) == ("n1", True)
    assert await moves.find(UID, "x" * 43, "n2") is None  # another token
    assert await moves.find(UID, TOKEN, "n3") is None  # another node
    assert await moves.find("uid-other", TOKEN, "n2") is None  # another sandbox
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT token_hash FROM moves")
        assert TOKEN not in str(await cursor.fetchall())  # only its hash is stored
        await conn.execute("UPDATE moves SET create_time = now() - interval '1 day'")
    assert await moves.find(UID, TOKEN, "n2") is None  # too old
    assert not await moves.take_over(UID, TOKEN, "n2", T0)
    assert await node_of(source) == "n1"


async def test_the_take_over_switches_the_row_once_and_only_from_the_source_paused(
    source: PostgresRegistry,
) -> None:
    moves = PostgresMoves(source)
    await moves.begin(UID, "n1", "n2", False, TOKEN)
    assert not await moves.take_over(UID, "x" * 43, "n2", T0)  # a wrong token changes nothing
    assert not await moves.take_over(UID, TOKEN, "n3", T0)
    assert await node_of(source) == "n1"
    assert await moves.take_over(UID, TOKEN, "n2", T0)
    assert await node_of(source) == "n2"
    assert not await moves.take_over(UID, TOKEN, "n2", T0)  # consumed: good once
    assert not await moves.give_up(UID, TOKEN)  # the source learns it was consumed

    # Not PAUSED (resumed, or deleted, meanwhile): no switch, and the move is consumed.
    await source.set_fields(UID, node="n1", state=State.RUNNING)
    await moves.begin(UID, "n1", "n2", False, TOKEN)
    assert not await moves.take_over(UID, TOKEN, "n2", T0)
    assert await node_of(source) == "n1"
    assert await moves.find(UID, TOKEN, "n2") is None
    # The row names another node than the move's source: no switch either.
    await source.set_fields(UID, node="n3", state=State.PAUSED)
    await moves.begin(UID, "n1", "n2", False, TOKEN)
    assert not await moves.take_over(UID, TOKEN, "n2", T0)
    assert await node_of(source) == "n3"


async def test_a_move_given_up_cannot_be_taken_over(source: PostgresRegistry) -> None:
    moves = PostgresMoves(source)
    await moves.begin(UID, "n1", "n2", True, TOKEN)
    assert await moves.give_up(UID, TOKEN)
    assert not await moves.take_over(UID, TOKEN, "n2", T0)
    assert await node_of(source) == "n1"
    # A new move of the sandbox replaces the old one: the old token is void.
    await moves.begin(UID, "n1", "n2", True, TOKEN)
    await moves.begin(UID, "n1", "n2", True, "n" * 43)
    assert not await moves.take_over(UID, TOKEN, "n2", T0)
    assert await moves.take_over(UID, "n" * 43, "n2", T0)


async def test_a_new_move_deletes_the_void_ones(source: PostgresRegistry, pg_url: str) -> None:
    """A node that stopped mid-move leaves its move's row: void after a while, then deleted."""
    moves = PostgresMoves(source)
    await moves.begin("uid-left", "n1", "n2", True, TOKEN)
    await moves.begin("uid-recent", "n1", "n2", True, TOKEN)
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute(
            "UPDATE moves SET create_time = now() - interval '1 day' WHERE uid = 'uid-left'"
        )
        await moves.begin(UID, "n1", "n2", True, TOKEN)
        cursor = await conn.execute("SELECT uid FROM moves ORDER BY uid")
        assert await cursor.fetchall() == [("uid-recent",), (UID,)]
