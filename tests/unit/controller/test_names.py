from collections.abc import Callable

import pytest

from controller.errors import InvalidArgument
from controller.names import (
    SandboxName,
    generate_sandbox_id,
    parse_parent,
    parse_sandbox_name,
    validate_sandbox_id,
)


def test_parses_a_sandbox_name_and_formats_it_back() -> None:
    name = parse_sandbox_name("projects/acme/sandboxes/run-1")
    assert name == SandboxName("acme", "run-1")
    assert str(name) == "projects/acme/sandboxes/run-1"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "projects/acme",
        "projects/acme/sandboxes/",
        "projects/acme/sandboxes/Run",
        "projects/acme/sandboxes/1run",
        "projects/acme/sandboxes/run-",
        "projects/acme/sandboxes/run/extra",
        "project/acme/sandboxes/run",
        "projects/acme/boxes/run",
        "projects//sandboxes/run",
        "projects/acme/sandboxes/" + "a" * 64,
        "projects/acme/sandboxes/../x",
    ],
)
def test_rejects_malformed_sandbox_names_with_the_expected_format(bad: str) -> None:
    with pytest.raises(InvalidArgument, match=r"projects/\{project\}/sandboxes/\{sandbox\}"):
        parse_sandbox_name(bad)


def test_parent_must_be_a_project() -> None:
    assert parse_parent("projects/acme") == "acme"
    with pytest.raises(InvalidArgument, match=r"expected projects/\{project\}"):
        parse_parent("projects/acme/sandboxes/x")
    with pytest.raises(InvalidArgument):
        parse_parent("acme")


def test_sandbox_id_rules() -> None:
    assert validate_sandbox_id("a") == "a"
    assert validate_sandbox_id("a" * 63) == "a" * 63
    for bad in ("a" * 64, "A", "-a", "a_b", "a-"):
        with pytest.raises(InvalidArgument, match="sandbox_id"):
            validate_sandbox_id(bad)


def test_generated_ids_are_valid_and_distinct() -> None:
    ids = {generate_sandbox_id() for _ in range(100)}
    assert len(ids) == 100
    for sandbox_id in ids:
        assert validate_sandbox_id(sandbox_id) == sandbox_id


@pytest.mark.parametrize(
    "parse", [parse_parent, parse_sandbox_name, validate_sandbox_id], ids=lambda f: f.__name__
)
def test_a_huge_bad_name_is_quoted_by_a_short_prefix(parse: Callable[[str], object]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse("projects/" + "A" * (1 << 20))
    assert len(str(caught.value)) < 500
    assert "1048585 characters" in str(caught.value)
