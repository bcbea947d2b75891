"""Metrics: the gRPC server's codes as callers get them (OK, an abort's code, INTERNAL for the
servicer's unexpected error, UNKNOWN for an exception grpc.aio answers, CANCELLED, refusals by
the request guard), petri's own figures, and the configuration that turns them on."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from controller.api.grpc_metrics import ServerMetrics
from controller.app import start_controller
from controller.config import Config, load_config
from controller.metrics import MAX_SCRAPE_CONNECTIONS, Metrics, serve_metrics
from controller.records import State
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2
from tests.unit.controller.inprocess import (
    Petri,
    eventually,
    expect,
    fast_config,
    fast_petri,
    short_runtime_dir,
    wait_until,
)
from tests.unit.controller.standin_executor import Execution, Hang, sends

SERVICE = "petri.v1.SandboxService"
Samples = list[tuple[str, dict[str, str], float]]


def scrape(port: int) -> Samples:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(v for n, have, v in samples if n == name and labels.items() <= have.items())


def handled(samples: Samples, method: str, code: str) -> float:
    return value(samples, "grpc_server_handled_total", grpc_method=method, grpc_code=code)


async def scraped(petri: Petri) -> Samples:
    server = petri.controller.metrics_server
    assert server is not None
    return await asyncio.to_thread(scrape, server.port)


def test_metrics_and_tracing_are_off_by_default() -> None:
    config = load_config([], environ={})
    assert (config.metrics_listen, config.otel_tracing) == ("", False)


@pytest.mark.parametrize("bad", ["9464", "localhost", "127.0.0.1:http", "[::1]:70000", ":9464"])
def test_a_bad_metrics_address_is_refused(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(["--metrics-listen", bad], environ={})
    assert "--metrics-listen" in capsys.readouterr().err


def test_good_metrics_addresses_are_taken() -> None:
    for good in ("127.0.0.1:9464", "[::1]:9464", "localhost:0"):
        assert load_config(["--metrics-listen", good], environ={}).metrics_listen == good


async def test_a_controller_without_metrics_serves_none(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:
        assert petri.controller.metrics_server is None


async def test_tracing_without_opentelemetry_is_refused_at_startup(tmp_path: Path) -> None:
    with pytest.MonkeyPatch.context() as patch, short_runtime_dir() as runtime_dir:
        # As if the [otel] extra were not installed (None in sys.modules fails an import).
        patch.setitem(sys.modules, "opentelemetry.instrumentation.grpc", None)
        config = fast_config(tmp_path / "state", runtime_dir, otel_tracing=True)
        with pytest.raises(ValueError, match=r"pip install 'petri\[otel\]'"):
            await start_controller(config)


async def test_calls_are_counted_by_the_code_their_caller_got(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, metrics_listen="127.0.0.1:0") as petri:
        before = await scraped(petri)
        # Every method is there with OK from the start, at zero.
        assert handled(before, "ListImageProfiles", "OK") == 0
        assert (
            "grpc_server_handled_total",
            {
                "grpc_type": "bidi_stream",
                "grpc_service": SERVICE,
                "grpc_method": "StreamExecuteCode",
                "grpc_code": "OK",
            },
            0.0,
        ) in before

        sandbox = await petri.create()
        await petri.execute(sandbox.name, "1+1")
        await petri.execute(sandbox.name, "2+2")
        # An abort by the request guard (the domain's NotFound).
        await expect(petri.get("projects/fast/sandboxes/nothing"), grpc.StatusCode.NOT_FOUND)
        # A bad name: the domain's InvalidArgument, aborted with its code.
        await expect(
            petri.stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name="x" * 10)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )

        # The servicer's answer to an unexpected error: INTERNAL.
        def broken(*args: Any) -> NoReturn:
            raise RuntimeError("a bug")

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(petri.controller.manager, "get", broken)
            await expect(petri.get(sandbox.name), grpc.StatusCode.INTERNAL)

        # A caller that goes away mid-call: CANCELLED.
        hang = Hang()
        petri.runtime.scripts["hang"] = hang
        call = petri.stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="hang")
        )
        await hang.began.wait()
        call.cancel()
        await asyncio.wait_for(hang.interrupted.wait(), 5)

        async def counted() -> Samples | None:
            samples = await scraped(petri)
            return samples if handled(samples, "ExecuteCode", "CANCELLED") else None

        samples = await eventually(counted, "the cancelled call to be counted")
        assert handled(samples, "ExecuteCode", "OK") == 2
        assert handled(samples, "CreateSandbox", "OK") == 1
        assert handled(samples, "GetSandbox", "NOT_FOUND") == 1
        assert handled(samples, "GetSandbox", "INVALID_ARGUMENT") == 1
        assert handled(samples, "GetSandbox", "INTERNAL") == 1
        assert handled(samples, "ExecuteCode", "CANCELLED") == 1
        started = value(samples, "grpc_server_started_total", grpc_method="ExecuteCode")
        assert started == 3
        assert value(samples, "grpc_server_handling_seconds_count", grpc_method="ExecuteCode") == 3
        assert value(samples, "grpc_server_msg_received_total", grpc_method="ExecuteCode") == 3
        assert value(samples, "grpc_server_msg_sent_total", grpc_method="ExecuteCode") == 2
        # petri's own: the sandbox by state, its executions, its create.
        assert value(samples, "petri_sandboxes", state="RUNNING") == 1
        assert value(samples, "petri_sandboxes", state="PAUSED") == 0
        assert value(samples, "petri_executions_total", outcome="ok") == 2
        assert value(samples, "petri_execution_seconds_count") == 2
        assert value(samples, "petri_sandbox_creates_total", source="cold", outcome="ok") == 1
        assert value(samples, "petri_sandbox_create_seconds_count", source="cold") == 1


async def test_streams_and_execution_figures_are_counted(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, metrics_listen="127.0.0.1:0") as petri:
        sandbox = await petri.create()

        def timed_out(execution: Execution) -> list[Any]:
            error = execution_pb2.ExecutionError(kind=execution_pb2.ExecutionError.TIMEOUT)
            return [execution.result(error=error, namespace_reset=True)]

        petri.runtime.scripts["late"] = sends(timed_out)
        await petri.execute(sandbox.name, "late")

        async def stream() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
            start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code="streamed")
            yield sandbox_pb2.StreamExecuteCodeRequest(start=start)
            for part in (b"ab", b"cde"):
                chunk = execution_pb2.FileChunk(path="b.bin", data=part, final=part == b"cde")
                yield sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk)

        events = [e async for e in petri.stub.StreamExecuteCode(stream())]
        samples = await scraped(petri)
        method = "StreamExecuteCode"
        assert handled(samples, method, "OK") == 1
        assert value(samples, "grpc_server_msg_received_total", grpc_method=method) == 3
        assert value(samples, "grpc_server_msg_sent_total", grpc_method=method) == len(events)
        assert value(samples, "petri_executions_total", outcome="timeout") == 1
        assert value(samples, "petri_executions_total", outcome="ok") == 1
        assert value(samples, "petri_namespace_resets_total") == 1
        assert value(samples, "petri_execution_input_bytes_total") == 5
        assert value(samples, "petri_execution_output_bytes_total") > 0

        # A stream whose caller leaves after its first event: CANCELLED.
        hang = Hang()
        petri.runtime.scripts["hang"] = hang

        async def hanging() -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
            start = sandbox_pb2.ExecuteCodeStart(name=sandbox.name, code="hang")
            yield sandbox_pb2.StreamExecuteCodeRequest(start=start)

        call = petri.stub.StreamExecuteCode(hanging())
        first = await call.read()
        assert isinstance(first, sandbox_pb2.StreamExecuteCodeResponse), first
        assert first.stdout == "started\n"
        call.cancel()
        await asyncio.wait_for(hang.interrupted.wait(), 5)

        async def cancelled() -> Samples | None:
            samples = await scraped(petri)
            return samples if handled(samples, method, "CANCELLED") == 1 else None

        await eventually(cancelled, "the cancelled stream to be counted")


async def test_the_warm_pool_is_reported_by_kind(tmp_path: Path) -> None:
    pool = load_config(["--warm-pool", "size=1"], environ={}).warm_pool
    async with fast_petri(tmp_path, metrics_listen="127.0.0.1:0", warm_pool=pool) as petri:

        async def full() -> Samples | None:
            samples = await scraped(petri)
            # The pool counts a member ready as the registry records it POOLED: both, at once.
            ready = value(samples, "petri_warm_pool_ready") == 1
            return samples if ready and value(samples, "petri_sandboxes", state="POOLED") else None

        samples = await eventually(full, "the pool's member to be ready")
        assert value(samples, "petri_warm_pool_target", profile="test", runtime="runc") == 1
        assert value(samples, "petri_sandboxes", state="POOLED") == 1
        await petri.create()
        samples = await scraped(petri)
        assert value(samples, "petri_sandbox_creates_total", source="pool", outcome="ok") == 1


async def test_a_pool_that_learns_reports_its_hits_misses_and_target(tmp_path: Path) -> None:
    pool = load_config(["--warm-pool", "min=1,max=4"], environ={}).warm_pool
    async with fast_petri(tmp_path, metrics_listen="127.0.0.1:0", warm_pool=pool) as petri:
        kind = {"profile": "test", "runtime": "runc"}

        async def ready(count: int) -> Samples | None:
            samples = await scraped(petri)
            return samples if value(samples, "petri_warm_pool_ready") == count else None

        samples = await eventually(lambda: ready(1), "the pool's member to be ready")
        assert value(samples, "petri_warm_pool_target", **kind) == 1
        assert value(samples, "petri_create_queue") == 0
        petri.runtime.starts_open.clear()  # no refill ends before the burst has come
        burst = asyncio.gather(*(petri.create() for _ in range(4)))  # 1 hit, 3 misses
        await wait_until(lambda: petri.runtime.starts_waiting >= 3, "the misses' starts")
        petri.runtime.starts_open.set()
        await burst
        samples = await eventually(lambda: ready(4), "the pool to grow to the burst")
        assert value(samples, "petri_warm_pool_target", **kind) == 4
        assert value(samples, "petri_warm_pool_hits_total", **kind) == 1
        assert value(samples, "petri_warm_pool_misses_total", **kind) == 3
        assert value(samples, "petri_create_queue_seconds_count", waiter="create") == 3


async def test_an_exception_past_the_servicer_is_counted_unknown() -> None:
    """grpc.aio answers an exception a handler raises UNKNOWN; so do the metrics."""

    class Broken(health.aio.HealthServicer):  # type: ignore[misc]
        async def Check(self, request: Any, context: Any) -> NoReturn:
            raise RuntimeError("a bug")

    metrics = Metrics()
    descriptor = health_pb2.DESCRIPTOR.services_by_name["Health"]
    server = grpc.aio.server(interceptors=[ServerMetrics(metrics.grpc, [descriptor])])
    health_pb2_grpc.add_HealthServicer_to_server(Broken(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            await expect(stub.Check(health_pb2.HealthCheckRequest()), grpc.StatusCode.UNKNOWN)
    finally:
        await server.stop(None)
    labels = {"grpc_type": "unary", "grpc_service": "grpc.health.v1.Health", "grpc_method": "Check"}
    assert (
        metrics.registry.get_sample_value(
            "grpc_server_handled_total", {**labels, "grpc_code": "UNKNOWN"}
        )
        == 1
    )


def test_each_controller_has_a_registry_of_its_own() -> None:
    first, second = Metrics(), Metrics()
    first.executions.labels("ok").inc()
    assert first.registry.get_sample_value("petri_executions_total", {"outcome": "ok"}) == 1
    assert second.registry.get_sample_value("petri_executions_total", {"outcome": "ok"}) == 0
    assert Config().metrics_listen == ""


async def test_pauses_resumes_and_checkpoints_are_counted(tmp_path: Path) -> None:
    async with fast_petri(tmp_path, metrics_listen="127.0.0.1:0") as petri:
        sandbox = await petri.create()
        await petri.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=sandbox.name))
        paused = await scraped(petri)
        assert value(paused, "petri_sandboxes", state="PAUSED") == 1
        assert value(paused, "petri_pauses_total", outcome="ok") == 1
        assert value(paused, "petri_pause_seconds_count") == 1
        assert value(paused, "petri_checkpoint_bytes_count") == 1
        assert value(paused, "petri_checkpoint_bytes_sum") > 0
        await petri.stub.ResumeSandbox(sandbox_pb2.ResumeSandboxRequest(name=sandbox.name))
        resumed = await scraped(petri)
        assert value(resumed, "petri_sandboxes", state="RUNNING") == 1
        assert value(resumed, "petri_resumes_total", outcome="ok") == 1
        assert value(resumed, "petri_resume_seconds_count") == 1
        # A pause of a sandbox that cannot be paused is an error of the call, not a pause.
        await petri.delete(sandbox.name)
        await expect(
            petri.stub.PauseSandbox(sandbox_pb2.PauseSandboxRequest(name=sandbox.name)),
            grpc.StatusCode.NOT_FOUND,
        )
        assert value(await scraped(petri), "petri_pauses_total") == 1


def test_idle_connections_to_the_endpoint_neither_pile_up_nor_keep_scrapes_out(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Each connection held a thread and a descriptor for as long as its client kept it open:
    a thousand idle ones left the controller no descriptor for anything else."""
    monkeypatch.setattr("controller.metrics._ScrapeHandler.timeout", 0.5)
    served = serve_metrics(Metrics(), "127.0.0.1", 0)
    idle = []
    try:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(40):
            idle.append(socket.create_connection(("127.0.0.1", served.port)))
        # Every one of ours is open; of the server's side, at most its limit.
        assert len(os.listdir("/proc/self/fd")) - before <= 40 + MAX_SCRAPE_CONNECTIONS + 2
        # The idle ones are closed after the timeout: a scrape gets through again.
        deadline = time.monotonic() + 10
        while True:
            try:
                scrape(served.port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the endpoint stayed full of idle connections"
    finally:
        for connection in idle:
            connection.close()
        served.stop()
    assert "Traceback" not in capfd.readouterr().err


async def test_scrapes_share_one_count_of_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scrape asked the registry to count, and one that timed out left its count
    pending: a store that hangs piled one up per scrape, a flood of scrapes queued as many."""
    monkeypatch.setattr("controller.metrics.SCRAPE_COUNT_TIMEOUT", 0.05)
    metrics = Metrics()
    counts, release = [], asyncio.Event()

    async def count_states() -> dict[State, int]:
        counts.append(1)
        await release.wait()
        return {State.RUNNING: 3}

    metrics.watch_live(asyncio.get_running_loop(), count_states, list)

    def running() -> float | None:  # a scrape, on a thread as the HTTP server's
        return metrics.registry.get_sample_value("petri_sandboxes", {"state": "RUNNING"})

    for _ in range(3):  # each times out (the gauge left out), the count still under way
        assert await asyncio.to_thread(running) is None
    assert counts == [1]
    release.set()
    assert await asyncio.to_thread(running) == 3  # that count's answer, or a fresh one's
    done = len(counts)
    assert await asyncio.to_thread(running) == 3
    assert len(counts) == done + 1  # a finished count is never reused


async def test_a_files_read_counts_the_chunks_it_writes(tmp_path: Path) -> None:
    """ReadFile writes its chunks with context.write: each is a message sent."""
    async with fast_petri(tmp_path, metrics_listen="127.0.0.1:0") as petri:
        sandbox = await petri.create()
        executor = await petri.executor(sandbox.name)
        executor.files["f"] = b"abcdef"
        call = petri.stub.ReadFile(files_pb2.ReadFileRequest(name=sandbox.name, path="f"))
        chunks = [chunk async for chunk in call]
        samples = await scraped(petri)
        assert handled(samples, "ReadFile", "OK") == 1
        assert value(samples, "grpc_server_msg_sent_total", grpc_method="ReadFile") == len(chunks)
