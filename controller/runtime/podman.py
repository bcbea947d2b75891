"""The container runtime on rootless podman, through its REST API (podman-py).

podman-py is blocking: every call runs in a worker thread, never on the event loop. podman's
and the HTTP client's exceptions are translated here and nowhere else.
"""

import asyncio
import contextlib
import functools
import json
import secrets
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import podman
import podman.errors
import requests.exceptions
import structlog

from controller.errors import FailedPrecondition, PetriError, Unavailable
from controller.runtime.container import (
    CONTAINER_SOCKET_DIR,
    LABEL_MANAGED,
    LABEL_REGISTRY,
    SOCKET_NAME,
    WATCHED_EVENTS,
    ContainerEvent,
    ContainerSpec,
    ContainerStatus,
    HostCapabilities,
    ImageInfo,
)

log = structlog.get_logger()
T = TypeVar("T")

# The executor is PID 1 and handles SIGTERM; give it a moment before podman kills it.
STOP_TIMEOUT_SECONDS = 2
CONTAINER_LOG_BYTES = 1 << 20
EXECUTOR_CAPABILITIES = (
    "CHOWN",  # give input files to the user code's uid
    "DAC_OVERRIDE",  # put input files in the user code's directories
    "DAC_READ_SEARCH",  # read back what user code wrote, whatever its modes
    "FOWNER",  # set the modes of /workspace, /tmp and the socket directory
    "KILL",  # interrupt and stop the worker, which runs as another uid
    "SETGID",  # start the worker as
    "SETUID",  #   its own uid
)


# podman's default profile, less new namespaces and unusual socket families (docs/security.md);
# scripts/seccomp-profiles writes it. The podman service reads it: it runs on this host.
SECCOMP_PROFILE = Path(__file__).parent / "seccomp-runc.json"


# The event stream: how long podman may take to answer the subscription, and the longest
# event line read (an event carries the container's labels, the image's included).
EVENTS_CONNECT_TIMEOUT = 10.0
EVENT_LINE_LIMIT = 1 << 20


