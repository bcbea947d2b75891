"""A real PostgreSQL for the tests, started by scripts/postgres in a temporary directory (unix
socket only) and stopped after: the registry's tests run against it as against SQLite."""

import glob
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "postgres"


def server_installed() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb"))


class Cluster:
    """A cluster in `directory`, driven by scripts/postgres."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = ""

    def __repr__(self) -> str:
        return f"<Cluster {self.directory} url={self.url!r}>"

    def start(self) -> str:
        done = subprocess.run(
            [SCRIPT, "start", self.directory], capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"scripts/postgres start failed: {done.stderr[-2000:]}")
        self.url = done.stdout.strip()
        return self.url

    def stop(self) -> None:
        subprocess.run([SCRIPT, "stop", self.directory], check=True, timeout=120)


def cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's cluster; skipped without PostgreSQL's server, unless the environment
    says it must be there (PETRI_REQUIRE_POSTGRES, set by CI)."""
    if not server_installed():
        message = "PostgreSQL's server is not installed (apt-get install postgresql)"
        if os.environ.get("PETRI_REQUIRE_POSTGRES"):
            pytest.fail(message)
        pytest.skip(message)
    cluster = Cluster(tmp_path_factory.mktemp("pg"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def fresh_database(url: str) -> Iterator[str]:
    """A URL of the cluster's database `petri` where every table is new: a schema of its
    own first on the search path, dropped after."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{url}&options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
