"""The registry in a real PostgreSQL, where several controllers (gateways) share it: the races
the database decides, the schema's migrations, and the database going away and coming back.
(The protocol's own tests run on PostgreSQL too: test_registry.py.)"""

import asyncio
import getpass
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import psycopg
import pytest
from structlog.testing import capture_logs

from controller.errors import AlreadyExists, InvalidArgument, QuotaExceeded, Unavailable
from controller.listing import SortKey
from controller.records import POOL_PROJECT, State
from controller.store import pg_schema
from controller.store.postgres import PostgresRegistry
from controller.store.schema import LIVE, SHOWN
from controller.store.table import NAMES
from petri.v1 import sandbox_pb2
from tests.postgres import Cluster
from tests.unit.controller.inprocess import PARENT, fast_petri
from tests.unit.controller.test_registry import query, record

SECRET = "s3cret-pw"
WAIT_SECONDS = 10.0


@pytest.fixture
async def gateways(pg_url: str) -> AsyncIterator[tuple[PostgresRegistry, PostgresRegistry]]:
    """Two registries on one database, as two controllers have."""
    first, second = PostgresRegistry(pg_url), PostgresRegistry(pg_url)
    await first.open()
    await second.open()
    yield first, second
    await first.close()
    await second.close()


async def outcomes(*calls: Awaitable[Any]) -> list[str]:
    """What each call, run at once, ended with: "ok" or its exception's class, sorted."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    return sorted("ok" if not isinstance(r, BaseException) else type(r).__name__ for r in results)


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"waited {WAIT_SECONDS} s for {what}")
        await asyncio.sleep(0.01)


async def lock_waiters(conn: psycopg.AsyncConnection[Any]) -> int:
    """How many sessions wait for an advisory lock."""
    cursor = await conn.execute(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


async def test_two_gateways_creating_the_same_name_at_once_make_one(
    gateways: tuple[PostgresRegistry, PostgresRegistry],
) -> None:
    a, b = gateways
    for n in range(10):
        name = f"same-{n}"
        assert await outcomes(
            a.insert(record(name, uid=f"uid-a{n}")), b.insert(record(name, uid=f"uid-b{n}"))
        ) == [AlreadyExists.__name__, "ok"]
    assert await a.count_live("p") == 10


async def test_two_gateways_creating_with_the_same_request_id_at_once_make_one(
    gateways: tuple[PostgresRegistry, PostgresRegistry],
) -> None:
    a, b = gateways
    for n in range(10):
        assert await outcomes(
            a.insert(record(f"a{n}", request_id=f"req-{n}")),
            b.insert(record(f"b{n}", request_id=f"req-{n}")),
        ) == [AlreadyExists.__name__, "ok"]
    assert await a.count_live("p") == 10


async def test_the_last_quota_slot_raced_by_two_gateways_goes_to_one(
    gateways: tuple[PostgresRegistry, PostgresRegistry], pg_url: str
) -> None:
    a, b = gateways
    await a.insert(record("first"))
    await a.insert(record("m1", project=POOL_PROJECT, state=State.POOLED))
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as holder:
        # Both reach the project's lock while the test holds it: without the lock, both
        # would count one sandbox and both add theirs.
        async with holder.transaction():
            await holder.execute(
                f"SELECT pg_advisory_xact_lock({pg_schema.PROJECT_LOCK_CLASS}, hashtext('p'))"
            )
            racing = [
                asyncio.ensure_future(a.insert(record("second"), quota=2)),
                asyncio.ensure_future(
                    b.claim_pool_member("uid-m1", quota=2, project="p", sandbox_id="claimed")
                ),
            ]

            async def both_wait_or_ended() -> bool:
                return all(task.done() for task in racing) or await lock_waiters(holder) == 2

            await wait_for(both_wait_or_ended, "both gateways to wait for the project's lock")
        assert await outcomes(*racing) == [QuotaExceeded.__name__, "ok"]
    assert await b.count_live("p") == 2


async def test_two_controllers_opening_a_new_database_at_once_migrate_it_once(
    pg_url: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as holder:
        await holder.execute(f"SELECT pg_advisory_lock({pg_schema.MIGRATION_LOCK})")
        registries = [PostgresRegistry(pg_url), PostgresRegistry(pg_url)]
        opening = [asyncio.ensure_future(r.open()) for r in registries]

        async def both_wait_or_ended() -> bool:
            return all(task.done() for task in opening) or await lock_waiters(holder) == 2

        await wait_for(both_wait_or_ended, "both controllers to wait for the migration lock")
        cursor = await holder.execute("SELECT to_regclass('sandboxes') IS NULL")
        assert await cursor.fetchone() == (True,), "a controller migrated without the lock"
        await holder.execute(f"SELECT pg_advisory_unlock({pg_schema.MIGRATION_LOCK})")
        await asyncio.gather(*opening)
        cursor = await holder.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert [row[0] for row in await cursor.fetchall()] == list(
            range(1, pg_schema.SCHEMA_VERSION + 1)
        )
    await registries[0].insert(record("a"))
    assert await registries[1].get_live("p", "a") is not None
    for registry in registries:
        await registry.close()


async def test_a_database_newer_than_the_controller_is_refused_untouched(pg_url: str) -> None:
    registry = PostgresRegistry(pg_url)
    await registry.open()
    await registry.insert(record("a"))
    await registry.close()
    newer = pg_schema.SCHEMA_VERSION + 1
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (newer,))
        with pytest.raises(
            pg_schema.SchemaTooNew,
            match=f"schema version {newer}, newer than this controller's "
            f"{pg_schema.SCHEMA_VERSION}: upgrade the controller",
        ):
            await PostgresRegistry(pg_url).open()
        cursor = await conn.execute(
            "SELECT max(version), (SELECT count(*) FROM sandboxes) FROM schema_migrations"
        )
        assert await cursor.fetchone() == (newer, 1)


async def test_the_migrated_table_stores_every_column_of_a_record(pg_url: str) -> None:
    registry = PostgresRegistry(pg_url)
    await registry.open()
    await registry.close()
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'sandboxes'"
        )
        assert sorted(row[0] for row in await cursor.fetchall()) == sorted(NAMES)
    # The indexes' conditions are the queries' own, as SQLite's are (or they go unused).
    statements = "\n".join(s for migration in pg_schema.MIGRATIONS for s in migration)
    assert f"WHERE {LIVE}" in statements and f"WHERE {SHOWN}" in statements


async def test_a_database_that_stops_fails_calls_as_unavailable_until_it_is_back(
    postgres_cluster: Cluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The session's cluster trusts its socket's owner: the password is only there to be hidden.
    url = pg_url.replace("postgresql:///", f"postgresql://{getpass.getuser()}:{SECRET}@/")
    registry = PostgresRegistry(url, timeout=1.0)
    await registry.open()
    assert SECRET not in repr(registry)
    await registry.insert(record("a"))
    caplog.set_level(logging.INFO)
    with capture_logs() as logs:
        postgres_cluster.stop()
        try:
            with pytest.raises(Unavailable) as read:
                await registry.get_live("p", "a")
            with pytest.raises(Unavailable):
                await registry.insert(record("b", request_id="r-b"), quota=10)
        finally:
            postgres_cluster.start()
        message = str(read.value)
        assert "the registry's database is not answering" in message
        assert "safe for reads and for a CreateSandbox that carries a request_id" in message
        assert read.value.status == grpc.StatusCode.UNAVAILABLE
        # Back: the same object works again, no restart.
        live = await registry.get_live("p", "a")
        assert live is not None and live.uid == "uid-a"
        await registry.insert(record("b", request_id="r-b"), quota=10)
    await registry.close()
    assert any(log["event"] == "the registry's database is not answering" for log in logs)
    assert SECRET not in f"{message} {read.value.__cause__} {logs} {caplog.text}"


async def test_an_unreachable_database_is_named_without_its_password() -> None:
    url = f"postgresql://someone:{SECRET}@/petri?host=/nonexistent-petri-test"
    with pytest.raises(RuntimeError, match="cannot reach the registry's database") as caught:
        await PostgresRegistry(url, timeout=1.0).open()
    assert "postgresql://someone:***@/petri?host=/nonexistent-petri-test" in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "password", ["s3cr/3tpw", "s3cr#3tpw", "s3cr?3tpw", "s3cr@3tpw", "s3cr3tpw@[::1"]
)
async def test_a_careless_password_is_not_shown_when_the_database_is_unreachable(
    password: str,
) -> None:
    # Not percent-encoded: the URL parser that found the password to mask cut it short, or
    # failed, and libpq's message quoted the URL.
    url = f"postgresql://someone:{password}@127.0.0.1:1/petri"
    with pytest.raises(RuntimeError, match="cannot reach the registry's database") as caught:
        await PostgresRegistry(url, timeout=1.0).open()
    assert "s3cr" not in str(caught.value) and "3tpw" not in str(caught.value)


async def test_a_controller_on_postgresql_keeps_its_quota_and_its_sandboxes(
    tmp_path: Any, pg_url: str
) -> None:
    async with fast_petri(tmp_path, database_url=pg_url, max_sandboxes_per_project=1) as petri:
        await petri.create("one")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await petri.create("two")
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "quota of 1" in (refused.value.details() or "")
    async with fast_petri(tmp_path, database_url=pg_url) as petri:  # the same database
        listed = await petri.stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
        assert [s.name for s in listed.sandboxes] == [f"{PARENT}/sandboxes/one"]


@pytest.mark.parametrize(
    ("sort_key", "after"),
    [
        (SortKey.CREATE_TIME, ("1767225600000000", "uid-a")),  # a time as text
        (SortKey.NAME, (5, "uid-a")),  # a name as a number
        (SortKey.EXPIRE_TIME, (True, "uid-a")),
        (SortKey.NAME, ("a\0", "uid-a")),
    ],
)
async def test_a_position_postgresql_cannot_compare_is_an_invalid_page_token(
    gateways: tuple[PostgresRegistry, PostgresRegistry],
    sort_key: SortKey,
    after: tuple[int | str, str],
) -> None:
    # Page tokens are the client's to send back: a forged one is the caller's error.
    a, _ = gateways
    await a.insert(record("a"))
    with pytest.raises(InvalidArgument, match="invalid page_token"):
        await a.list_page(query(sort_key=sort_key, after=after))


async def test_the_tests_postgresql_listens_on_its_unix_socket_only(postgres_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cursor = await conn.execute("SHOW listen_addresses")
        assert await cursor.fetchone() == ("",)  # no TCP port at all
