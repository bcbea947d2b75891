"""Assembles and runs the controller: registry, podman, sandbox manager, gRPC server.

`start_controller(config)` returns a running Controller (tests bind port 0 and talk to it
in-process); `serve(config)` runs one until SIGTERM or SIGINT, then shuts down gracefully.
"""

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import Counter

from controller.api.grpc_metrics import ServerMetrics
from controller.api.interceptors import (
    Behaviour,
    Context,
    Handler,
    RequestGuard,
)
from controller.api.node_transfer import METHOD as TRANSFER_METHOD
from controller.api.node_transfer import GrpcTransfer, transfer_handler
from controller.api.servicer import SandboxService
from controller.api.transport import (
    EXCLUSIVE_PORT,
    host_port,
    is_loopback,
    listen_on,
    open_methods,
    ping_acceptance,
    request_budget,
    server_credentials,
    tokens_for,
)
from controller.clock import utcnow
from controller.config import Config, parse_host_port
from controller.metrics import Metrics, MetricsServer, PoolFigures, serve_metrics
from controller.records import PUBLIC_STATES
from controller.runtime.container import LABEL_MANAGED, LABEL_REGISTRY, ContainerRuntime
from controller.runtime.gvisor import SECCOMP_PROFILE as GVISOR_SECCOMP_PROFILE
from controller.runtime.gvisor import runsc_wrapper
from controller.runtime.podman import PodmanRuntime
from controller.runtime.podman_service import PodmanHealth, PodmanService
from controller.sandboxes.manager import SandboxManager
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.reaper import TtlReaper
from controller.sandboxes.results import OutputLimits
from controller.sandboxes.warm_pool import mem_available
from controller.store.registry import Registry
from controller.store.sqlite import SqliteRegistry
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from controller.store.nodes import PostgresNodes

log = structlog.get_logger()

SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# On shutdown, in-flight calls get this long to finish before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 10.0


@dataclass
class Controller:
    config: Config
    server: grpc.aio.Server
    port: int
    manager: SandboxManager
    registry: Registry
    runtime: ContainerRuntime
    podman_service: PodmanService | None
    gvisor_service: PodmanService | None
    health: health.aio.HealthServicer
    reaper: TtlReaper
    # Whether each podman service can start containers; health is SERVING when all can.
    podman_health: tuple[PodmanHealth, ...] = ()
    # The Prometheus endpoint, when metrics_listen asks for one.
    metrics_server: MetricsServer | None = None
    # Exports the spans still buffered and stops the exporter, when otel_tracing is on.
    stop_tracing: Callable[[], object] | None = None
    # A node's channels to other nodes, for moving its sandboxes (role node).
    transfer: GrpcTransfer | None = None

    def __repr__(self) -> str:
        return f"<Controller port={self.port} {self.manager!r}>"

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        for watch in self.podman_health:  # nothing restarts a service being stopped
            await watch.stop()
        self.reaper.stop()
        await self.manager.stop_moves()
        beating = asyncio.create_task(self.reaper.keep_beating(), name="heartbeat-while-stopping")
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
        await self.server.stop(grace)
        if self.stop_tracing is not None:  # blocks until the last spans are sent or time out
            await asyncio.to_thread(self.stop_tracing)
        if not self.config.keep_running_on_shutdown:
            await self.manager.pause_all(self.config.shutdown_pause_timeout.total_seconds())
        await self.manager.close()
        if self.transfer is not None:
            await self.transfer.close()
        await self.runtime.close()
        for service in (self.podman_service, self.gvisor_service):
            if service is not None:
                await service.stop()
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
        await self.registry.close()
        log.info("controller stopped")


async def _start_gvisor(config: Config) -> tuple[PodmanService | None, PodmanRuntime | None]:
    """A second podman service whose containers run under gVisor, when runsc is installed."""
    wrapper = runsc_wrapper(config.runsc_binary, config.state_dir)
    if wrapper is None:
        if config.default_runtime == "gvisor":
            raise ValueError(
                f"default_runtime is gvisor but {config.runsc_binary!r} is not installed"
            )
        log.info("gVisor is not available: runsc is not installed", runsc=config.runsc_binary)
        return None, None
    service = PodmanService(
        config.podman_binary,
        config.runtime_dir / "podman-gvisor.sock",
        config.state_dir / "podman-gvisor-service.log",
        oci_runtime=wrapper,
    )
    await service.start()
    return service, PodmanRuntime(service.socket_path, seccomp_profile=GVISOR_SECCOMP_PROFILE)


