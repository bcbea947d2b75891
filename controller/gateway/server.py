"""Assembles and runs a gateway: the gRPC server of the public API (tokens, TLS, health,
reflection as a single controller has them) in front of the petri nodes."""

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from controller.api.grpc_metrics import ServerMetrics
from controller.api.interceptors import RequestGuard
from controller.api.transport import (
    EXCLUSIVE_PORT,
    host_port,
    is_loopback,
    listen_on,
    node_channel,
    open_methods,
    ping_acceptance,
    request_budget,
    server_credentials,
    tokens_for,
)
from controller.config import Config, parse_host_port
from controller.gateway.directory import DEFAULT_STALE_AFTER, Directory, NodeList
from controller.gateway.forward import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    SERVICE,
    Forwarder,
    Locate,
    SandboxDirectory,
    locate_in,
)
from controller.metrics import GatewayMetrics, MetricsServer, serve_metrics
from controller.store.nodes import PostgresNodes
from controller.store.postgres import PostgresRegistry

log = structlog.get_logger()

SHUTDOWN_GRACE_SECONDS = 10.0
# How often the gateway reads the membership table (which nodes are live, their load).
DEFAULT_REFRESH_SECONDS = 1.0
# The services the gateway answers, for the metrics of their methods.
_SERVICES = (
    SERVICE,
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    directory: Directory
    health: health.aio.HealthServicer
    refresher: asyncio.Task[None] | None = field(default=None, repr=False)
    # The Prometheus endpoint, when metrics_listen asks for one.
    metrics_server: MetricsServer | None = None

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        if self.refresher is not None:
            self.refresher.cancel()
            await asyncio.gather(self.refresher, return_exceptions=True)
        await self.server.stop(grace)
        await self.directory.close()
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
        log.info("gateway stopped")


async def _refresh(directory: Directory, health_servicer: health.aio.HealthServicer) -> bool:
    """Reads the nodes; SERVING while the database answers."""
    try:
        await directory.refresh()
    except Exception as exc:  # the database's errors: the gateway cannot route, say so
        log.warning("cannot read the petri nodes: not serving", error=str(exc)[:500])
        serving = False
    else:
        serving = True
    for name in ("", SERVICE.full_name):
        await health_servicer.set(name, _SERVING if serving else _NOT_SERVING)
    return serving


async def _keep_refreshing(
    directory: Directory, health_servicer: health.aio.HealthServicer, interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        await _refresh(directory, health_servicer)


async def start_gateway(
    config: Config,
    nodes: NodeList,
    locate: Locate,
    *,
    channel_for: Callable[[str], grpc.aio.Channel] | None = None,
    stale_after: timedelta = DEFAULT_STALE_AFTER,
    refresh_interval: float = DEFAULT_REFRESH_SECONDS,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
) -> Gateway:
    """A running gateway on config.listen. `nodes` lists the nodes (the membership table),
    `locate` says which node holds a sandbox (the registry)."""
    tokens = tokens_for(config)
    credentials = server_credentials(config)
    directory = Directory(nodes, channel_for or node_channel(config), stale_after)
    health_servicer = health.aio.HealthServicer()
    budget = request_budget(config, authenticated=tokens is not None)
    # As a node's: the metrics' interceptor first, so that it counts the guard's refusals too;
    # with metrics off, nothing is measured per call.
    metrics = GatewayMetrics() if config.metrics_listen else None
    measured = ServerMetrics(metrics.grpc, _SERVICES) if metrics is not None else None
    guard = RequestGuard(
        tokens,
        budget,
        open_methods(health_servicer),
        count_requests=measured.counter_of_requests if measured else None,
    )
    server = grpc.aio.server(
        interceptors=[*([measured] if measured else []), guard],
        options=[
            ("grpc.max_receive_message_length", config.max_request_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            EXCLUSIVE_PORT,
            # Callers' keepalive pings, as a node takes them: without, grpc's server closes the
            # connection of a client pinging more than once per 5 minutes (GOAWAY
            # too_many_pings), ending its calls in flight.
            *ping_acceptance(config),
        ],
    )
    forwarder = Forwarder(
        directory,
        locate,
        config.default_image_profile,
        config.default_runtime,
        connect_timeout=connect_timeout,
        metrics=metrics,
    )
    server.add_generic_rpc_handlers((forwarder.handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE.full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = listen_on(server, config.listen, credentials)
    await _refresh(directory, health_servicer)
    await server.start()
    gateway = Gateway(server, port, directory, health_servicer)
    gateway.refresher = asyncio.get_running_loop().create_task(
        _keep_refreshing(directory, health_servicer, refresh_interval)
    )
    host, _ = host_port(config.listen)
    log.info("gateway listening", address=f"{host}:{port}", **config.describe())
    if metrics is not None:
        metrics.watch_nodes(directory.live_count)
        gateway.metrics_server = serve_metrics(metrics, *parse_host_port(config.metrics_listen))
        metrics_host, _ = host_port(config.metrics_listen)
        log.info("metrics served", address=f"{metrics_host}:{gateway.metrics_server.port}/metrics")
        if not is_loopback(config.metrics_listen):
            log.warning(
                "the metrics endpoint has no authentication: anyone who can reach it reads them",
                metrics_listen=config.metrics_listen,
            )
    return gateway


async def run_gateway(config: Config) -> None:
    """Role gateway: serves until SIGTERM or SIGINT in front of the nodes that share the
    registry in PostgreSQL (config.database_url), which says where each sandbox is and which
    nodes are live."""
    registry = PostgresRegistry(config.database_url)
    await registry.open()
    try:
        await serve_gateway(config, PostgresNodes(registry), registry, config.node_timeout)
    finally:
        await registry.close()


async def serve_gateway(
    config: Config, nodes: NodeList, registry: SandboxDirectory, stale_after: timedelta
) -> None:
    """Runs a gateway until SIGTERM or SIGINT, then stops it gracefully. `registry` is open;
    `stale_after` is the nodes' --node-timeout."""
    gateway = await start_gateway(config, nodes, locate_in(registry), stale_after=stale_after)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down", grace_seconds=SHUTDOWN_GRACE_SECONDS)
    await gateway.stop()
