"""The provisioner: everything a sandbox holds outside the registry, from container to client.

For each sandbox it makes, and later releases: a worker uid (reserved host-wide), an executor
key, a socket directory with the key in it, a container (under runc or gVisor) and the
executor client that talks to it. It writes no sandbox state: the lifecycle does, around it.
"""

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import structlog

from controller.config import Config
from controller.errors import ResourceExhausted, Unavailable
from controller.records import POOL_PROJECT, Runtime, SandboxRecord
from controller.runtime.container import (
    KEY_FILE_NAME,
    LABEL_EXECUTOR_KEY,
    LABEL_MANAGED,
    LABEL_REGISTRY,
    LABEL_UID,
    LABEL_WORKER_UID,
    SOCKET_NAME,
    ContainerRuntime,
    ContainerSpec,
    ContainerStatus,
)
from controller.runtime.executor_client import ExecutorClient
from controller.sandboxes.specs import SpecPolicy
from controller.sandboxes.worker_uids import WorkerUids, shared_directory
from controller.units import format_duration
from petri.v1 import executor_pb2

log = structlog.get_logger()

# How often a starting sandbox's container is checked for an early exit.
START_CHECK_INTERVAL = 0.5
# The longest unix socket path the kernel accepts is 107 bytes.
MAX_SOCKET_PATH = 107
# How often a new warm pool member is asked whether it has preloaded its modules.
PRELOAD_POLL_INTERVAL = 0.02
# At shutdown, how long the background releases (a pause's container removal) may take.
RELEASE_WAIT_SECONDS = 60.0
# Seconds a cold sandbox's interpreter waits for its first execution before it preloads.
COLD_PRELOAD_GRACE = "1"


@dataclass(frozen=True)
class _Held:
    """What a sandbox holds outside the registry, once detached from its uid."""

    container_name: str
    socket_dir: str
    worker_uid: int | None
    client: ExecutorClient | None