def _watch_podman(
    config: Config,
    manager: SandboxManager,
    health_servicer: health.aio.HealthServicer,
    runtimes: list[tuple[str, PodmanRuntime, PodmanService | None, int]],
) -> tuple[PodmanHealth, ...]:
    """A PodmanHealth per podman service (runc's, gVisor's), each probing with the default
    image as a sandbox of its runtime would run it, and one health status for all."""
    image = config.image_for(config.default_image_profile)
    labels = {LABEL_MANAGED: "true", LABEL_REGISTRY: manager.registry_label}
    watches: list[PodmanHealth] = []

    async def publish() -> None:
        serving = all(watch.healthy for watch in watches)
        status = health_pb2.HealthCheckResponse.SERVING if serving else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, status)

    for name, runtime, service, userns_size in runtimes:
        probe = functools.partial(runtime.probe, image, labels, userns_size)
        watch = PodmanHealth(name, runtime.socket_path, service, probe, publish)
        runtime.on_unavailable = functools.partial(
            _podman_failed, manager.metrics.podman_errors.labels(name), watch.suspect
        )
        watches.append(watch)
    return tuple(watches)


def _podman_failed(counter: Counter, suspect: Callable[[str], None], error: str) -> None:
    counter.inc()
    suspect(error)


def _grpc_services() -> list[ServiceDescriptor]:
    """The services the server answers, for the metrics of their methods."""
    return [
        sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]


