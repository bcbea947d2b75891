import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from controller.errors import AlreadyExists
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec, State
from controller.store.registry import _SCHEMA, ListQuery, Registry, order_value

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def record(sandbox_id: str, minute: int = 0, **changes: object) -> SandboxRecord:
    created = T0 + timedelta(minutes=minute)
    values: dict[str, object] = {
        "uid": f"uid-{sandbox_id}",
        "project": "p",
        "sandbox_id": sandbox_id,
        "spec": Spec("test", Runtime.RUNC, Resources(disk_bytes=1 << 30)),
        "state": State.RUNNING,
        "create_time": created,
        "update_time": created,
        "expire_time": created + timedelta(hours=1),
        "last_active_time": created,
        "container_name": f"petri-uid-{sandbox_id}",
        "socket_dir": f"/run/petri/s/uid-{sandbox_id}",
    }
    values.update(changes)
    return SandboxRecord(**values)  # type: ignore[arg-type]


async def test_a_record_survives_reopening(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "petri.db")
    await reg.open()
    original = record(
        "a", labels={"team": "ml"}, display_name="A", request_id="r1", create_request="{}"
    )
    await reg.insert(original)
    await reg.close()

    reopened = Registry(tmp_path / "petri.db")
    await reopened.open()
    assert await reopened.get_live("p", "a") == original
    await reopened.close()


async def test_names_are_unique_among_live_sandboxes(registry: Registry) -> None:
    await registry.insert(record("a"))
    with pytest.raises(AlreadyExists, match="projects/p/sandboxes/a already exists"):
        await registry.insert(record("a", uid="uid-other"))


async def test_a_deleted_name_can_be_reused_and_keeps_its_tombstone(registry: Registry) -> None:
    first = record("a")
    await registry.insert(first)
    deleted_at = T0 + timedelta(minutes=5)
    assert await registry.set_fields(first.uid, delete_time=deleted_at, delete_reason="deleted")
    assert await registry.get_live("p", "a") is None

    await registry.insert(record("a", uid="uid-second"))
    live = await registry.get_live("p", "a")
    assert live is not None and live.uid == "uid-second"
    tombstone = await registry.get_latest_tombstone("p", "a")
    assert tombstone is not None and tombstone.delete_time == deleted_at
    assert tombstone.delete_reason == "deleted"


async def test_targeted_writes_keep_other_fields_and_never_touch_the_deleted(
    registry: Registry,
) -> None:
    await registry.insert(record("a", labels={"team": "ml"}))
    # An execution finishing after an update must not undo the update.
    later = T0 + timedelta(hours=3)
    assert await registry.set_fields("uid-a", expire_time=later, labels={"team": "web"})
    assert await registry.set_fields("uid-a", execution_count=5, incarnation="abc")
    live = await registry.get_live("p", "a")
    assert live is not None
    assert (live.expire_time, live.labels, live.execution_count) == (later, {"team": "web"}, 5)

    assert await registry.set_fields("uid-a", delete_time=later, delete_reason="deleted")
    assert not await registry.set_fields("uid-a", state=State.RUNNING, delete_time=None)
    assert await registry.get_live("p", "a") is None


async def test_forget_removes_a_row(registry: Registry) -> None:
    await registry.insert(record("a", request_id="r"))
    await registry.forget("uid-a")
    assert await registry.get_by_request_id("p", "r") is None


async def test_request_ids_are_unique_per_project(registry: Registry) -> None:
    await registry.insert(record("a", request_id="req"))
    with pytest.raises(AlreadyExists):
        await registry.insert(record("b", request_id="req"))
    await registry.insert(record("c", project="q", request_id="req"))
    found = await registry.get_by_request_id("p", "req")
    assert found is not None and found.sandbox_id == "a"


async def test_pages_are_ordered_and_resume_after_the_last_row(registry: Registry) -> None:
    for minute, sandbox_id in enumerate(["c", "a", "b", "d", "e"]):
        await registry.insert(record(sandbox_id, minute))
    await registry.insert(record("other", 9, project="q"))

    seen: list[str] = []
    after = None
    while True:
        page = await registry.list_page(
            ListQuery("p", "", (), "create_time", descending=False, limit=2, after=after)
        )
        seen += [r.sandbox_id for r in page]
        if len(page) < 2:
            break
        after = (order_value(page[-1], "create_time"), page[-1].uid)
    assert seen == ["c", "a", "b", "d", "e"]

    by_name = await registry.list_page(ListQuery("p", "", (), "sandbox_id", True, 10))
    assert [r.sandbox_id for r in by_name] == ["e", "d", "c", "b", "a"]


async def test_list_applies_a_compiled_filter(registry: Registry) -> None:
    await registry.insert(record("a", labels={"team": "ml"}))
    await registry.insert(record("b", labels={"team": "web"}))
    await registry.insert(record("c", labels={"team": "ml"}, state=State.TERMINATED))
    page = await registry.list_page(
        ListQuery(
            "p",
            "state = ? AND json_extract(labels, ?) = ?",
            (int(State.RUNNING), '$."team"', "ml"),
            "create_time",
            False,
            10,
        )
    )
    assert [r.sandbox_id for r in page] == ["a"]


async def test_a_pool_member_is_claimed_once(registry: Registry) -> None:
    member = record("m1", project=POOL_PROJECT, state=State.POOLED)
    await registry.insert(member)
    await registry.insert(record("taken"))
    owner = {"project": "p", "sandbox_id": "mine", "labels": {"a": "b"}}
    with pytest.raises(AlreadyExists, match="projects/p/sandboxes/taken"):
        await registry.claim_pool_member(member.uid, **{**owner, "sandbox_id": "taken"})
    assert await registry.claim_pool_member(member.uid, **owner)
    assert not await registry.claim_pool_member(member.uid, **{**owner, "sandbox_id": "again"})
    claimed = await registry.get_live("p", "mine")
    assert claimed is not None and claimed.uid == member.uid and claimed.labels == {"a": "b"}
    assert await registry.count_live(POOL_PROJECT) == 0


async def test_a_deferred_write_is_seen_by_the_next_read(registry: Registry) -> None:
    await registry.insert(record("a"))
    registry.set_fields_soon("uid-a", execution_count=7)
    got = await registry.get_live("p", "a")
    assert got is not None and got.execution_count == 7


async def test_a_registry_of_an_older_controller_gains_the_create_request_column(
    tmp_path: Path,
) -> None:
    path = tmp_path / "petri.db"
    old = sqlite3.connect(path)
    old.executescript(_SCHEMA.replace("    create_request   TEXT,", ""))
    old.execute("PRAGMA user_version = 1")
    old.close()
    reg = Registry(path)
    await reg.open()
    await reg.insert(record("a", request_id="r", create_request='{"x": 1}'))
    found = await reg.get_by_request_id("p", "r")
    await reg.close()
    assert found is not None and found.create_request == '{"x": 1}'