class Provisioner:
    def __init__(
        self,
        config: Config,
        containers: ContainerRuntime,
        gvisor_containers: ContainerRuntime | None,
        policy: SpecPolicy,
    ) -> None:
        self._config = config
        self._containers = containers
        # Creates gVisor sandboxes; everything else about them goes through `containers`,
        # which shares the same podman storage.
        self._gvisor_containers = gvisor_containers
        self._policy = policy
        self._socket_root = config.runtime_dir / "s"
        # Tells this controller's containers from those of another registry on the same podman:
        # a node's, from its name (its rows are its own in a registry that nodes share).
        owner = (
            f"node/{config.node_name}"
            if config.role == "node"
            else str(config.database_path.resolve())
        )
        self.registry_label = hashlib.sha256(owner.encode()).hexdigest()[:12]
        # The uid user code runs as, by sandbox uid (the executor is the sandbox's root):
        # reserved host-wide, with every controller of this service user.
        self._worker_uids = WorkerUids(config.userns_size, shared_directory(), self.registry_label)
        self._worker_uid_of: dict[str, int] = {}
        # The secret each sandbox's executor wants with every call, by sandbox uid (also a
        # label of its container, for a restarted controller).
        self._executor_keys: dict[str, str] = {}
        self._clients: dict[str, ExecutorClient] = {}
        # Releases under way in the background (release_soon), by sandbox uid.
        self._releasing: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<Provisioner registry={self.registry_label} clients={len(self._clients)}>"

    def open(self) -> None:
        """Checks and makes the socket root; opens the host-wide worker uid reservations."""
        longest = self._socket_root / ("x" * 32) / SOCKET_NAME
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"runtime_dir {self._config.runtime_dir} is too long for unix socket paths "
                f"({len(str(longest))} > {MAX_SOCKET_PATH} bytes): choose a shorter --runtime-dir"
            )
        self._socket_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._worker_uids.open()

    async def close(self) -> None:
        """Waits for the releases under way (a pause's), RELEASE_WAIT_SECONDS at most: one
        cut short leaves a container that the next start removes."""
        if self._releasing:
            await asyncio.wait(list(self._releasing.values()), timeout=RELEASE_WAIT_SECONDS)
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    def place(self, uid: str) -> tuple[str, str]:
        """The container name and socket directory of the sandbox `uid`."""
        return f"petri-{uid}", str(self._socket_root / uid)

    def adopt(self, record: SandboxRecord, container: ContainerStatus | None) -> None:
        """Takes back what a previous controller gave the sandbox: its worker uid and
        executor key, from its container's labels."""
        if container is None:
            return
        worker_uid = container.labels.get(LABEL_WORKER_UID, "")
        if worker_uid.isdigit():
            self._worker_uids.mark(int(worker_uid))
            self._worker_uid_of[record.uid] = int(worker_uid)
        if container.labels.get(LABEL_EXECUTOR_KEY):
            self._executor_keys[record.uid] = container.labels[LABEL_EXECUTOR_KEY]

    async def provision(self, record: SandboxRecord) -> executor_pb2.ExecutorStatus:
        """Starts the sandbox's container and waits for its executor to answer; on any
        failure (or cancellation) releases what it took and raises."""
        try:
            await self.wait_released(record.uid)  # a pause's, of the same name and directory
            worker_uid = await self._take_worker_uid()
            self._worker_uid_of[record.uid] = worker_uid
            # A file only the sandbox's root can read (not the environment: gVisor shows
            # PID 1's to every uid); a label keeps it for a restarted controller.
            key = self._executor_keys[record.uid] = secrets.token_urlsafe(32)
            spec = self._container_spec(record, worker_uid, key)
            # podman gives it to the sandbox's root (its own uids); nobody else can reach it:
            # its parent is ours alone (0700).
            os.mkdir(record.socket_dir, 0o700)  # on the runtime tmpfs: fine on the loop
            # The executor answers only calls that carry this key (see executor_client).
            _write_key(Path(record.socket_dir) / KEY_FILE_NAME, key)
            gvisor = record.spec.runtime is Runtime.GVISOR
            creator = self._gvisor_containers if gvisor else self._containers
            assert creator is not None  # SpecPolicy refuses GVISOR without it
            await creator.start(spec)
            return await self._wait_started(record, self.client_for(record))
        except BaseException as exc:
            log.warning("sandbox failed to start", sandbox=record.name, error=str(exc))
            held = self._detach(record)
            with contextlib.suppress(Exception):
                await self._containers.remove(record.container_name)
            await self._release_all_but_the_container(held)
            raise

    def _container_spec(self, record: SandboxRecord, worker_uid: int, key: str) -> ContainerSpec:
        gvisor = record.spec.runtime is Runtime.GVISOR
        cgroups = self._policy.cgroups_for(record.spec.runtime)
        resources = record.spec.resources
        labels = {
            LABEL_MANAGED: "true",
            LABEL_REGISTRY: self.registry_label,
            LABEL_UID: record.uid,
            LABEL_WORKER_UID: str(worker_uid),
            LABEL_EXECUTOR_KEY: key,
        }
        return ContainerSpec(
            name=record.container_name,
            image=self._config.image_for(record.spec.image_profile),
            labels=labels,
            socket_dir=Path(record.socket_dir),
            workspace_bytes=resources.disk_bytes,
            tmp_bytes=self._config.tmp_size,
            open_files=self._config.open_files,
            # The memory cgroup where the host delegates it; else the interpreter's address
            # space (RLIMIT_AS, set by the executor on the worker).
            memory_bytes=resources.memory_bytes if cgroups.memory else 0,
            cpu_millis=resources.cpu_millis,
            # The sandbox's process limit is the worker's RLIMIT_NPROC on a uid of its own
            # (PETRI_PROCESS_LIMIT), plus the pids cgroup where the host delegates it.
            max_processes=resources.max_processes if cgroups.pids else 0,
            userns_size=0 if gvisor else self._config.userns_size,
            environment={
                "PETRI_SANDBOX_UID": record.uid,  # what executors of older images check
                "PETRI_WORKER_UID": str(worker_uid),
                # The executor sets it on user code's uid, which is this sandbox's alone.
                "PETRI_PROCESS_LIMIT": str(resources.max_processes),
                "PETRI_MEMORY_LIMIT": "0" if cgroups.memory else str(resources.memory_bytes),
                "PETRI_PRELOAD": ",".join(
                    self._config.gvisor_preload if gvisor else self._config.preload
                ),
                # A pool member preloads at once (nobody can execute before it has); a cold
                # sandbox's first execution, which usually comes within the grace, would stop
                # the preload anyway.
                "PETRI_PRELOAD_GRACE": "0"
                if record.project == POOL_PROJECT
                else COLD_PRELOAD_GRACE,
            },
        )

    async def _wait_started(
        self, record: SandboxRecord, client: ExecutorClient
    ) -> executor_pb2.ExecutorStatus:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.start_timeout.total_seconds()
        while True:
            try:
                ready = await client.wait_ready(START_CHECK_INTERVAL)
                await client.check_protocol()  # refuses a stale image before anyone gets it
                return ready
            except Unavailable:
                if loop.time() > deadline:
                    raise
            status = await self._containers.status(record.container_name)
            if status is None or not status.running:
                why = "vanished" if status is None else status.describe()
                logs = await self._containers.logs_tail(record.container_name, 20)
                raise Unavailable(
                    f"the sandbox's container {why} while starting"
                    + (f"; its last output:\n{logs}" if logs else "")
                )

    async def wait_preloaded(self, record: SandboxRecord) -> None:
        """Waits until the sandbox's interpreter has imported the preloaded modules."""
        client = self.client_for(record)
        try:
            async with asyncio.timeout(self._config.start_timeout.total_seconds()):
                while True:
                    if (await client.status()).preloaded:
                        break
                    await asyncio.sleep(PRELOAD_POLL_INTERVAL)
        except TimeoutError:
            raise Unavailable(
                "the sandbox did not preload its modules within "
                f"{format_duration(self._config.start_timeout)}"
            ) from None

    async def release(self, record: SandboxRecord) -> None:
        """Removes the sandbox's container and gives back everything it held."""
        await self._release(self._detach(record))

    async def release_unnamed(self, container: ContainerStatus) -> None:
        """Removes a container that no sandbox of this node names any more, and gives back
        what this process held for the uid its labels name."""
        uid = container.labels.get(LABEL_UID, "")
        self._executor_keys.pop(uid, None)
        held = _Held(
            container.name,
            self.place(uid)[1] if uid else "",
            self._worker_uid_of.pop(uid, None),
            self._clients.pop(uid, None),
        )
        await self._release(held)

    def release_soon(self, record: SandboxRecord) -> None:
        """release() in the background, for a caller that need not wait for podman (a
        pause: the sandbox is on disk already). Nothing of the sandbox's uid is in use from
        now on: a new container of the same uid (a resume) is free to take its place, and
        its provision waits for this release first (same container name and directory)."""
        held = self._detach(record)
        task = asyncio.get_running_loop().create_task(self._release(held))
        self._releasing[record.uid] = task
        task.add_done_callback(lambda _: self._forget_release(record.uid, task))

    def _forget_release(self, uid: str, task: "asyncio.Task[None]") -> None:
        if self._releasing.get(uid) is task:
            del self._releasing[uid]
        if not task.cancelled() and task.exception() is not None:
            log.warning("releasing a sandbox's container failed", error=str(task.exception()))

    async def wait_released(self, uid: str) -> None:
        """Once the release under way of sandbox `uid`'s container (a pause's) has ended."""
        pending = self._releasing.get(uid)
        if pending is not None:
            await asyncio.wait([pending])

    def _detach(self, record: SandboxRecord) -> "_Held":
        """What the sandbox holds, taken out of the maps keyed by its uid (so that nothing
        new uses it, and a later holder of the uid keeps its own)."""
        self._executor_keys.pop(record.uid, None)
        return _Held(
            record.container_name,
            record.socket_dir,
            self._worker_uid_of.pop(record.uid, None),
            self._clients.pop(record.uid, None),
        )

    async def _release(self, held: "_Held") -> None:
        # The container first: executions in flight then end with a lost executor, which they
        # report as "deleted during the execution", rather than with a closed channel. An idle
        # session would make the executor wait its stop grace for nothing: it goes before.
        if held.client is not None:
            held.client.end_idle_session()
        try:
            await self._containers.remove(held.container_name)
        finally:
            await self._release_all_but_the_container(held)

    async def _release_all_but_the_container(self, held: "_Held") -> None:
        if held.client is not None:
            await held.client.close()
        if held.socket_dir:
            await asyncio.to_thread(_remove_tree, held.socket_dir, self._config.podman_binary)
        if held.worker_uid is not None:
            self._worker_uids.release(held.worker_uid)

    def transfer(self, from_uid: str, to_uid: str) -> None:
        """Hands what sandbox `from_uid` holds (a warm pool member's worker uid, executor key
        and client) to sandbox `to_uid`, which takes its container over (a resume)."""
        if (worker_uid := self._worker_uid_of.pop(from_uid, None)) is not None:
            self._worker_uid_of[to_uid] = worker_uid
        if (key := self._executor_keys.pop(from_uid, None)) is not None:
            self._executor_keys[to_uid] = key
        if (client := self._clients.pop(from_uid, None)) is not None:
            self._clients[to_uid] = client

    def client_for(self, record: SandboxRecord) -> ExecutorClient:
        client = self._clients.get(record.uid)
        if client is None:
            client = ExecutorClient(
                Path(record.socket_dir) / SOCKET_NAME,
                self._executor_keys.get(record.uid, ""),
                self._config.max_message_bytes,
            )
            self._clients[record.uid] = client
        return client

    async def check_answers(self, record: SandboxRecord, timeout: float) -> None:
        """Raises unless the sandbox's executor answers a status call within `timeout`
        seconds (its channel is open: it costs a millisecond)."""
        await self.client_for(record).status(timeout=timeout)

    def current_client(self, uid: str) -> ExecutorClient | None:
        """The sandbox's client if it has one (none once it is terminated or deleted)."""
        return self._clients.get(uid)

    async def drop_client(self, uid: str) -> None:
        """Closes the sandbox's executor client and forgets its key: nothing talks to it
        any more."""
        self._executor_keys.pop(uid, None)
        client = self._clients.pop(uid, None)
        if client is not None:
            await client.close()

    async def _take_worker_uid(self) -> int:
        try:
            return self._worker_uids.take()
        except ResourceExhausted:
            # Controllers that died may still hold some: reclaim those and look again.
            await self.reconcile_worker_uids()
            return self._worker_uids.take()

    async def reconcile_worker_uids(self) -> None:
        # The stale ones first, the containers after: a controller that is gone makes none.
        stale = await asyncio.to_thread(self._worker_uids.stale)
        in_containers = {
            int(value)
            for container in await self._containers.list_managed(None)
            if (value := container.labels.get(LABEL_WORKER_UID, "")).isdigit()
        }
        await asyncio.to_thread(self._worker_uids.reconcile, stale, in_containers)


def _write_key(path: Path, key: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key)


def _remove_tree(path: str, podman_binary: str) -> None:
    """Removes a directory the sandbox could write into, however deep it made it, and
    whatever its own uids own in it."""
    # The usual case: the executor's stop took its socket with it, and an empty directory
    # goes as ourselves (rmtree cannot: it must read the directory, which is the sandbox's
    # root's, mode 0711), without a `podman unshare` (~50 ms of CPU per delete).
    with contextlib.suppress(OSError):
        os.rmdir(path)
        return
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:  # deeper than Python's recursion limit
        pass
    if os.path.lexists(path):
        # What the sandbox's uids own can only go as the root of our user namespace.
        command = [podman_binary, "unshare", "rm", "-rf", "--one-file-system", "--", path]
        subprocess.run(command, check=False, capture_output=True)
