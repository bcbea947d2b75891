"""Assembles and runs the controller: registry, podman, sandbox manager, gRPC server.

`start_controller(config)` returns a running Controller (tests bind port 0 and talk to it
in-process); `serve(config)` runs one until SIGTERM or SIGINT, then shuts down gracefully.
"""

import asyncio
import ipaddress
import signal
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.auth import TokenTable
from controller.config import Config
from controller.execution_results import OutputLimits
from controller.gvisor import SECCOMP_PROFILE as GVISOR_SECCOMP_PROFILE
from controller.gvisor import runsc_wrapper
from controller.podman_runtime import PodmanRuntime
from controller.podman_service import PodmanService
from controller.quotas import Quotas
from controller.registry import Registry
from controller.sandboxes import SandboxManager
from controller.service import SandboxService
from controller.ttl_reaper import TtlReaper
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

log = structlog.get_logger()

SERVICE_NAME = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"].full_name
# On shutdown, in-flight calls get this long to finish before they are cancelled.
SHUTDOWN_GRACE_SECONDS = 10.0


@dataclass
class Controller:
    config: Config
    server: grpc.aio.Server
    port: int
    manager: SandboxManager
    registry: Registry
    runtime: PodmanRuntime
    podman_service: PodmanService | None
    gvisor_service: PodmanService | None
    health: health.aio.HealthServicer
    reaper: TtlReaper

    def __repr__(self) -> str:
        return f"<Controller port={self.port} {self.manager!r}>"

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        await self.health.enter_graceful_shutdown()
        self.reaper.stop()
        await self.server.stop(grace)
        await self.manager.close()
        await self.runtime.close()
        for service in (self.podman_service, self.gvisor_service):
            if service is not None:
                await service.stop()
        await self.registry.close()
        log.info("controller stopped")


def _host_port(listen: str) -> tuple[str, str]:
    host, _, port = listen.rpartition(":")
    return host, port


def _is_loopback(listen: str) -> bool:
    host, _ = _host_port(listen)
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tokens_for(config: Config) -> TokenTable | None:
    """The tokens file, or None when authentication is off, which must be asked for out loud
    anywhere but on loopback."""
    if config.tokens_file is not None:
        return TokenTable.load(config.tokens_file)
    if not _is_loopback(config.listen) and not config.insecure_no_auth:
        raise ValueError(
            f"refusing to listen on {config.listen} without authentication: pass "
            "--tokens-file (see controller/auth.py), or --insecure-no-auth for development"
        )
    log.warning(
        "AUTHENTICATION IS OFF: anyone who can reach this address can run code in any project",
        listen=config.listen,
    )
    return None


def _server_credentials(config: Config) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


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


async def start_controller(config: Config) -> Controller:
    tokens = tokens_for(config)
    credentials = _server_credentials(config)
    config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    registry = Registry(config.database_path)
    await registry.open()
    podman_service = None
    socket_path = config.podman_socket
    if socket_path is None:
        podman_service = PodmanService(
            config.podman_binary,
            config.runtime_dir / "podman.sock",
            config.state_dir / "podman-service.log",
        )
        await podman_service.start()
        socket_path = podman_service.socket_path
    runtime = PodmanRuntime(socket_path)
    gvisor_service, gvisor_runtime = await _start_gvisor(config)
    quotas = Quotas(
        config.max_sandboxes_per_project,
        config.max_executes_per_minute,
        config.max_concurrent_creates,
    )
    manager = SandboxManager(config, registry, runtime, quotas, gvisor=gvisor_runtime)
    try:
        await manager.start()
    except BaseException:
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

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
    )
    limits = OutputLimits(
        max_output_bytes=config.max_output_bytes,
        max_file_bytes=config.max_output_file_bytes,
        max_files=config.max_output_files,
    )
    sandbox_pb2_grpc.add_SandboxServiceServicer_to_server(
        SandboxService(manager, limits, config.max_input_bytes, tokens), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    reaper = TtlReaper(
        manager,
        registry,
        config.reap_interval,
        config.tombstone_retention,
        watch_interval=config.container_check_interval,
    )
    if credentials is None:
        port = server.add_insecure_port(config.listen)
    else:
        port = server.add_secure_port(config.listen, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    reaper.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host_part, _ = _host_port(config.listen)
    log.info("controller listening", address=f"{host_part}:{port}", **config.describe())
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
    )


async def serve(config: Config) -> None:
    controller = await start_controller(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down", grace_seconds=SHUTDOWN_GRACE_SECONDS)
    await controller.stop()
