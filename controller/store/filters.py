"""ListSandboxes queries compiled to SQLite: the filter's conditions, the order, the page.

Every value is a bound parameter; column names come from the fixed table below, never from
the request.
"""

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


def compile_conditions(conditions: tuple[Condition, ...]) -> tuple[str, tuple[object, ...]]:
    """An SQL condition over the labels and state columns, and its parameters; "" for none."""
    parts: list[str] = []
    params: list[object] = []
    for condition in conditions:
        if isinstance(condition, StateIs):
            parts.append("state != ?" if condition.negated else "state = ?")
            params.append(int(condition.state))
        elif isinstance(condition, LabelIs):
            # IS NOT: a sandbox without the label differs from any value.
            parts.append(f"json_extract(labels, ?) {'IS NOT' if condition.negated else '='} ?")
            params.extend([_label_path(condition.key), condition.value])
        elif isinstance(condition, LabelPresent):
            parts.append("json_extract(labels, ?) IS NOT NULL")
            params.append(_label_path(condition.key))
        else:
            assert_never(condition)
    return " AND ".join(parts), tuple(params)


def compile_page(query: ListQuery) -> tuple[str, tuple[object, ...]]:
    """The SELECT of one page: the project's shown sandboxes matching the query, in order,
    after its position."""
    column = _SORT_COLUMNS[query.sort_key]
    direction, comparison = ("DESC", "<") if query.descending else ("ASC", ">")
    conditions = ["project = ?", SHOWN]
    params: list[object] = [query.project]
    where, where_params = compile_conditions(query.conditions)
    if where:
        conditions.append(f"({where})")
        params.extend(where_params)
    if query.after is not None:
        conditions.append(f"({column} {comparison} ? OR ({column} = ? AND uid {comparison} ?))")
        value, uid = query.after
        params.extend([value, value, uid])
    params.append(query.limit)
    sql = (
        f"SELECT * FROM sandboxes WHERE {' AND '.join(conditions)} "
        f"ORDER BY {column} {direction}, uid {direction} LIMIT ?"
    )
    return sql, tuple(params)