_HANDLER_KINDS = {  # (request streaming, response streaming) → how such a handler is made
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _SpanEndings(grpc.aio.ServerInterceptor):
    """Installed right inside OpenTelemetry's interceptor, whose span has a call's code only
    when it aborts: gives it the code of a call that ends otherwise, which it would leave at
    OK: CANCELLED when the caller went away (DEADLINE_EXCEEDED when its deadline passed),
    UNKNOWN for an exception grpc.aio answers."""

    def __init__(self, current_span: Callable[[], Any], error: Callable[[str], Any]) -> None:
        self._current_span = current_span  # opentelemetry.trace.get_current_span
        self._error = error  # a span status of error, with a description

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable["Handler | None"]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> "Handler | None":
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        inner = cast(
            Behaviour,
            handler.unary_unary
            or handler.unary_stream
            or handler.stream_unary
            or handler.stream_stream,
        )
        make = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        behaviour = self._stream(inner) if handler.response_streaming else self._unary(inner)
        return make(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, inner: Behaviour) -> Behaviour:
        async def unary(request: Any, context: Context) -> Any:
            try:
                return await inner(request, context)
            except BaseException as exc:
                self._ended(exc, context)
                raise

        return unary

    def _stream(self, inner: Behaviour) -> Behaviour:
        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for response in inner(request, context):
                    yield response
            except BaseException as exc:
                self._ended(exc, context)
                raise

        return stream

    def _ended(self, error: BaseException, context: Context) -> None:
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            remaining = context.time_remaining()
            late = remaining is not None and remaining <= 0
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        elif isinstance(error, Exception) and not isinstance(error, grpc.aio.AbortError):
            code = grpc.StatusCode.UNKNOWN
        else:  # an abort: the span has its code
            return
        span = self._current_span()
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.CANCELLED:  # the server's fault, as OpenTelemetry says
            span.set_status(self._error(str(code)))


@dataclass(frozen=True)
class _Tracing:
    interceptors: list[grpc.aio.ServerInterceptor]
    stop: Callable[[], object] | None = None


def _tracing(config: Config) -> _Tracing:
    """OpenTelemetry's server interceptor when --otel-tracing asks for it (the [otel] extra),
    exporting over OTLP as the standard OTEL_* environment variables say."""
    if not config.otel_tracing:
        return _Tracing([])
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.grpc import aio_server_interceptor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ValueError(
            f"--otel-tracing needs OpenTelemetry, which is not installed ({exc.name} is "
            "missing): pip install 'petri[otel]' (or `pip install .[otel]` in a checkout)"
        ) from exc
    provider = TracerProvider()  # its resource and sampler from OTEL_* variables
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    # The controller's own provider, not the process-wide one (settable once): the interceptor
    # is the only tracer, and controllers started one after another in a process each get one.
    make: Callable[..., grpc.aio.ServerInterceptor] = aio_server_interceptor  # untyped upstream

    def error(description: str) -> object:
        return trace.Status(trace.StatusCode.ERROR, description)

    endings = _SpanEndings(trace.get_current_span, error)
    return _Tracing([make(tracer_provider=provider), endings], provider.shutdown)


def registry_for(config: Config) -> Registry:
    """PostgreSQL when a database URL is configured, else the SQLite file; a node's registry
    writes its name into its rows and sees its own in the per-host queries."""
    if not config.database_url:
        return SqliteRegistry(config.database_path)
    # Imported only then: the embedded default needs no PostgreSQL driver loaded.
    from controller.store.postgres import PostgresRegistry

    node = config.node_name if config.role == "node" else ""
    return PostgresRegistry(config.database_url, node=node)


class NodeMembership:
    """A node's heartbeat, with its figures, and its share of the sweep of dead nodes
    (controller.sandboxes.reaper.Membership)."""

    def __init__(
        self,
        config: Config,
        nodes: "PostgresNodes",
        registry: Registry,
        figures: Callable[[], list[PoolFigures]],
        address: str,
        monotonic: Callable[[], float] = time.monotonic,
        on_draining: Callable[[bool], None] = lambda draining: None,
    ) -> None:
        self._config = config
        self._nodes = nodes
        self._registry = registry
        self._figures = figures
        self.address = address
        self._monotonic = monotonic
        # Told, after each heartbeat, whether the node is draining (its sandboxes move away).
        self._on_draining = on_draining
        # Since when every heartbeat of this node succeeded, each within two intervals of the
        # one before (None: the last one failed).
        self._beating_since: float | None = None
        self._last_beat: float | None = None

    def __repr__(self) -> str:
        return f"<NodeMembership {self._config.node_name} at {self.address}>"

    @property
    def heartbeat_interval(self) -> timedelta:
        return self._config.heartbeat_interval

    async def heartbeat(self) -> None:
        try:
            await self._beat()
        except BaseException:
            self._beating_since = None
            raise
        now, last = self._monotonic(), self._last_beat
        # A beat that landed late (held up by the database's outage, or this process stopped)
        # counts as a failure: the other nodes' beats were held up too.
        late = last is not None and now - last > 2 * self.heartbeat_interval.total_seconds()
        if self._beating_since is None or late:
            self._beating_since = now
        self._last_beat = now

    async def _beat(self) -> None:
        from controller.store.nodes import NodeRecord  # with psycopg: nodes only

        counts = await self._registry.count_by_state()  # this node's own
        warm = {f"{kind.profile}/{kind.runtime}": kind.ready for kind in self._figures()}
        draining = await self._nodes.heartbeat(
            NodeRecord(
                name=self._config.node_name,
                address=self.address,
                heartbeat_time=utcnow(),  # the database writes its own time
                draining=False,  # kept as set_draining left it
                sandboxes=sum(counts.get(state, 0) for state in PUBLIC_STATES),
                max_sandboxes=self._config.max_sandboxes_per_node,
                free_memory=mem_available() or 0,
                warm=warm,
            )
        )
        self._on_draining(draining)

    async def sweep_dead(self) -> None:
        """Only once this node has heartbeated for a whole node timeout: after the database
        was out of reach (every heartbeat failing, other nodes' too), or this node was, the
        others get that long to heartbeat again before they can be judged dead."""
        timeout = self._config.node_timeout
        since = self._beating_since
        if since is None or self._monotonic() - since < timeout.total_seconds():
            return
        await self._nodes.sweep_dead(timeout, utcnow(), self._config.node_name)

    async def purge_tombstones(self, deleted_before: datetime) -> int | None:
        return await self._nodes.purge_tombstones(deleted_before)


def keep_node_name(config: Config) -> None:
    """Raises ValueError when this state directory's node had another name (role node): under
    a new name, the containers of its sandboxes (labelled with the old one) would run on with
    no node to end them, and their rows would be the other nodes' to terminate."""
    path = config.state_dir / "node-name"
    try:
        before = path.read_text().strip()
    except FileNotFoundError:
        path.write_text(f"{config.node_name}\n")
        return
    if before != config.node_name:
        raise ValueError(
            f"this host's node is {before!r} (the name in {path}), not {config.node_name!r}: "
            f"renamed, its sandboxes would be stranded. Start it as {before!r} "
            "(PETRI_NODE_NAME); to rename it, delete its sandboxes first, then that file"
        )


async def refuse_a_live_namesake(
    config: Config, nodes: "PostgresNodes", sleep: Callable[[float], Awaitable[object]]
) -> None:
    """Raises ValueError when another process heartbeats as this node (role node): two
    processes of one name would adopt, discard and terminate each other's sandboxes. A row
    whose heartbeat is recent may be this node's previous process, just stopped: it is given
    two heartbeats' time to show that it still beats."""
    name = config.node_name
    before = next((n for n in await nodes.list_nodes() if n.name == name), None)
    if before is None or before.age >= config.node_timeout:
        return
    await sleep(2 * config.heartbeat_interval.total_seconds() + 0.5)
    after = next((n for n in await nodes.list_nodes() if n.name == name), None)
    if after is not None and after.heartbeat_time != before.heartbeat_time:
        raise ValueError(
            f"another process is running as node {name!r} (it heartbeats from "
            f"{after.address}): give each node its own node_name (PETRI_NODE_NAME), or stop "
            "that process first"
        )


def membership_for(
    config: Config, registry: Registry, manager: SandboxManager, port: int
) -> tuple[NodeMembership, GrpcTransfer] | None:
    """A node's membership (role node), heartbeating the address gateways reach it at: the
    configured one, else the listen address with the port bound; and its moves of sandboxes
    to other nodes (a drain), node to node."""
    if config.role != "node":
        return None
    from controller.store.moves import PostgresMoves
    from controller.store.nodes import PostgresNodes
    from controller.store.postgres import PostgresRegistry

    assert isinstance(registry, PostgresRegistry)  # config.validate: a node has a database URL
    host, _ = host_port(config.listen)
    address = config.node_address or f"{host}:{port}"
    nodes = PostgresNodes(registry)
    transfer = GrpcTransfer(config)
    manager.connect_moves(PostgresMoves(registry), nodes, transfer)
    membership = NodeMembership(
        config,
        nodes,
        registry,
        manager.warm_pool.figures,
        address,
        on_draining=manager.set_draining,
    )
    return membership, transfer


async def start_controller(config: Config, runtime: ContainerRuntime | None = None) -> Controller:
    """`runtime` replaces podman (the fast tests' fake): no podman service is then started or
    watched, and gVisor is not available."""
    tokens = tokens_for(config)
    credentials = server_credentials(config)
    tracing = _tracing(config)
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if config.role == "node":
        keep_node_name(config)
    registry = registry_for(config)
    await registry.open()
    if config.role == "node":
        from controller.store.nodes import PostgresNodes
        from controller.store.postgres import PostgresRegistry

        assert isinstance(registry, PostgresRegistry)  # config.validate: it has a database URL
        try:
            await refuse_a_live_namesake(config, PostgresNodes(registry), asyncio.sleep)
        except BaseException:
            await registry.close()
            raise
    podman_service: PodmanService | None = None
    gvisor_service: PodmanService | None = None
    podman: PodmanRuntime | None = None
    gvisor_runtime: PodmanRuntime | None = None
    if runtime is None:
        socket_path = config.podman_socket
        if socket_path is None:
            podman_service = PodmanService(
                config.podman_binary,
                config.runtime_dir / "podman.sock",
                config.state_dir / "podman-service.log",
            )
            await podman_service.start()
            socket_path = podman_service.socket_path
        runtime = podman = PodmanRuntime(socket_path)
        gvisor_service, gvisor_runtime = await _start_gvisor(config)
    quotas = Quotas(
        config.max_sandboxes_per_project,
        config.max_executes_per_minute,
        config.max_concurrent_creates,
    )
    metrics = Metrics()
    manager = SandboxManager(
        config, registry, runtime, quotas, gvisor_containers=gvisor_runtime, metrics=metrics
    )
    try:
        await manager.start()
    except BaseException:
        if tracing.stop is not None:
            tracing.stop()
        await runtime.close()
        for service in (podman_service, gvisor_service):
            if service is not None:
                await service.stop()
        await registry.close()
        raise
    host = manager.host
    log.info(
        "what enforces each sandbox limit on this host",
        cgroups=host.cgroup_version,
        memory="memory cgroup" if host.memory else "RLIMIT_AS per process of user code",
        cpu="cpu cgroup" if host.cpu else "not enforced (no cpu cgroup delegated)",
        processes="RLIMIT_NPROC per sandbox (own uids)" + (" + pids cgroup" if host.pids else ""),
        disk="tmpfs size of /workspace, /tmp and /dev/shm",
        open_files="RLIMIT_NOFILE",
        output="executor and controller caps",
    )

    health_servicer = health.aio.HealthServicer()
    budget = request_budget(config, authenticated=tokens is not None)
    # Metrics first, so that they count the calls the guard refuses too; with metrics off,
    # nothing is measured per call.
    measured = ServerMetrics(metrics.grpc, _grpc_services()) if config.metrics_listen else None
    guard = RequestGuard(
        tokens,
        budget,
        open_methods(health_servicer),
        count_requests=measured.counter_of_requests if measured else None,
        # A node's transfer checks its own one-time token (role node only).
        internal_methods=frozenset({TRANSFER_METHOD}) if config.role == "node" else frozenset(),
    )
    server = grpc.aio.server(
        interceptors=[*([measured] if measured else []), *tracing.interceptors, guard],
        options=[
            # No request needs more than a unary ExecuteCode; responses may be bigger.
            ("grpc.max_receive_message_length", config.max_request_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            EXCLUSIVE_PORT,
            # The gateways' and other nodes' keepalive pings (node_keepalive).
            *ping_acceptance(config),
        ],
    )
    limits = OutputLimits(
        max_output_bytes=config.max_output_bytes,
        max_file_bytes=config.max_output_file_bytes,
        max_files=config.max_output_files,
    )
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(
        SandboxService(manager, limits, config.max_input_bytes, tokens), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.role == "node":
        server.add_generic_rpc_handlers((transfer_handler(manager),))
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = listen_on(server, config.listen, credentials)
    node = membership_for(config, registry, manager, port)
    reaper = TtlReaper(
        manager,
        registry,
        config.reap_interval,
        config.tombstone_retention,
        watch_interval=config.container_check_interval,
        hibernate_interval=config.hibernate_interval,
        membership=node[0] if node else None,
    )
    await server.start()
    metrics_server = None
    if config.metrics_listen:
        metrics.watch_live(
            asyncio.get_running_loop(), registry.count_by_state, manager.warm_pool.figures
        )
        metrics_server = serve_metrics(metrics, *parse_host_port(config.metrics_listen))
    reaper.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    podman_health = (
        _watch_podman(
            config,
            manager,
            health_servicer,
            [("runc", podman, podman_service, config.userns_size)]
            + ([("gvisor", gvisor_runtime, gvisor_service, 0)] if gvisor_runtime else []),
        )
        if podman is not None
        else ()
    )
    for watch in podman_health:
        watch.start()
    host_part, _ = host_port(config.listen)
    log.info("controller listening", address=f"{host_part}:{port}", **config.describe())
    if metrics_server is not None:
        metrics_host, _ = host_port(config.metrics_listen)
        log.info("metrics served", address=f"{metrics_host}:{metrics_server.port}/metrics")
        if not is_loopback(config.metrics_listen):
            log.warning(
                "the metrics endpoint has no authentication: anyone who can reach it reads them",
                metrics_listen=config.metrics_listen,
            )
    return Controller(
        config,
        server,
        port,
        manager,
        registry,
        runtime,
        podman_service,
        gvisor_service,
        health_servicer,
        reaper,
        podman_health=podman_health,
        stop_tracing=tracing.stop,
        metrics_server=metrics_server,
        transfer=node[1] if node else None,
    )


async def serve(config: Config) -> None:
    if config.role == "gateway":  # no podman, no sandboxes: the nodes hold them
        from controller.gateway.server import run_gateway

        await run_gateway(config)
        return
    controller = await start_controller(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down", grace_seconds=SHUTDOWN_GRACE_SECONDS)
    await controller.stop()
