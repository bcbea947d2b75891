import sqlite3

import pytest

from controller.errors import InvalidArgument
from controller.list_filter import compile_filter


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
    compiled = compile_filter(text)
    where = f"WHERE {compiled.where}" if compiled.where else ""
    rows = db.execute(f"SELECT id FROM sandboxes {where} ORDER BY id", compiled.params)
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
        compile_filter(text)


def test_label_values_are_bound_not_spliced(db: sqlite3.Connection) -> None:
    assert matching(db, 'labels.team = "x\' OR 1=1 --"') == []


@pytest.mark.parametrize("value", ['"\\x"', '"\\ud800"'])
def test_bad_string_escapes_are_invalid_argument(value: str) -> None:
    with pytest.raises(InvalidArgument, match="bad escape"):
        compile_filter(f"labels.team = {value}")
