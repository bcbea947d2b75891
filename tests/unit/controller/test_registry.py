from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.errors import AlreadyExists, QuotaExceeded
from controller.listing import LabelIs, ListQuery, SortKey, StateIs, position_of
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec, State
from controller.store.registry import Registry
from controller.store.table import NAMES
from tests.unit.controller.conftest import MakeRegistry

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


def query(**changes: object) -> ListQuery:
    values: dict[str, object] = {
        "project": "p",
        "conditions": (),
        "sort_key": SortKey.CREATE_TIME,
        "descending": False,
        "limit": 100,
    }
    values.update(changes)
    return ListQuery(**values)  # type: ignore[arg-type]


async def listed(registry: Registry, **changes: object) -> list[str]:
    return [r.sandbox_id for r in await registry.list_page(query(**changes))]


def test_the_table_stores_every_field_of_a_record() -> None:
    assert sorted(f.name for f in fields(SandboxRecord)) == sorted(NAMES)


async def test_a_record_survives_reopening(make_registry: MakeRegistry) -> None:
    reg = make_registry()
    await reg.open()
    original = record(
        "a", labels={"team": "ml"}, display_name="A", request_id="r1", create_request="{}"
    )
    # A time that float seconds cannot hold exactly comes back to the microsecond.
    original.last_active_time = datetime(2026, 1, 1, 12, 0, 0, 123457, tzinfo=UTC)
    await reg.insert(original)
    await reg.close()

    reopened = make_registry()
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
    assert await registry.tombstone(first.uid, "deleted", deleted_at)
    assert await registry.get_live("p", "a") is None

    await registry.insert(record("a", uid="uid-second"))
    live = await registry.get_live("p", "a")
    assert live is not None and live.uid == "uid-second"
    tombstone = await registry.get_latest_tombstone("p", "a")
    assert tombstone is not None and tombstone.state is State.DELETED
    assert (tombstone.delete_time, tombstone.delete_reason) == (deleted_at, "deleted")
    assert not await registry.tombstone(first.uid, "again", deleted_at)


async def test_a_delete_time_written_the_old_way_makes_a_tombstone(registry: Registry) -> None:
    await registry.insert(record("a"))
    assert await registry.set_fields("uid-a", delete_time=T0, delete_reason="expired")
    tombstone = await registry.get_latest_tombstone("p", "a")
    assert tombstone is not None and tombstone.state is State.DELETED
    assert await registry.list_live() == []


async def test_a_tombstone_needs_a_time(registry: Registry) -> None:
    await registry.insert(record("a"))
    with pytest.raises(ValueError, match="tombstone"):
        await registry.set_fields("uid-a", state=State.DELETED)
    with pytest.raises(ValueError, match="tombstone"):
        await registry.set_fields("uid-a", delete_time=None)
    assert await registry.get_live("p", "a") is not None


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

    assert await registry.tombstone("uid-a", "deleted", later)
    assert not await registry.set_fields("uid-a", state=State.RUNNING)
    assert await registry.get_live("p", "a") is None


async def test_unknown_fields_are_refused(registry: Registry) -> None:
    await registry.insert(record("a"))
    with pytest.raises(ValueError, match="owner"):
        await registry.set_fields("uid-a", owner="bob")


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
        page = await registry.list_page(query(limit=2, after=after))
        seen += [r.sandbox_id for r in page]
        if len(page) < 2:
            break
        after = position_of(page[-1], SortKey.CREATE_TIME)
    assert seen == ["c", "a", "b", "d", "e"]

    assert await listed(registry, sort_key=SortKey.NAME, descending=True) == list("edcba")
    after_c = position_of(record("c", 0), SortKey.NAME)
    assert await listed(registry, sort_key=SortKey.NAME, descending=True, after=after_c) == [
        "b",
        "a",
    ]


async def test_equal_sort_values_page_by_uid(registry: Registry) -> None:
    for sandbox_id in "abc":
        await registry.insert(record(sandbox_id))  # the same expire_time
    first = await registry.list_page(query(sort_key=SortKey.EXPIRE_TIME, limit=1))
    after = position_of(first[0], SortKey.EXPIRE_TIME)
    rest = await listed(registry, sort_key=SortKey.EXPIRE_TIME, after=after)
    assert [first[0].sandbox_id, *rest] == ["a", "b", "c"]


async def test_list_applies_the_conditions(registry: Registry) -> None:
    await registry.insert(record("a", labels={"team": "ml"}))
    await registry.insert(record("b", labels={"team": "web"}))
    await registry.insert(record("c", labels={"team": "ml"}, state=State.TERMINATED))
    await registry.insert(record("d"))
    running_ml = (StateIs(State.RUNNING), LabelIs("team", "ml"))
    assert await listed(registry, conditions=running_ml) == ["a"]
    not_ml = (LabelIs("team", "ml", negated=True),)
    assert await listed(registry, conditions=not_ml) == ["b", "d"]  # no label differs too


