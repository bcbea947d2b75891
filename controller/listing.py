"""A ListSandboxes query in the domain's terms: the API parses a request into one, the store
compiles it to its query language. Neither side sees the other's syntax."""

import enum
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from controller.records import SandboxRecord, State


@dataclass(frozen=True)
class StateIs:
    """`state = STATE`, or `state != STATE` when negated."""

    state: State
    negated: bool = False


@dataclass(frozen=True)
class LabelIs:
    """`labels.KEY = VALUE`; negated, `labels.KEY != VALUE`, which a sandbox without the label
    also matches."""

    key: str
    value: str
    negated: bool = False


@dataclass(frozen=True)
class LabelPresent:
    """`labels.KEY:*`: the sandbox has the label, whatever its value."""

    key: str


Condition = StateIs | LabelIs | LabelPresent


class SortKey(enum.Enum):
    """What a page is ordered by (ties broken by uid)."""

    CREATE_TIME = "create_time"
    EXPIRE_TIME = "expire_time"
    NAME = "name"


# Where a page ends: the sort key's value of its last sandbox (a time in microseconds since the
# epoch, or a sandbox_id) and that sandbox's uid. Page tokens carry it.
Position = tuple[int | str, str]


@dataclass(frozen=True)
class ListQuery:
    """A page of one project's sandboxes that match every condition, after `after`."""

    project: str
    conditions: tuple[Condition, ...]
    sort_key: SortKey
    descending: bool
    limit: int
    after: Position | None = None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def micros_since_epoch(value: datetime) -> int:
    """The time unit of positions, and of the store's columns: exact, no float rounding."""
    return (value - _EPOCH) // _MICROSECOND


def from_micros(value: int) -> datetime:
    return _EPOCH + value * _MICROSECOND


def position_of(record: SandboxRecord, sort_key: SortKey) -> Position:
    """The position just after `record` in a listing ordered by `sort_key`."""
    if sort_key is SortKey.CREATE_TIME:
        return micros_since_epoch(record.create_time), record.uid
    if sort_key is SortKey.EXPIRE_TIME:
        return micros_since_epoch(record.expire_time), record.uid
    return record.sandbox_id, record.uid
