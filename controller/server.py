"""Assembles and runs the controller: registry, podman, sandbox manager, gRPC server.

`start_controller(config)` returns a running Controller (tests bind port 0 and talk to it
in-process); `serve(config)` runs one until SIGTERM or SIGINT, then shuts down gracefully.
"""

import asyncio
import signal
from dataclasses import dataclass

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from controller.config import Config
from controller.execution_results import OutputLimits
from controller.podman_runtime import PodmanRuntime
from controller.podman_service import PodmanService
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
        if self.podman_service is not None:
            await self.podman_service.stop()
        await self.registry.close()
        log.info("controller stopped")


def _host_port(listen: str) -> tuple[str, str]:
    host, _, port = listen.rpartition(":")
    return host, port


async def start_controller(config: Config) -> Controller:
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
    manager = SandboxManager(config, registry, runtime)
    try:
        await manager.start()
    except BaseException:
        await runtime.close()
        if podman_service is not None:
            await podman_service.stop()
        await registry.close()
        raise
    host = manager.host
    log.info(
        "what enforces each sandbox limit on this host",
        cgroups=host.cgroup_version,
        memory="memory cgroup" if host.memory else "RLIMIT_AS per process of user code",
        cpu="cpu cgroup" if host.cpu else "not enforced (no cpu cgroup delegated)",
        processes="RLIMIT_NPROC per sandbox (own uids)" + (" + pids cgroup" if host.pids else ""),
        disk="tmpfs size of /workspace and /tmp",
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
        SandboxService(manager, limits, config.max_input_bytes), server
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
    port = server.add_insecure_port(config.listen)
    if port == 0:
        raise OSError(f"cannot listen on {config.listen}")
    await server.start()
    reaper.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    host_part, _ = _host_port(config.listen)
    log.info("controller listening", address=f"{host_part}:{port}", **config.describe())
    return Controller(
        config, server, port, manager, registry, runtime, podman_service, health_servicer, reaper
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
