"""--database-url / PETRI_DATABASE_URL: SQLite unless it is set, PostgreSQL when it is; its
password never shown."""

from pathlib import Path

import pytest

from controller.app import registry_for
from controller.config import build_parser, load_config, redact_url
from controller.store.postgres import PostgresRegistry
from controller.store.sqlite import SqliteRegistry

URL = "postgresql://petri:s3cret-pw@db.internal:5432/petri?sslmode=require"


def test_without_a_database_url_the_registry_is_the_sqlite_file(tmp_path: Path) -> None:
    config = load_config([], environ={"PETRI_STATE_DIR": str(tmp_path)})
    assert config.database_url == "" and config.describe()["database_url"] == ""
    registry = registry_for(config)
    assert isinstance(registry, SqliteRegistry)
    assert str(tmp_path / "petri.db") in repr(registry)


def test_a_database_url_selects_postgresql_and_its_password_is_never_shown() -> None:
    config = load_config([], environ={"PETRI_DATABASE_URL": URL})
    assert config.database_url == URL
    registry = registry_for(config)
    assert isinstance(registry, PostgresRegistry)
    shown = "postgresql://petri:***@db.internal:5432/petri?sslmode=require"
    assert config.describe()["database_url"] == shown  # what the startup log prints
    assert shown in repr(registry)
    assert "s3cret" not in f"{config!r} {config.describe()} {registry!r}"


def test_the_flag_wins_over_the_variable() -> None:
    other = "postgresql:///petri?host=/run/pg"
    config = load_config(["--database-url", other], environ={"PETRI_DATABASE_URL": URL})
    assert config.database_url == other


def test_a_url_of_another_database_is_refused_without_echoing_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_config([], environ={"PETRI_DATABASE_URL": "mysql://root:s3cret-pw@db/petri"})
    err = capsys.readouterr().err
    assert "PETRI_DATABASE_URL: must be empty (SQLite) or a postgresql:// URL" in err
    assert "s3cret" not in err


def test_the_help_tells_of_the_option_and_its_variable() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--database-url" in text and "PETRI_DATABASE_URL" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql:///petri?host=/run/pg", "postgresql:///petri?host=/run/pg"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql://u@h/db?password=pw&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql://u@h/db?pass%77ord=pw", "postgresql://u@h/db?password=***"),
        ("host=/run/pg password='p w' dbname=petri", "host=/run/pg password=*** dbname=petri"),
        # Careless passwords, not percent-encoded: a URL parser cuts them short (or fails).
        ("postgresql://u:pa/ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa#ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa?ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pa@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:pass@[::1/db", "postgresql://u:***@[::1/db"),
        ("", ""),
    ],
)
def test_urls_are_shown_with_their_passwords_masked(url: str, shown: str) -> None:
    assert redact_url(url) == shown