async def test_list_and_quotas_see_no_pool_member_and_no_tombstone(registry: Registry) -> None:
    # In project p on purpose: the state says what a row is, not a project.
    await registry.insert(record("warming", state=State.WARMING))
    await registry.insert(record("pooled", state=State.POOLED))
    await registry.insert(record("gone"))
    await registry.tombstone("uid-gone", "deleted", T0)
    for state in (State.PROVISIONING, State.RUNNING, State.DEPROVISIONING, State.TERMINATED):
        await registry.insert(record(state.name.lower(), state=state))

    shown = ["provisioning", "running", "deprovisioning", "terminated"]
    assert await listed(registry) == sorted(shown)  # all created at T0: by uid
    assert await registry.count_live("p") == len(shown)
    live = {r.sandbox_id for r in await registry.list_live()}
    assert live == {"warming", "pooled", *shown}
    expired = await registry.list_expired(T0 + timedelta(days=1), 100)
    assert {r.sandbox_id for r in expired} == live  # pool members expire too


async def test_a_pooled_member_is_claimed_once(registry: Registry) -> None:
    member = record("m1", project=POOL_PROJECT, state=State.POOLED)
    await registry.insert(member)
    await registry.insert(record("taken"))
    owner: dict[str, Any] = {"project": "p", "sandbox_id": "mine", "labels": {"a": "b"}}
    with pytest.raises(AlreadyExists, match="projects/p/sandboxes/taken"):
        await registry.claim_pool_member(member.uid, **{**owner, "sandbox_id": "taken"})
    assert await registry.claim_pool_member(member.uid, **owner)
    assert not await registry.claim_pool_member(member.uid, **{**owner, "sandbox_id": "again"})
    claimed = await registry.get_live("p", "mine")
    assert claimed is not None and claimed.uid == member.uid and claimed.labels == {"a": "b"}
    assert claimed.state is State.RUNNING
    assert await listed(registry) == ["mine", "taken"]


async def test_a_member_still_warming_cannot_be_claimed(registry: Registry) -> None:
    await registry.insert(record("m1", project=POOL_PROJECT, state=State.WARMING))
    assert not await registry.claim_pool_member("uid-m1", project="p", sandbox_id="mine")
    await registry.insert(record("r", project=POOL_PROJECT))  # RUNNING: no pool member
    assert not await registry.claim_pool_member("uid-r", project="p", sandbox_id="mine")
    assert await registry.get_live("p", "mine") is None


async def test_a_deferred_write_is_seen_by_the_next_read(registry: Registry) -> None:
    await registry.insert(record("a"))
    registry.set_fields_soon("uid-a", execution_count=7)
    got = await registry.get_live("p", "a")
    assert got is not None and got.execution_count == 7


async def test_only_old_tombstones_are_purged(registry: Registry) -> None:
    await registry.insert(record("old"))
    await registry.insert(record("recent"))
    await registry.insert(record("live"))
    await registry.tombstone("uid-old", "deleted", T0)
    await registry.tombstone("uid-recent", "deleted", T0 + timedelta(days=2))
    assert await registry.purge_tombstones(T0 + timedelta(days=1)) == 1
    assert await registry.get_latest_tombstone("p", "old") is None
    assert await registry.get_latest_tombstone("p", "recent") is not None
    assert await registry.get_live("p", "live") is not None


async def test_a_quota_admits_a_sandbox_only_while_its_project_has_room(
    registry: Registry,
) -> None:
    await registry.insert(record("a"))
    # Neither a pool member, nor a tombstone, nor another project's sandbox takes room in p.
    await registry.insert(record("m1", project=POOL_PROJECT, state=State.POOLED))
    await registry.insert(record("gone"))
    await registry.tombstone("uid-gone", "deleted", T0)
    await registry.insert(record("elsewhere", project="q"))

    await registry.insert(record("b"), quota=2)
    with pytest.raises(QuotaExceeded) as caught:
        await registry.insert(record("c"), quota=2)
    assert str(caught.value) == "project 'p' has 2 sandboxes, its quota of 2: delete some first"
    assert caught.value.reason == "QUOTA_EXCEEDED"
    assert caught.value.metadata == {"quota": "max_sandboxes_per_project", "limit": "2"}
    assert await registry.get_live("p", "c") is None
    with pytest.raises(AlreadyExists):  # a taken name is taken, whatever the room
        await registry.insert(record("a", uid="uid-a2"), quota=10)

    with pytest.raises(QuotaExceeded):
        await registry.claim_pool_member("uid-m1", quota=2, project="p", sandbox_id="d")
    assert await registry.claim_pool_member("uid-m1", quota=3, project="p", sandbox_id="d")
    assert await registry.count_live("p") == 3


async def test_a_label_value_with_nul_matches_no_sandbox(registry: Registry) -> None:
    # The API's filter admits "\u0000"; PostgreSQL's text cannot hold it, and no label does.
    await registry.insert(record("a", labels={"team": "ml"}))
    await registry.insert(record("b"))
    assert await listed(registry, conditions=(LabelIs("team", "ml\0"),)) == []
    assert await listed(registry, conditions=(LabelIs("team", "\0", negated=True),)) == ["a", "b"]
