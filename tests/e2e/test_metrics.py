"""Metrics as an operator gets them: a real Prometheus scrapes a controller's --metrics-listen
every second while real calls go into real sandboxes, and its query API reports them.

A controller of its own (beside the session's, on the same podman service) serves the
metrics: the session's counts every other test's calls, so no figure of it could be exact.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import tempfile
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e

PROMETHEUS = "prometheus"
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.25


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status, answer.read()
    except OSError:  # not listening yet (URLError is one)
        return 0, b""


@pytest.fixture(scope="module")
async def measured(e2e_config: Config, controller: Controller) -> AsyncIterator[Controller]:
    config = sibling_config(
        e2e_config,
        controller,
        "metrics",
        state_dir=e2e_config.state_dir / "metrics",
        metrics_listen="127.0.0.1:0",
    )
    running = await start_controller(config)
    yield running
    await running.stop(grace=1)


@pytest.fixture(scope="module")
def prometheus(measured: Controller) -> Iterator[str]:
    """A Prometheus of the test's own, scraping the controller every second; its URL."""
    binary = shutil.which(PROMETHEUS)
    if binary is None:
        pytest.fail("prometheus is not installed: scripts/bootstrap installs it (Debian package)")
    assert measured.metrics_server is not None
    work = Path(tempfile.mkdtemp(prefix="petri-prometheus-"))
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: petri\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{measured.metrics_server.port}']\n"
    )
    address = f"127.0.0.1:{_free_port()}"
    with open(work / "prometheus.log", "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield f"http://{address}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(work, ignore_errors=True)


async def query(prometheus: str, promql: str) -> float | None:
    """The value of an instant query that yields one series; None while it yields none."""
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    status, body = await asyncio.to_thread(_get, url)
    if status != 200:
        return None
    result = json.loads(body)["data"]["result"]
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


async def wait_for(prometheus: str, expected: dict[str, float]) -> None:
    """Until Prometheus answers each query with its expected value (it scrapes every second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while True:
        seen = {promql: await query(prometheus, promql) for promql in expected}
        if seen == expected:
            return
        if loop.time() > deadline:
            raise AssertionError(f"after {WAIT_SECONDS} s Prometheus reports {seen}")
        await asyncio.sleep(POLL_SECONDS)


async def test_prometheus_scrapes_calls_executions_and_states(
    measured: Controller, prometheus: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{measured.port}") as channel:
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        await wait_for(prometheus, {'up{job="petri"}': 1.0})
        created = [
            await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
            for _ in range(2)
        ]
        name = created[0].name
        for _ in range(3):
            assert value_of(await execute(stub, name, "1+1")) == "2"
        raised = await execute(stub, name, "raise ValueError('no')")
        assert raised.error.ename == "ValueError"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=f"{PARENT}/sandboxes/none"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        await stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=created[1].name))

        handled = "grpc_server_handled_total"
        await wait_for(
            prometheus,
            {
                f'{handled}{{grpc_method="ExecuteCode",grpc_code="OK"}}': 4.0,
                f'{handled}{{grpc_method="CreateSandbox",grpc_code="OK"}}': 2.0,
                f'{handled}{{grpc_method="GetSandbox",grpc_code="NOT_FOUND"}}': 1.0,
                'grpc_server_handling_seconds_count{grpc_method="ExecuteCode"}': 4.0,
                'petri_executions_total{outcome="ok"}': 3.0,
                'petri_executions_total{outcome="exception"}': 1.0,
                'petri_sandbox_creates_total{source="cold",outcome="ok"}': 2.0,
                'petri_sandboxes{state="RUNNING"}': 1.0,
                'petri_sandboxes{state="PAUSED"}': 1.0,
                'petri_pauses_total{outcome="ok"}': 1.0,
                "petri_checkpoint_bytes_count": 1.0,
            },
        )
        # A PromQL an operator would use: the success ratio of ExecuteCode over the run.
        ratio = await query(
            prometheus,
            f'sum({handled}{{grpc_method="ExecuteCode",grpc_code="OK"}}) / '
            f'sum({handled}{{grpc_method="ExecuteCode"}})',
        )
        assert ratio == 1.0

        for sandbox in created:
            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
        await wait_for(prometheus, {'sum(petri_sandboxes{state=~"RUNNING|PAUSED"})': 0.0})
