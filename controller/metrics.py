"""Every metric the controller exports, defined here and nowhere else (docs/metrics.md lists them).

One `Metrics` per controller, on a registry of its own (tests run several controllers in one
process). The domain records events through its methods; the API's interceptor records the
gRPC server's figures; `serve_metrics` exposes them over HTTP for Prometheus to scrape.

No metric has a label per sandbox or per project: the labels' values are bounded (methods,
status codes, states, the configured pool kinds), so the number of series is too.
"""

import asyncio
import concurrent.futures
import contextlib
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from threading import Thread
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from controller.records import State
from petri.v1 import execution_pb2

log = structlog.get_logger()

# Seconds: from a `1+1` round trip (about 2 ms) to a long execution or a slow create.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 3600.0,
)  # fmt: skip
# Checkpoint sizes: from an empty namespace (kilobytes) to a full 1 GiB workspace and more.
SIZE_BUCKETS = tuple(float(1 << shift) for shift in range(10, 36, 2))
# The longest execution time recorded: the longest timeout (1 h by default) and its grace.
MAX_EXECUTION_SECONDS = 86400.0
# How long a scrape waits for the registry's counts before it leaves them out.
SCRAPE_COUNT_TIMEOUT = 5.0
# The metrics endpoint's connections: at most this many at once (Prometheus needs one), each
# closed after this long without a byte, so that no client can use up the controller's fds.
MAX_SCRAPE_CONNECTIONS = 16
SCRAPE_IDLE_SECONDS = 10.0

# Execution outcomes: "ok" or the lower-case name of petri.v1.ExecutionError.Kind.
_ERROR_KINDS = {1: "exception", 2: "timeout", 3: "interpreter_exited", 4: "cancelled"}


class GrpcMetrics:
    """The standard server metrics of go-grpc-prometheus and py-grpc-prometheus."""

    def __init__(self, registry: CollectorRegistry) -> None:
        method = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started",
            "RPCs started on the server.",
            method,
            registry=registry,
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            [*method, "grpc_code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its status, on the server.",
            method,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received",
            "Request messages received on the server.",
            method,
            registry=registry,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent",
            "Response messages sent by the server.",
            method,
            registry=registry,
        )


@dataclass(frozen=True)
class PoolFigures:
    """One warm pool kind: its current target (its configured size, or what it learned from
    demand) and its members ready now."""

    profile: str
    runtime: str
    target: int
    ready: int


