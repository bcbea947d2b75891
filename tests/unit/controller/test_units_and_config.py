from datetime import timedelta
from pathlib import Path

import pytest

from controller.config import load_config
from controller.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300", timedelta(seconds=300)),
        ("90s", timedelta(seconds=90)),
        ("5m", timedelta(minutes=5)),
        ("1h", timedelta(hours=1)),
        ("14d", timedelta(days=14)),
        ("250ms", timedelta(milliseconds=250)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_sizes() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1GB") == 10**9
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("lots")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(days=14), "14d"),
        (timedelta(minutes=5), "5m"),
        (timedelta(days=14, seconds=1), "14d 0h 0m 1s"),
        (timedelta(seconds=90), "1m 30s"),
        (timedelta(hours=1, seconds=0.5), "1h 0m 0.5s"),
        (timedelta(seconds=3.25), "3.25s"),
        (timedelta(0), "0s"),
        (timedelta(seconds=-5), "-5s"),
    ],
)
def test_format_duration_reads_like_a_person_writes_it(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


def test_min_memory_bounds_default_memory(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--default-memory", "64MiB"], environ={})
    assert "between min_memory and max_memory" in capsys.readouterr().err


def test_defaults_listen_on_loopback() -> None:
    config = load_config([], environ={})
    assert config.listen == "127.0.0.1:50051"
    assert config.max_ttl == timedelta(days=14)


def test_flags_win_over_environment(tmp_path: Path) -> None:
    environ = {"PETRI_LISTEN": "127.0.0.1:7000", "PETRI_STATE_DIR": str(tmp_path)}
    config = load_config(["--listen", "127.0.0.1:8000"], environ=environ)
    assert config.listen == "127.0.0.1:8000"
    assert config.state_dir == tmp_path
    assert config.database_path == tmp_path / "petri.db"


def test_bad_values_stop_with_a_message_naming_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_config([], environ={"PETRI_DEFAULT_TTL": "forever"})
    assert "PETRI_DEFAULT_TTL" in capsys.readouterr().err


def test_max_ttl_cannot_exceed_fourteen_days(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--max-ttl", "15d"], environ={})
    assert "at most 14d" in capsys.readouterr().err