class PodmanEvents:
    """podman's /events stream, asked over HTTP/1.0 so that podman sends it as it is (one JSON
    object a line, no chunked encoding) and closes it when the service stops."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    def __repr__(self) -> str:
        return f"<PodmanEvents closed={self._writer.is_closing()}>"

    def __aiter__(self) -> "PodmanEvents":
        return self

    async def __anext__(self) -> ContainerEvent:
        while True:
            try:
                line = await self._reader.readline()
            except (OSError, ValueError) as exc:  # ValueError: a line over EVENT_LINE_LIMIT
                raise Unavailable(f"podman's event stream broke: {exc}") from exc
            if not line:
                raise StopAsyncIteration
            event = _container_event(line)
            if event is not None:
                return event

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


def _container_event(line: bytes) -> ContainerEvent | None:
    try:
        event = json.loads(line)
        attributes = event["Actor"]["Attributes"]
        return ContainerEvent(name=str(attributes["name"]), action=str(event["Action"]))
    except (ValueError, KeyError, TypeError):
        log.warning("podman sent an event that is not one", line=line[:200])
        return None


def _vanished(exc: podman.errors.APIError) -> bool:
    """A container removed while podman looked it up: podman answers 500, not 404, when it
    goes between its lookup and its inspection ("does not exist in database: no such
    container"). It is gone, not a podman failure."""
    return "no such container" in str(exc)


class PodmanRuntime:
    def __init__(self, socket_path: Path, seccomp_profile: Path = SECCOMP_PROFILE) -> None:
        self._socket_path = socket_path
        self._seccomp_profile = seccomp_profile
        self._client = podman.PodmanClient(base_url=f"unix://{socket_path}", timeout=60)
        # Told of every failure that says podman itself may be unwell (see PodmanHealth).
        self.on_unavailable: Callable[[str], None] | None = None

    def __repr__(self) -> str:
        return f"<PodmanRuntime {self._socket_path}>"

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await asyncio.to_thread(functools.partial(fn, *args, **kwargs))
        except PetriError:
            raise
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            error = Unavailable(
                f"podman is not answering on {self._socket_path} ({what}); the controller "
                "restarts its own podman service within seconds, so retry"
            )
            self._failed(error)
            raise error from exc
        except podman.errors.APIError as exc:
            if exc.status_code is not None and 400 <= exc.status_code < 500:
                raise  # a request podman rejects is our bug: INTERNAL, with the details logged
            error = Unavailable(f"podman failed to {what}: {exc.explanation or exc}")
            self._failed(error)
            raise error from exc

    def _failed(self, error: Unavailable) -> None:
        if self.on_unavailable is not None:
            self.on_unavailable(str(error))

    async def check(self) -> HostCapabilities:
        info: dict[str, Any] = await self._call("report its info", self._client.info)
        host = info.get("host", {})
        version = str(host.get("cgroupVersion", "v1"))
        controllers = set(host.get("cgroupControllers") or [])
        if host.get("eventLogger") == "none":
            log.warning(
                "podman's events_logger is none (containers.conf): a sandbox's container that "
                "dies is found only by the check every --container-check-interval"
            )
        # Rootless podman enforces cgroup limits only on cgroups v2 with delegated controllers.
        v2 = version == "v2"
        return HostCapabilities(
            cgroup_version=version,
            memory=v2 and "memory" in controllers,
            cpu=v2 and "cpu" in controllers,
            pids=v2 and "pids" in controllers,
        )

    async def image_exists(self, image: str) -> bool:
        exists: bool = await self._call("look up an image", self._client.images.exists, image)
        return exists

    async def list_images(self, repository: str) -> list[ImageInfo]:
        return await self._call("list images", self._list_images, repository)

    def _list_images(self, repository: str) -> list[ImageInfo]:
        found = []
        for image in self._client.images.list(name=repository):
            for tag in image.tags or []:
                if tag.startswith(repository + ":"):
                    attrs = image.attrs
                    found.append(
                        ImageInfo(
                            tag=tag.removeprefix(repository + ":"),
                            labels=dict(attrs.get("Labels") or {}),
                            size_bytes=int(attrs.get("Size") or 0),
                            created=float(attrs.get("Created") or 0),
                        )
                    )
        return found

    async def start(self, spec: ContainerSpec) -> None:
        await self._call("create and start a sandbox container", self._start, spec)

    def _start(self, spec: ContainerSpec) -> None:
        kwargs: dict[str, Any] = {
            "name": spec.name,
            # Isolated (-I): the executor is root in the sandbox; nothing user code writes
            # (/workspace is its working directory) may end up on its sys.path.
            "command": [
                "python",
                "-I",
                "-m",
                "executor",
                "--socket",
                f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}",
            ],
            "labels": spec.labels,
            "environment": spec.environment,
            "hostname": "sandbox",
            "working_dir": "/workspace",
            "network_mode": "none",
            # All capabilities dropped, but what the executor (container root) needs to run
            # user code as a uid of its own and manage its files. The user code's process
            # holds none of them (a uid change to non-root clears them; no-new-privileges).
            "cap_drop": ["ALL"],
            "cap_add": list(EXECUTOR_CAPABILITIES),
            "no_new_privileges": True,
            # Also the executor's: it needs no namespaces or unusual sockets either.
            "seccomp_profile_path": str(self._seccomp_profile),
            "read_only": True,
            "shm_size": spec.shm_bytes,
            "mounts": [
                {"type": "tmpfs", "target": "/workspace", "size": str(spec.workspace_bytes)},
                {"type": "tmpfs", "target": "/tmp", "size": str(spec.tmp_bytes)},
                # chown ("U"): the directory becomes the sandbox root's, which then makes it
                # writable by no one else in the sandbox.
                {
                    "type": "bind",
                    "source": str(spec.socket_dir),
                    "target": CONTAINER_SOCKET_DIR,
                    "chown": True,
                },
            ],
            # Explicit ulimits: podman's defaults exceed our hosts' hard limits and runc fails.
            "ulimits": [
                {"Name": "nofile", "Soft": spec.open_files, "Hard": spec.open_files},
                {"Name": "core", "Soft": 0, "Hard": 0},
            ],
            # No nproc: the executors of all sandboxes share a uid (see userns_size), so a
            # container-wide RLIMIT_NPROC would be shared by all of them. The sandbox's
            # process limit is the worker's own, on a uid that is the sandbox's alone.
            "stop_signal": 15,  # SIGTERM; the API wants the number
            # The container's own output (the executor's log, or whatever user code writes to
            # PID 1's descriptors) is capped on the host's disk.
            "log_config": {"Type": "k8s-file", "Config": {"size": CONTAINER_LOG_BYTES}},
            "stop_timeout": STOP_TIMEOUT_SECONDS,
        }
        if spec.memory_bytes:
            kwargs["mem_limit"] = spec.memory_bytes
            kwargs["memswap_limit"] = spec.memory_bytes  # no swap beyond the limit
        if spec.cpu_millis:
            kwargs["nano_cpus"] = spec.cpu_millis * 1_000_000
        if spec.max_processes:
            kwargs["pids_limit"] = spec.max_processes
        self._create_and_start(spec.name, spec.image, spec.userns_size, kwargs)

    def _create_and_start(
        self, name: str, image: str, userns_size: int, kwargs: dict[str, Any]
    ) -> None:
        payload = self._client.containers._render_payload({"image": image, **kwargs})
        # Container root on a subordinate id, not on the service user (podman's --uidmap
        # 0:1:N --gidmap 0:1:N). podman-py has no keyword for it; the API has.
        if userns_size:
            mapping = [{"container_id": 0, "host_id": 1, "size": userns_size}]
            payload["userns"] = {"nsmode": "private"}
            payload["idmappings"] = {"UIDMap": mapping, "GIDMap": mapping}
        response = self._client.api.post(
            "/containers/create",
            headers={"content-type": "application/json"},
            data=podman.api.prepare_body(payload),
        )
        try:
            response.raise_for_status(not_found=podman.errors.ImageNotFound)
        except podman.errors.ImageNotFound as exc:
            raise FailedPrecondition(
                f"image {image} is not built on this server: run sandbox-image/build.sh"
            ) from exc
        # Started by its id, without podman-py's containers.get: that is a full inspect per
        # create that nothing reads (issue 16: fewer podman calls per cold start).
        container_id = response.json()["Id"]
        try:
            self._client.api.post(f"/containers/{container_id}/start").raise_for_status()
        except Exception:
            with contextlib.suppress(Exception):  # the start's error is the one to report
                self._remove(name)
            raise

    async def probe(self, image: str, labels: dict[str, str], userns_size: int) -> None:
        """Creates, starts and removes a container that runs `true`, set up as a sandbox's is
        (podman, conmon and the OCI runtime all take part): proof that sandboxes can start.
        Raises Unavailable, or FailedPrecondition when the image is not built."""
        await self._call("start a probe container", self._probe, image, labels, userns_size)

    def _probe(self, image: str, labels: dict[str, str], userns_size: int) -> None:
        name = f"petri-probe-{secrets.token_hex(6)}"
        kwargs: dict[str, Any] = {
            "name": name,
            "command": ["true"],
            "labels": labels,  # a probe left behind by a crash is removed at the next start
            "network_mode": "none",
            "cap_drop": ["ALL"],
            "no_new_privileges": True,
            "read_only": True,
            "ulimits": [{"Name": "nofile", "Soft": 64, "Hard": 64}],
        }
        try:
            self._create_and_start(name, image, userns_size, kwargs)
        except Exception:
            with contextlib.suppress(Exception):  # the start's error is the one to report
                self._remove(name)
            raise
        self._remove(name)

    async def status(self, name: str) -> ContainerStatus | None:
        return await self._call("inspect a sandbox container", self._status, name)

    def _status(self, name: str) -> ContainerStatus | None:
        try:
            container = self._client.containers.get(name)
        except podman.errors.NotFound:
            return None
        except podman.errors.APIError as exc:
            if _vanished(exc):
                return None
            raise
        state = container.attrs.get("State", {})
        return ContainerStatus(
            name=name,
            running=bool(state.get("Running")),
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            labels=dict(container.labels or {}),
            error=str(state.get("Error") or ""),
        )

    async def remove(self, name: str) -> None:
        await self._call("remove a sandbox container", self._remove, name)

    def _remove(self, name: str) -> None:
        try:
            self._client.containers.remove(name, force=True)
        except podman.errors.NotFound:
            pass
        except podman.errors.APIError as exc:
            if not _vanished(exc):
                raise

    async def list_managed(self, registry_label: str | None) -> list[ContainerStatus]:
        return await self._call("list sandbox containers", self._list_managed, registry_label)

    def _list_managed(self, registry_label: str | None) -> list[ContainerStatus]:
        # The list form: podman-py turns a dict's list value into one mangled string.
        filters = [f"label={LABEL_MANAGED}=true"]
        if registry_label is not None:
            filters.append(f"label={LABEL_REGISTRY}={registry_label}")
        containers = self._client.containers.list(all=True, filters=filters)
        statuses = []
        for container in containers:
            attrs = container.attrs
            names = attrs.get("Names") or [container.name]
            statuses.append(
                ContainerStatus(
                    name=str(names[0]).lstrip("/"),
                    running=attrs.get("State") == "running",
                    exit_code=attrs.get("ExitCode"),
                    oom_killed=False,
                    labels=dict(attrs.get("Labels") or {}),
                )
            )
        return statuses

    async def events(self, registry_label: str) -> PodmanEvents:
        filters = {
            "type": ["container"],
            "event": list(WATCHED_EVENTS),
            "label": [f"{LABEL_REGISTRY}={registry_label}"],
        }
        query = urllib.parse.urlencode({"stream": "true", "filters": json.dumps(filters)})
        try:
            async with asyncio.timeout(EVENTS_CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    str(self._socket_path), limit=EVENT_LINE_LIMIT
                )
                try:
                    request = f"GET /v4.0.0/libpod/events?{query} HTTP/1.0\r\nHost: podman\r\n\r\n"
                    writer.write(request.encode())
                    status = await reader.readline()
                    while (await reader.readline()).strip():  # the headers; podman flushes them
                        pass  # once subscribed
                except BaseException:
                    writer.close()
                    raise
        except (OSError, TimeoutError, ValueError) as exc:
            raise Unavailable(
                f"podman's event stream is not answering on {self._socket_path}: {exc!r}"
            ) from exc
        if status.split(b" ")[1:2] != [b"200"]:
            writer.close()
            raise Unavailable(f"podman refused its event stream: {status[:200]!r}")
        return PodmanEvents(reader, writer)

    async def logs_tail(self, name: str, lines: int) -> str:
        return await self._call("read a sandbox's logs", self._logs_tail, name, lines)

    def _logs_tail(self, name: str, lines: int) -> str:
        try:
            container = self._client.containers.get(name)
            chunks = container.logs(stdout=True, stderr=True, tail=lines)
        except podman.errors.NotFound:
            return ""
        data = chunks if isinstance(chunks, bytes) else b"".join(chunks)
        return data.decode(errors="replace")

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)
