"""`python -m controller` in role gateway: the gateway, on the registry in PostgreSQL, with no
podman and no node yet; SIGTERM stops it."""

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.store import pg_schema
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.postgres import fresh_database

ROOT = Path(__file__).resolve().parents[3]
START_SECONDS = 30.0


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _serving(channel: grpc.aio.Channel, process: asyncio.subprocess.Process) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        assert process.returncode is None, "the gateway exited"
        with contextlib.suppress(grpc.aio.AioRpcError):
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        await asyncio.sleep(0.1)


async def test_role_gateway_serves_and_stops_on_sigterm(tmp_path: Path, database: str) -> None:
    port = _free_port()
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")]),
        "PETRI_ROLE": "gateway",
        "PETRI_DATABASE_URL": database,
        "PETRI_LISTEN": f"127.0.0.1:{port}",
        "PETRI_STATE_DIR": str(tmp_path / "state"),
        "PETRI_RUNTIME_DIR": str(tmp_path / "run"),
        "PETRI_PODMAN_BINARY": str(tmp_path / "no-podman"),  # a gateway runs none
    }
    log = tmp_path / "gateway.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", cwd=ROOT, env=environ, stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(_serving(channel, process), START_SECONDS)
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent="projects/p"))
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() == "no petri node is available; retry"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0, log.read_text()
        assert "gateway listening" in log.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("newer_schema", [False, True])
async def test_a_database_it_cannot_use_is_said_without_a_traceback(
    tmp_path: Path, database: str, newer_schema: bool
) -> None:
    # It was a Python traceback, the message on its last line.
    if newer_schema:
        async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
            await pg_schema.migrate(conn)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES (999)")
        url, expected = database, "has schema version 999, newer than this controller's"
    else:
        url = "postgresql://petri:s3cr3t@127.0.0.1:1/petri"
        expected = "cannot reach the registry's database postgresql://petri:***@127.0.0.1:1/petri"
    environ = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "client")]),
        "PETRI_ROLE": "gateway",
        "PETRI_DATABASE_URL": url,
        "PETRI_LISTEN": "127.0.0.1:0",
        "PETRI_STATE_DIR": str(tmp_path / "state"),
        "PETRI_RUNTIME_DIR": str(tmp_path / "run"),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", cwd=ROOT, env=environ,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), START_SECONDS)
    assert process.returncode == 1
    said = err.decode()
    assert said.startswith("petri controller: ") and "Traceback" not in said, said
    assert expected in said and "s3cr3t" not in said
