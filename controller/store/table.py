"""The sandboxes table, defined once: each column's SQL type and how a record's field of the
same name is stored in it. The schema, the row conversions and every write derive from it."""

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from controller.listing import from_micros, micros_since_epoch
from controller.records import (
    CheckpointInfo,
    LostName,
    Resources,
    Runtime,
    SandboxRecord,
    Spec,
    State,
)


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Column:
    name: str  # also the SandboxRecord field it stores
    sql_type: str
    encode: Callable[[Any], Any] = _same
    decode: Callable[[Any], Any] = _same


def _spec_to_json(spec: Spec) -> str:
    resources = spec.resources
    return json.dumps(
        {
            "image_profile": spec.image_profile,
            "runtime": spec.runtime.name,
            "resources": {
                "cpu_millis": resources.cpu_millis,
                "memory_bytes": resources.memory_bytes,
                "disk_bytes": resources.disk_bytes,
                "max_processes": resources.max_processes,
            },
        }
    )


def _spec_from_json(text: str) -> Spec:
    data = json.loads(text)
    return Spec(
        image_profile=data["image_profile"],
        runtime=Runtime[data["runtime"]],
        resources=Resources(**data["resources"]),
    )


def _labels_to_json(labels: Mapping[str, str]) -> str:
    return json.dumps(labels, sort_keys=True)


def _optional_micros(value: datetime | None) -> int | None:
    return None if value is None else micros_since_epoch(value)


def _optional_time(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def _micros(value: timedelta) -> int:
    return value // timedelta(microseconds=1)


def _duration(value: int) -> timedelta:
    return timedelta(microseconds=value)


def _lost_to_json(lost: tuple[LostName, ...]) -> list[list[str]]:
    return [[entry.name, entry.reason] for entry in lost]


def _lost_from_json(data: list[list[str]]) -> tuple[LostName, ...]:
    return tuple(LostName(name, reason) for name, reason in data)


def _checkpoint_to_json(info: CheckpointInfo | None) -> str | None:
    if info is None:
        return None
    return json.dumps(
        {
            "create_time": micros_since_epoch(info.create_time),
            "size_bytes": info.size_bytes,
            "lost": _lost_to_json(info.lost),
            "execution_count": info.execution_count,
        }
    )


def _checkpoint_from_json(text: str | None) -> CheckpointInfo | None:
    if text is None:
        return None
    data = json.loads(text)
    return CheckpointInfo(
        create_time=from_micros(data["create_time"]),
        size_bytes=data["size_bytes"],
        lost=_lost_from_json(data["lost"]),
        execution_count=data["execution_count"],
    )


def _report_to_json(report: tuple[LostName, ...] | None) -> str | None:
    return None if report is None else json.dumps(_lost_to_json(report))


def _report_from_json(text: str | None) -> tuple[LostName, ...] | None:
    return None if text is None else _lost_from_json(json.loads(text))


# Times are microseconds since the epoch, UTC, durations microseconds; labels, spec and the
# checkpoint are JSON objects.
COLUMNS = (
    Column("uid", "TEXT PRIMARY KEY"),
    Column("project", "TEXT NOT NULL"),
    Column("sandbox_id", "TEXT NOT NULL"),
    Column("display_name", "TEXT NOT NULL"),
    Column("labels", "TEXT NOT NULL", _labels_to_json, json.loads),
    Column("spec", "TEXT NOT NULL", _spec_to_json, _spec_from_json),
    Column("state", "INTEGER NOT NULL", int, State),
    Column("state_message", "TEXT NOT NULL"),
    Column("create_time", "INTEGER NOT NULL", micros_since_epoch, from_micros),
    Column("update_time", "INTEGER NOT NULL", micros_since_epoch, from_micros),
    Column("expire_time", "INTEGER NOT NULL", micros_since_epoch, from_micros),
    Column("last_active_time", "INTEGER NOT NULL", micros_since_epoch, from_micros),
    Column("execution_count", "INTEGER NOT NULL"),
    Column("incarnation", "TEXT NOT NULL"),
    Column("request_id", "TEXT"),
    Column("create_request", "TEXT"),  # JSON: the Create that request_id names
    Column("container_name", "TEXT NOT NULL"),
    Column("socket_dir", "TEXT NOT NULL"),
    Column("delete_time", "INTEGER", _optional_micros, _optional_time),
    Column("delete_reason", "TEXT NOT NULL"),
    # Added in version 3.
    Column("auto_pause_after", "INTEGER NOT NULL DEFAULT 0", _micros, _duration),
    Column("checkpoint", "TEXT", _checkpoint_to_json, _checkpoint_from_json),
    Column("restore_report", "TEXT", _report_to_json, _report_from_json),
    # Added in version 4.
    Column("node", "TEXT NOT NULL DEFAULT ''"),
)
BY_NAME = {column.name: column for column in COLUMNS}
NAMES = tuple(BY_NAME)


def to_row(record: SandboxRecord) -> dict[str, Any]:
    return {column.name: column.encode(getattr(record, column.name)) for column in COLUMNS}


def from_row(row: Mapping[str, Any]) -> SandboxRecord:
    return SandboxRecord(**{column.name: column.decode(row[column.name]) for column in COLUMNS})


def encode_fields(fields: Mapping[str, object]) -> dict[str, Any]:
    """Some fields of a record as stored; ValueError for a name that is no column."""
    unknown = set(fields) - set(BY_NAME)
    if unknown:
        raise ValueError(f"no such fields: {sorted(unknown)}")
    return {name: BY_NAME[name].encode(value) for name, value in fields.items()}


def encode_update(fields: Mapping[str, object]) -> dict[str, Any]:
    """The columns a targeted write of a live sandbox sets: `fields` as stored, and a delete_time
    makes the row a tombstone (state DELETED); ValueError for a tombstone without a time."""
    if "delete_time" in fields or fields.get("state") == State.DELETED:
        # A tombstone is a state with a time: neither without the other.
        if fields.get("delete_time") is None:
            raise ValueError("a tombstone needs a delete_time: use tombstone()")
        fields = {**fields, "state": State.DELETED}
    return encode_fields(fields)


def create_table_sql() -> str:
    columns = ",\n    ".join(f"{column.name} {column.sql_type}" for column in COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS sandboxes (\n    {columns}\n)"


def insert_sql() -> str:
    return (
        f"INSERT INTO sandboxes ({', '.join(NAMES)}) "
        f"VALUES ({', '.join(':' + name for name in NAMES)})"
    )
