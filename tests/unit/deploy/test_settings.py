"""Every PETRI_* setting deploy/ sets is one the controller knows, with a value it accepts: a
misspelt name would be ignored silently, a bad value would stop every pod or unit at start."""

import re
from dataclasses import fields
from pathlib import Path

import pytest

from controller.config import Config, load_config

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"

# Issue 17's settings of the multi-node roles, which the code built beside these manifests
# adds to Config (once there, they are checked like the rest).
MULTI_NODE = {"PETRI_ROLE", "PETRI_DATABASE_URL", "PETRI_NODE_NAME", "PETRI_NODE_ADDRESS"}
CONFIG = {"PETRI_" + f.name.upper() for f in fields(Config)}

_ENV_LINE = re.compile(r"^#?(PETRI_[A-Z0-9_]+)=(.*)$")
_MANIFEST_ENV = re.compile(r"^\s*- name: (PETRI_[A-Z0-9_]+)\s*$")
_UNIT_ENV = re.compile(r"^Environment=(PETRI_[A-Z0-9_]+)=")


def env_files() -> list[Path]:
    return sorted(DEPLOY.glob("kubernetes/**/*.env")) + sorted(DEPLOY.glob("systemd/*.env.example"))


def settings(path: Path) -> dict[str, str]:
    """PETRI_NAME=value lines of an env file, commented-out suggestions included."""
    found = {}
    for line in path.read_text().splitlines():
        match = _ENV_LINE.match(line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def names_set() -> dict[str, set[str]]:
    """Each PETRI_* name deploy/ sets, with the files that set it."""
    where: dict[str, set[str]] = {}
    sources = [(p, _ENV_LINE) for p in env_files()]
    sources += [(p, _MANIFEST_ENV) for p in sorted(DEPLOY.glob("kubernetes/**/*.yaml"))]
    sources += [(p, _UNIT_ENV) for p in sorted(DEPLOY.glob("systemd/*.service"))]
    for path, pattern in sources:
        for line in path.read_text().splitlines():
            match = pattern.match(line.strip() if pattern is _ENV_LINE else line)
            if match:
                where.setdefault(match.group(1), set()).add(str(path.relative_to(DEPLOY)))
    return where


def unknown(names: set[str]) -> set[str]:
    return names - CONFIG - MULTI_NODE


def test_the_name_check_catches_a_misspelt_setting() -> None:
    assert unknown({"PETRI_LISTN", "PETRI_LISTEN", "PETRI_ROLE"}) == {"PETRI_LISTN"}


def test_deploy_sets_only_settings_the_controller_knows() -> None:
    where = names_set()
    # The regexes do find the settings in each kind of file.
    assert {"PETRI_ROLE", "PETRI_LISTEN", "PETRI_DATABASE_URL", "PETRI_TOKENS_FILE"} <= set(where)
    assert any(f.startswith("systemd/") and f.endswith(".service") for f in where["PETRI_ROLE"])
    assert any(f.endswith(".yaml") for f in where["PETRI_ROLE"])
    bad = {name: sorted(where[name]) for name in unknown(set(where))}
    assert not bad, f"not settings of python -m controller: {bad}"


@pytest.mark.parametrize("path", env_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_env_file_values_parse(path: Path) -> None:
    values = settings(path)
    assert values, f"{path} sets nothing"
    # The settings Config has today are parsed and cross-checked as the controller does at
    # start (SystemExit with the problem otherwise).
    load_config([], {name: value for name, value in values.items() if name in CONFIG})
