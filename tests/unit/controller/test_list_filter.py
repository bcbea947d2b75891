import sqlite3

import pytest

from controller.api.list_filter import MAX_FILTER_BYTES, MAX_FILTER_TERMS, parse_filter
from controller.errors import InvalidArgument
from controller.store.filters import compile_conditions


@pytest.fixture
def db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE sandboxes (id TEXT, state INTEGER, labels TEXT)")
    conn.executemany(
        "INSERT INTO sandboxes VALUES (?, ?, ?)",
        [
            ("a", 2, '{"team": "ml", "env": "prod"}'),
            ("b", 2, '{"team": "web"}'),
            ("c", 4, '{"team": "ml"}'),
            ("d", 1, "{}"),
        ],
    )
    return conn


def matching(db: sqlite3.Connection, text: str) -> list[str]:
    """The sandboxes a filter selects: parsed by the API, compiled by the store."""
    condition, params = compile_conditions(parse_filter(text))
    where = f"WHERE {condition}" if condition else ""
    rows = db.execute(f"SELECT id FROM sandboxes {where} ORDER BY id", params)
    return [row[0] for row in rows]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["a", "b", "c", "d"]),
        ("state = RUNNING", ["a", "b"]),
        ("state != RUNNING", ["c", "d"]),
        ('labels.team = "ml"', ["a", "c"]),
        ("labels.team = ml", ["a", "c"]),
        ("labels.team != ml", ["b", "d"]),
        ("labels.env:*", ["a"]),
        ('state = RUNNING AND labels.team = "ml"', ["a"]),
        ("state=TERMINATED AND labels.team=ml", ["c"]),
        ('labels.team = "nobody"', []),
    ],
)
def test_filters_select_the_documented_sandboxes(
    db: sqlite3.Connection, text: str, expected: list[str]
) -> None:
    assert matching(db, text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("owner = bob", "unknown field 'owner'"),
        ("state = SLEEPING", "unknown state 'SLEEPING'"),
        ("state = RUNNING OR state = TERMINATED", "OR is not supported"),
        ("state = RUNNING state = RUNNING", "expected AND"),
        ("state", "expected FIELD OPERATOR VALUE"),
        ("state = RUNNING AND", "expected FIELD OPERATOR VALUE"),
        ("labels.Team = x", "invalid label key"),
        ("labels.team : x", "labels.team:\\*"),
        ("state > RUNNING", "unexpected '>'"),
        ("(state = RUNNING)", "unexpected '\\('"),
        ("state : *", "state supports = and !="),
    ],
)
def test_bad_filters_are_invalid_argument_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_filter(text)


def test_label_values_are_bound_not_spliced(db: sqlite3.Connection) -> None:
    assert matching(db, 'labels.team = "x\' OR 1=1 --"') == []


@pytest.mark.parametrize("value", ['"\\x"', '"\\ud800"'])
def test_bad_string_escapes_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument, match="bad escape"):
        parse_filter(f"labels.team = {value}")


def test_the_most_terms_allowed_run_in_sqlite(db: sqlite3.Connection) -> None:
    text = " AND ".join(["labels.team:*"] * MAX_FILTER_TERMS)
    assert matching(db, text) == ["a", "b", "c"]


def test_a_filter_of_a_thousand_terms_is_invalid_argument_not_an_sqlite_error() -> None:
    with pytest.raises(InvalidArgument, match="filter is 17995 bytes, more than the maximum"):
        parse_filter(" AND ".join(["state=RUNNING"] * 1000))


def test_one_term_more_than_allowed_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=f"more than {MAX_FILTER_TERMS} comparisons"):
        parse_filter(" AND ".join(["labels.a:*"] * (MAX_FILTER_TERMS + 1)))


def test_a_huge_filter_is_refused_by_its_length_before_it_is_read() -> None:
    text = " AND ".join(["state = RUNNING"] * 1_000_000)  # 19 MiB
    with pytest.raises(InvalidArgument, match=f"more than the maximum of {MAX_FILTER_BYTES}") as e:
        parse_filter(text)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    "text",
    [
        "x" * (1 << 20),
        "owner = " + "x" * (1 << 20),
        "state = " + "X" * 5000,
        '"' + "x" * 5000 + '" = x',
    ],
)
def test_messages_quote_only_a_prefix_of_a_bad_filter(text: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_filter(text)
    assert len(str(caught.value)) < 500


@pytest.mark.parametrize("state", ["WARMING", "POOLED", "DELETED"])
def test_the_controllers_own_states_are_unknown_to_a_filter(state: str) -> None:
    known = "PROVISIONING, RUNNING, DEPROVISIONING, TERMINATED, PAUSED"
    with pytest.raises(InvalidArgument, match=f"unknown state '{state}'; states are {known}$"):
        parse_filter(f"state = {state}")
