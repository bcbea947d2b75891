"""What a gRPC server of petri's public API needs from its configuration, whichever serves it (a
node, today's single controller, or a gateway): its tokens, its TLS credentials, and the calls
answered without a token."""

import ipaddress
from collections.abc import Callable

import grpc
import structlog
from grpc_health.v1 import health, health_pb2

from controller.api.auth import TokenTable
from controller.api.interceptors import BudgetLimits, Context, OpenAnswer, RequestBudget
from controller.config import Config

log = structlog.get_logger()


def host_port(listen: str) -> tuple[str, str]:
    host, _, port = listen.rpartition(":")
    return host, port


def is_loopback(listen: str) -> bool:
    host, _ = host_port(listen)
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_budget(config: Config, authenticated: bool) -> RequestBudget:
    """The bounds on requests being received, server-wide and per caller. Without tokens every
    caller is the same one (anyone): only the server-wide limits apply, or one client's big
    upload would hold back every other client's."""
    return RequestBudget(
        BudgetLimits(
            receives=config.max_concurrent_receives,
            receives_per_caller=config.max_concurrent_receives_per_caller
            if authenticated
            else config.max_concurrent_receives,
            bytes_in_flight=config.max_request_bytes_in_flight,
            bytes_in_flight_per_caller=config.max_request_bytes_in_flight_per_caller
            if authenticated
            else config.max_request_bytes_in_flight,
        )
    )


def tokens_for(config: Config) -> TokenTable | None:
    """The tokens file, or None when authentication is off, which must be asked for out loud
    anywhere but on loopback."""
    if config.tokens_file is not None:
        return TokenTable.load(config.tokens_file)
    if not is_loopback(config.listen) and not config.insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {config.listen} without authentication: pass "
            "--tokens-file (see controller/api/auth.py), or --insecure-no-auth for development"
        )
    log.warning(
        "AUTHENTICATION IS OFF: anyone who can reach this address can run code in any project",
        listen=config.listen,
    )
    return None


def open_methods(health_servicer: health.aio.HealthServicer) -> dict[str, OpenAnswer]:
    """What a caller without a token may ask, answered without reading its request: whether
    the server serves (for probes and load balancers, which send no token). Reflection, which
    reads requests, and health's Watch need a token when tokens are on."""

    async def check(context: Context) -> health_pb2.HealthCheckResponse:
        answer: health_pb2.HealthCheckResponse = await health_servicer.Check(
            health_pb2.HealthCheckRequest(), context
        )
        return answer

    return {"/grpc.health.v1.Health/Check": check}


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


# grpc shares a port with another process's server by default (SO_REUSEPORT): a second petri
# started on a taken port would silently get part of the first one's calls. Not so: it fails.
EXCLUSIVE_PORT = ("grpc.so_reuseport", 0)


def listen_on(
    server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `server` to `listen` (HOST:PORT); the port bound. OSError when it cannot: the
    address is in use, or not this host's."""
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:  # grpc's "Failed to bind"
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the address is in use, or not this host's")
    return port


def _milliseconds(config: Config) -> int:
    return max(1, int(config.node_keepalive.total_seconds() * 1000))


def node_keepalive(config: Config) -> list[tuple[str, int]]:
    """The pings of a channel to a node: a node that froze (SIGSTOP, a hung host, a partition
    that sends no reset) keeps a TCP connection that looks fine, and without them the calls in
    flight to it wait for their deadline, or for ever, and the channel stays READY."""
    period = _milliseconds(config)
    return [
        ("grpc.keepalive_time_ms", period),
        ("grpc.keepalive_timeout_ms", period),
        # grpc (1.85) waits for a keepalive ping's answer for this one, 60 s by default, not
        # for keepalive_timeout_ms.
        ("grpc.http2.ping_timeout_ms", period),
        # Go on pinging through a long call that sends nothing (an ExecuteCode running
        # minutes): grpc stops after 2 pings without data by default.
        ("grpc.http2.max_pings_without_data", 0),
        # And between calls, so that a frozen node's channel leaves READY: new calls then wait
        # for a connection (the gateway's connect timeout, nothing sent) instead of hanging.
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def ping_acceptance(config: Config) -> list[tuple[str, int]]:
    """What a node's server needs to answer node_keepalive's pings rather than close the
    connection: grpc's server takes more than one ping per 5 minutes without data, or any
    ping without a call, for abuse, and after 2 such strikes sends GOAWAY too_many_pings,
    which ends every call on the connection (a long healthy ExecuteCode too). Pings up to
    twice as often as node_keepalive are accepted; the strikes stay at grpc's 2, so that a
    client pinging faster still gets cut off."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", max(1, _milliseconds(config) // 2)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def node_channel(config: Config) -> Callable[[str], grpc.aio.Channel]:
    """How a gateway, or a node moving a sandbox, connects to a node: messages as big as the
    node's own limits allow, over TLS when node_tls_ca is set."""
    options: list[tuple[str, str | int]] = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_request_message_bytes),
        # A node back from a restart is found within a second or two, not grpc's two minutes.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        *node_keepalive(config),
    ]
    if config.node_tls_ca is None:
        return lambda address: grpc.aio.insecure_channel(address, options=options)
    credentials = node_credentials(config)
    if config.node_tls_name:
        options.append(("grpc.ssl_target_name_override", config.node_tls_name))
    return lambda address: grpc.aio.secure_channel(address, credentials, options=options)


def node_credentials(config: Config) -> grpc.ChannelCredentials:
    """TLS to the nodes: their certificates verified by node_tls_ca, and this process's own
    certificate (node_tls_cert) for nodes that require one. The files are read once, at
    start."""
    assert config.node_tls_ca is not None
    cert = key = None
    if config.node_tls_cert is not None and config.node_tls_key is not None:
        cert, key = config.node_tls_cert.read_bytes(), config.node_tls_key.read_bytes()
    return grpc.ssl_channel_credentials(
        root_certificates=config.node_tls_ca.read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )
