"""ListSandboxes queries compiled to SQL: the filter's conditions, the order, the page, in
SQLite's dialect or PostgreSQL's.

Every value is a bound parameter; column names come from the fixed table below, never from
the request.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

from controller.listing import Condition, LabelIs, LabelPresent, ListQuery, SortKey, StateIs
from controller.store.schema import SHOWN

_SORT_COLUMNS = {
    SortKey.CREATE_TIME: "create_time",
    SortKey.EXPIRE_TIME: "expire_time",
    SortKey.NAME: "sandbox_id",
}


def _label_path(key: str) -> str:
    if '"' in key:  # the API admits no such key; a quote would end the JSON path early
        raise ValueError(f"label key {key!r} cannot be a JSON path member")
    return f'$."{key}"'


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases in these queries."""

    param: str  # a bound parameter's placeholder
    # A label's value (NULL without the label): the SQL, with one placeholder, and its value.
    label: Callable[[str], tuple[str, object]]
    differs: str  # NULL-safe "not equal": a sandbox without the label differs from any value


SQLITE = Dialect(
    param="?",
    label=lambda key: ("json_extract(labels, ?)", _label_path(key)),
    differs="IS NOT",
)
POSTGRES = Dialect(
    param="%s",
    label=lambda key: ("(labels::jsonb ->> %s)", key),
    differs="IS DISTINCT FROM",
)


def compile_conditions(
    conditions: tuple[Condition, ...], dialect: Dialect = SQLITE
) -> tuple[str, tuple[object, ...]]:
    """An SQL condition over the labels and state columns, and its parameters; "" for none."""
    p = dialect.param
    parts: list[str] = []
    params: list[object] = []
    for condition in conditions:
        if isinstance(condition, StateIs):
            parts.append(f"state != {p}" if condition.negated else f"state = {p}")
            params.append(int(condition.state))
        elif isinstance(condition, LabelIs):
            label, key = dialect.label(condition.key)
            parts.append(f"{label} {dialect.differs if condition.negated else '='} {p}")
            params.extend([key, condition.value])
        elif isinstance(condition, LabelPresent):
            label, key = dialect.label(condition.key)
            parts.append(f"{label} IS NOT NULL")
            params.append(key)
        else:
            assert_never(condition)
    return " AND ".join(parts), tuple(params)


def compile_page(query: ListQuery, dialect: Dialect = SQLITE) -> tuple[str, tuple[object, ...]]:
    """The SELECT of one page: the project's shown sandboxes matching the query, in order,
    after its position."""
    p = dialect.param
    column = _SORT_COLUMNS[query.sort_key]
    direction, comparison = ("DESC", "<") if query.descending else ("ASC", ">")
    conditions = [f"project = {p}", SHOWN]
    params: list[object] = [query.project]
    where, where_params = compile_conditions(query.conditions, dialect)
    if where:
        conditions.append(f"({where})")
        params.extend(where_params)
    if query.after is not None:
        conditions.append(
            f"({column} {comparison} {p} OR ({column} = {p} AND uid {comparison} {p}))"
        )
        value, uid = query.after
        params.extend([value, value, uid])
    params.append(query.limit)
    sql = (
        f"SELECT * FROM sandboxes WHERE {' AND '.join(conditions)} "
        f"ORDER BY {column} {direction}, uid {direction} LIMIT {p}"
    )
    return sql, tuple(params)