class _LiveCollector(Collector):
    """Gauges read when Prometheus scrapes: sandboxes by state, the warm pool's members."""

    def __init__(self) -> None:
        self.count_states: Callable[[], Awaitable[Mapping[State, int]]] | None = None
        self.pool: Callable[[], list[PoolFigures]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # The count under way, which concurrent scrapes share: a store that hangs, or a
        # flood of scrapes, then has one count to answer, not one per scrape ever made.
        self._counting: concurrent.futures.Future[Mapping[State, int]] | None = None
        self._counting_lock = threading.Lock()

    def _count(self) -> Mapping[State, int]:
        assert self.count_states is not None and self.loop is not None
        with self._counting_lock:
            if self._counting is None or self._counting.done():
                self._counting = asyncio.run_coroutine_threadsafe(
                    _awaited(self.count_states), self.loop
                )
            counting = self._counting
        return counting.result(SCRAPE_COUNT_TIMEOUT)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        # Called on the HTTP server's thread: the registry is the event loop's.
        if self.count_states is not None and self.loop is not None:
            states = GaugeMetricFamily(
                "petri_sandboxes",
                "Sandboxes in the registry by state (warm pool members are WARMING or POOLED; "
                "tombstones are not counted).",
                labels=["state"],
            )
            try:
                counts = self._count()
            except Exception as exc:  # a scrape must not fail for it: the gauge is left out
                log.warning("could not count the sandboxes for a scrape", error=str(exc))
            else:
                for state in State:
                    if state is not State.DELETED:
                        states.add_metric([state.name], counts.get(state, 0))
                yield states
        if self.pool is not None:
            target = GaugeMetricFamily(
                "petri_warm_pool_target",
                "Current target size of each warm pool kind: its configured size, or, for a "
                "kind that learns, what recent demand asks within its bounds and the budget.",
                labels=["profile", "runtime"],
            )
            ready = GaugeMetricFamily(
                "petri_warm_pool_ready",
                "Warm pool members started, preloaded and waiting to be claimed.",
                labels=["profile", "runtime"],
            )
            for kind in self.pool():
                target.add_metric([kind.profile, kind.runtime], kind.target)
                ready.add_metric([kind.profile, kind.runtime], kind.ready)
            yield target
            yield ready


async def _awaited(fn: Callable[[], Awaitable[Mapping[State, int]]]) -> Mapping[State, int]:
    return await fn()


class Metrics:
    """The controller's metrics; cheap to record into whether or not anything scrapes them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `_created` series beside each counter and histogram: they double a scrape and
        # say only when the controller started (process-wide, and the same for every one).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.grpc = GrpcMetrics(r)
        self._live = _LiveCollector()
        r.register(self._live)
        self.creates = Counter(
            "petri_sandbox_creates",
            "CreateSandbox calls that made a sandbox (replays of a request_id excluded), by "
            "source (pool: a warm pool member was claimed; cold: a container was started) and "
            "outcome (ok, error).",
            ["source", "outcome"],
            registry=r,
        )
        self.create_seconds = Histogram(
            "petri_sandbox_create_seconds",
            "Time to make a sandbox RUNNING, by source (pool or cold).",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.executions = Counter(
            "petri_executions",
            "Executions that returned a result, by outcome: ok, exception, timeout, "
            "interpreter_exited, cancelled.",
            ["outcome"],
            registry=r,
        )
        self.execution_seconds = Histogram(
            "petri_execution_seconds",
            "Run time of executions' code, as the executor measured it.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.namespace_resets = Counter(
            "petri_namespace_resets",
            "Executions during which the interpreter was replaced (its variables are gone).",
            registry=r,
        )
        self.input_bytes = Counter(
            "petri_execution_input_bytes",
            "Bytes of input files sent into sandboxes with executions.",
            registry=r,
        )
        self.output_bytes = Counter(
            "petri_execution_output_bytes",
            "Bytes of executions' events returned (stdout, stderr, rich outputs, files), as "
            "encoded.",
            registry=r,
        )
        self.podman_errors = Counter(
            "petri_podman_errors",
            "Podman calls that failed in a way that says podman may be unwell (not answering, "
            "or a server error), by podman service (runc, gvisor).",
            ["service"],
            registry=r,
        )
        self.pauses = Counter(
            "petri_pauses",
            "Pauses (PauseSandbox, auto-pause, shutdown), by outcome (ok, error).",
            ["outcome"],
            registry=r,
        )
        self.pause_seconds = Histogram(
            "petri_pause_seconds",
            "Time to pause a sandbox: save its checkpoint and remove its container.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.resumes = Counter(
            "petri_resumes",
            "Resumes (ResumeSandbox, or an execution on a PAUSED sandbox), by outcome.",
            ["outcome"],
            registry=r,
        )
        self.resume_seconds = Histogram(
            "petri_resume_seconds",
            "Time to resume a sandbox from its checkpoint into a container.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.checkpoint_bytes = Histogram(
            "petri_checkpoint_bytes",
            "Size of each checkpoint written (pauses and idle checkpoints).",
            buckets=SIZE_BUCKETS,
            registry=r,
        )
        self.create_queue = Gauge(
            "petri_create_queue",
            "Container starts (creates, resumes, warm pool refills) waiting now for one of "
            "the server's starts at once (--max-concurrent-creates).",
            registry=r,
        )
        self.create_queue_seconds = Histogram(
            "petri_create_queue_seconds",
            "Time a container start waited for a slot, by what it was for: create, resume, "
            "refill (the warm pool's).",
            ["waiter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.pool_hits = Counter(
            "petri_warm_pool_hits",
            "Creates and resumes of a pooled kind that found a ready member.",
            ["profile", "runtime"],
            registry=r,
        )
        self.pool_misses = Counter(
            "petri_warm_pool_misses",
            "Creates and resumes of a pooled kind that found no ready member (a cold start).",
            ["profile", "runtime"],
            registry=r,
        )
        self._executions_ok = self.executions.labels("ok")

    def __repr__(self) -> str:
        return f"<Metrics {self.registry!r}>"

    # --- what the registry and the pool report at scrape time ----------------------------

    def watch_live(
        self,
        loop: asyncio.AbstractEventLoop,
        count_states: Callable[[], Awaitable[Mapping[State, int]]],
        pool: Callable[[], list[PoolFigures]],
    ) -> None:
        self._live.loop = loop
        self._live.count_states = count_states
        self._live.pool = pool

    def watch_create_queue(self, waiting: Callable[[], int]) -> None:
        """Reads the starts waiting for a slot at each scrape (lengths only: thread-safe)."""
        self.create_queue.set_function(lambda: float(waiting()))

    # --- the domain's events --------------------------------------------------------------

    def created(self, source: str, seconds: float, ok: bool) -> None:
        self.creates.labels(source, "ok" if ok else "error").inc()
        if ok:
            self.create_seconds.labels(source).observe(seconds)

    def execution_result(self, kind: int, seconds: float, namespace_reset: bool) -> None:
        """`kind`: the result's ExecutionError.Kind (0 when the code completed normally);
        `seconds` as the executor says, so bounded here (an executor is not trusted)."""
        if kind:
            self.executions.labels(_ERROR_KINDS.get(kind, "other")).inc()
        else:
            self._executions_ok.inc()
        self.execution_seconds.observe(min(max(seconds, 0.0), MAX_EXECUTION_SECONDS))
        if namespace_reset:
            self.namespace_resets.inc()

    def counted_inputs(
        self, chunks: AsyncIterator[execution_pb2.FileChunk]
    ) -> AsyncIterator[execution_pb2.FileChunk]:
        """`chunks`, their bytes counted as they pass (closing them stays their owner's)."""
        return _CountedChunks(chunks, self.input_bytes)

    @contextlib.contextmanager
    def timing(self, counter: Counter, histogram: Histogram) -> Iterator[None]:
        """Counts what the block does by outcome, and times it when it succeeds."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            counter.labels("error").inc()
            raise
        counter.labels("ok").inc()
        histogram.observe(time.perf_counter() - started)


class GatewayMetrics:
    """A gateway's metrics: the gRPC server's, the live nodes it routes to, and what became of
    the calls it forwarded (no label per node, sandbox or project)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.grpc = GrpcMetrics(r)
        self.live_nodes = Gauge(
            "petri_gateway_live_nodes",
            "Nodes whose heartbeat is recent enough for the gateway to send them calls.",
            registry=r,
        )
        self.forwarded = Counter(
            "petri_gateway_forwarded",
            "Calls by what the gateway did with them: forwarded (sent to a node, whatever it "
            "answered; once per node tried), unreachable (answered UNAVAILABLE by the gateway: "
            "no live node, or none reached in time; nothing was forwarded), retried (a create "
            "with a request_id that a node answered UNAVAILABLE, made again on another).",
            ["outcome"],
            registry=r,
        )
        self.reached = self.forwarded.labels("forwarded")
        self.unreachable = self.forwarded.labels("unreachable")
        self.retried = self.forwarded.labels("retried")

    def __repr__(self) -> str:
        return f"<GatewayMetrics {self.registry!r}>"

    def watch_nodes(self, live: Callable[[], int]) -> None:
        """Reads the live nodes' count at each scrape (a length: thread-safe)."""
        self.live_nodes.set_function(lambda: float(live()))


class _CountedChunks:
    def __init__(self, chunks: AsyncIterator[execution_pb2.FileChunk], counter: Counter) -> None:
        self._chunks = chunks
        self._counter = counter

    def __aiter__(self) -> "_CountedChunks":
        return self

    async def __anext__(self) -> execution_pb2.FileChunk:
        chunk = await anext(self._chunks)
        self._counter.inc(len(chunk.data))
        return chunk


@dataclass
class MetricsServer:
    """The HTTP server Prometheus scrapes (prometheus_client's, on a thread of its own)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


class _ScrapeHandler(WSGIRequestHandler):
    # A connection silent this long is closed: else each one idle holds a thread and a
    # descriptor of the controller for ever (a thousand would leave it no descriptor).
    timeout = SCRAPE_IDLE_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        """Logs nothing (a scrape every few seconds)."""


class _BoundedServer(ThreadingWSGIServer):
    """prometheus_client's threaded server, serving at most MAX_SCRAPE_CONNECTIONS
    connections at once: any more are closed as they come, without a thread."""

    request_queue_size = 64  # those beyond the limit are closed at once, not left to retry

    def __init__(self, address: tuple[str, int], handler: type[WSGIRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPE_CONNECTIONS)
        super().__init__(address, handler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nothing else will give the slot back
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went quiet or away is not worth a traceback (any client can cause
        one); anything else is logged."""
        error = sys.exc_info()[1]
        if not isinstance(error, (TimeoutError, ConnectionError)):
            log.warning("the metrics endpoint failed a request", error=repr(error))

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def serve_metrics(metrics: Metrics | GatewayMetrics, host: str, port: int) -> MetricsServer:
    """Serves the metrics on host:port (port 0: a free one), without authentication."""

    class Server(_BoundedServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(
        host, port, make_wsgi_app(metrics.registry), Server, handler_class=_ScrapeHandler
    )
    thread = Thread(target=server.serve_forever, name="petri-metrics", daemon=True)
    thread.start()
    return MetricsServer(server, thread)
