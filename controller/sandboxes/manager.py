"""The sandbox manager: creates, finds, updates, deletes sandboxes and runs code in them.

It *has a* registry (what exists), a container runtime (podman) and one executor client per
running sandbox. Lifecycle steps that must not be abandoned half-way (provisioning, deletion)
run shielded from the caller's cancellation: a client that gives up never leaves a container
without a registry row, or a row without its container.
"""

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog

from controller.config import Config
from controller.errors import (
    AlreadyExists,
    DeadlineExceeded,
    ExecutorFailed,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutcomeUnknown,
    ResourceExhausted,
    Unavailable,
)
from controller.names import SandboxName, generate_sandbox_id, validate_sandbox_id
from controller.quoting import quote
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec, State
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
    HostCapabilities,
)
from controller.runtime.executor_client import ExecutorClient
from controller.sandboxes.labels import validate_display_name, validate_labels
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.warm_pool import WarmPool
from controller.sandboxes.worker_uids import WorkerUids, shared_directory
from controller.store.registry import ListQuery, Registry
from controller.units import format_duration
from petri.v1 import execution_pb2, executor_pb2

log = structlog.get_logger()

_PROFILE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")
# How often a starting sandbox's container is checked for an early exit.
START_CHECK_INTERVAL = 0.5
# The image label that lists what an image carries (written by sandbox-image/build.sh).
LABEL_MANIFEST = "io.petri.manifest"
# The longest unix socket path the kernel accepts is 107 bytes.
MAX_SOCKET_PATH = 107
# The least of each resource a sandbox may ask for (memory: Config.min_memory): below these,
# the executor, its worker and the preloaded interpreter cannot start or do nothing useful.
MIN_CPU_MILLIS = 100
MIN_DISK_BYTES = 16 << 20
MIN_PROCESSES = 32
# How often a new warm pool member is asked whether it has preloaded its modules.
PRELOAD_POLL_INTERVAL = 0.02
# At shutdown, how long deleting the warm pool's members may take (a restart removes the rest).
POOL_DRAIN_TIMEOUT = 10.0
# Beyond the kill grace, how long an executor whose caller left an execution may take to
# answer a status call before its sandbox is marked TERMINATED as stuck.
ANSWER_CHECK_SLACK = timedelta(seconds=5)


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class CreateParams:
    project: str
    sandbox_id: str
    display_name: str
    labels: dict[str, str]
    image_profile: str
    runtime: Runtime | None
    resources: Resources
    expire_time: datetime | None
    ttl: timedelta | None
    request_id: str


def create_request_json(params: CreateParams) -> str:
    """The fields of a Create that a retry with its request_id must repeat, as JSON."""
    resources = params.resources
    fields: dict[str, object] = {
        "sandbox_id": params.sandbox_id,
        "sandbox.display_name": params.display_name,
        "sandbox.labels": dict(sorted(params.labels.items())),
        "sandbox.spec.image_profile": params.image_profile,
        "sandbox.spec.runtime": params.runtime.name if params.runtime else "",
        "sandbox.spec.resources.cpu_millis": resources.cpu_millis,
        "sandbox.spec.resources.memory_bytes": resources.memory_bytes,
        "sandbox.spec.resources.disk_bytes": resources.disk_bytes,
        "sandbox.spec.resources.max_processes": resources.max_processes,
        "sandbox.ttl": params.ttl.total_seconds() if params.ttl is not None else None,
        "sandbox.expire_time": params.expire_time.isoformat() if params.expire_time else None,
    }
    return json.dumps(fields, sort_keys=True)


def differing_fields(first: str, retry: str) -> list[str]:
    """The fields in which two create_request_json values differ."""
    before, after = json.loads(first), json.loads(retry)
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@dataclass(frozen=True)
class ImageProfile:
    profile: str
    python_version: str
    os: str
    packages: dict[str, str]
    size_bytes: int
    create_time: datetime
    is_default: bool


@dataclass(frozen=True)
class UpdateParams:
    display_name: str | None = None
    labels: dict[str, str] | None = None
    expire_time: datetime | None = None
    ttl: timedelta | None = None


class SandboxManager:
    def __init__(
        self,
        config: Config,
        registry: Registry,
        runtime: ContainerRuntime,
        quotas: Quotas,
        clock: Callable[[], datetime] = utcnow,
        gvisor: ContainerRuntime | None = None,
    ) -> None:
        self._config = config
        # Creates gVisor sandboxes; everything else about them goes through `runtime`, which
        # shares the same podman storage.
        self._gvisor = gvisor
        self._quotas = quotas
        # Counting a project's sandboxes and adding one happen together, per project.
        self._project_locks: dict[str, asyncio.Lock] = {}
        self._registry = registry
        self._runtime = runtime
        self._clock = clock
        self._clients: dict[str, ExecutorClient] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        # Sandboxes being created, by uid: a retried Create or a Delete waits for them.
        self._provisioning: dict[str, asyncio.Future[SandboxRecord]] = {}
        self._host = HostCapabilities("unknown", memory=False, cpu=False, pids=False)
        self._pool = WarmPool({}, self._start_pool_member)
        # The secret each sandbox's executor wants with every call, by sandbox uid (also a
        # label of its container, for a restarted controller).
        self._executor_keys: dict[str, str] = {}
        self._socket_root = config.runtime_dir / "s"
        # Tells this controller's containers from those of another registry on the same podman.
        self.registry_label = hashlib.sha256(
            str(config.database_path.resolve()).encode()
        ).hexdigest()[:12]
        # The uid user code runs as, by sandbox uid (the executor is the sandbox's root):
        # reserved host-wide, with every controller of this service user.
        self._worker_uids = WorkerUids(config.userns_size, shared_directory(), self.registry_label)
        self._worker_uid_of: dict[str, int] = {}
        # Checks that an executor still answers after an execution its caller left, by
        # sandbox uid: held here so none is garbage-collected, and cancelled on close.
        self._answer_checks: dict[str, asyncio.Task[None]] = {}

    def __repr__(self) -> str:
        return f"<SandboxManager registry={self.registry_label} clients={len(self._clients)}>"

    @property
    def host(self) -> HostCapabilities:
        return self._host

    @property
    def warm_pool(self) -> WarmPool:
        return self._pool

    # --- startup and shutdown -------------------------------------------------------------

    async def start(self) -> None:
        """Checks the runtime and adopts the sandboxes that survived a controller restart."""
        self._host = await self._runtime.check()
        longest = self._socket_root / ("x" * 32) / SOCKET_NAME
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise ValueError(
                f"runtime_dir {self._config.runtime_dir} is too long for unix socket paths "
                f"({len(str(longest))} > {MAX_SOCKET_PATH} bytes): choose a shorter --runtime-dir"
            )
        self._socket_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._worker_uids.open()
        await self._adopt()
        await self._reconcile_worker_uids()
        self._pool = WarmPool(await self._pool_sizes(), self._start_pool_member)
        self._pool.start()

    async def _pool_sizes(self) -> dict[Spec, int]:
        """The warm pool's keys: each configured target as the spec a create must match."""
        sizes: dict[Spec, int] = {}
        for target in self._config.warm_pool:
            params = CreateParams(
                project=POOL_PROJECT,
                sandbox_id="",
                display_name="",
                labels={},
                image_profile=target.profile,
                runtime=Runtime[target.runtime.upper()] if target.runtime else None,
                resources=target.resources,
                expire_time=None,
                ttl=None,
                request_id="",
            )
            try:
                spec = await self._effective_spec(params, check_image=False)
            except (InvalidArgument, FailedPrecondition) as exc:
                raise ValueError(f"warm_pool entry {target}: {exc}") from exc
            sizes[spec] = sizes.get(spec, 0) + target.size
        return {spec: size for spec, size in sizes.items() if size > 0}

    async def close(self) -> None:
        checks = list(self._answer_checks.values())
        for check in checks:
            check.cancel()
        await asyncio.gather(*checks, return_exceptions=True)
        await self._pool.close()
        # Every member goes, ready or still starting (its start runs on, shielded): the
        # pool's are the only sandboxes that do not outlive the controller.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(POOL_DRAIN_TIMEOUT):
                await asyncio.gather(*self._provisioning.values(), return_exceptions=True)
                for record in await self._registry.list_live():
                    if record.project == POOL_PROJECT:
                        await self._delete(record, "deleted")
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    async def _adopt(self) -> None:
        records = await self._registry.list_live()
        containers = {c.name: c for c in await self._runtime.list_managed(self.registry_label)}
        for record in records:
            container = containers.pop(record.container_name, None)
            worker_uid = container.labels.get(LABEL_WORKER_UID, "") if container else ""
            if worker_uid.isdigit():
                self._worker_uids.mark(int(worker_uid))
                self._worker_uid_of[record.uid] = int(worker_uid)
            if container is not None and container.labels.get(LABEL_EXECUTOR_KEY):
                self._executor_keys[record.uid] = container.labels[LABEL_EXECUTOR_KEY]
            try:
                await self._adopt_one(record, container)
            except Exception:  # one broken sandbox must not keep the service from starting
                log.exception("could not adopt a sandbox", sandbox=record.name)
        for orphan in containers.values():
            log.info("removing a container the registry does not know", container=orphan.name)
            await self._runtime.remove(orphan.name)
        log.info("adopted sandboxes", count=len(self._clients))

    async def check_containers(self) -> None:
        """Marks TERMINATED the RUNNING sandboxes whose container died or vanished underneath
        us (killed from outside, OOM, the executor killed inside it, podman lost it)."""
        records = [r for r in await self._registry.list_live() if r.state is State.RUNNING]
        if not records:
            return
        containers = {c.name: c for c in await self._runtime.list_managed(self.registry_label)}
        for record in records:
            container = containers.get(record.container_name)
            if container is not None and container.running:
                continue
            if record.uid in self._provisioning:
                continue
            # Inspect for the reason (exit code, OOM), and to be sure it is not just starting.
            status = await self._runtime.status(record.container_name)
            if status is not None and status.running:
                continue
            why = (
                "its container is gone" if status is None else f"its container {status.describe()}"
            )
            if record.project == POOL_PROJECT:
                log.warning("a warm pool sandbox died", uid=record.uid, why=why)
                await self._delete(record, "died")
                continue
            await self._terminate(record, why)

    async def _adopt_one(self, record: SandboxRecord, container: ContainerStatus | None) -> None:
        if record.project == POOL_PROJECT or record.state is State.PROVISIONING:
            # A warm pool member of the previous process (it may not match this one's
            # settings: preload, images; a new pool starts from nothing), or a sandbox whose
            # Create failed with the controller: it never existed for the caller.
            await self._runtime.remove(record.container_name)
            await self._remove_socket_dir(record)
            self._release_worker_uid(record.uid)
            await self._registry.forget(record.uid)
        elif record.state is State.DEPROVISIONING:
            await self._finish_delete(record, "deleted")
        elif record.state is State.RUNNING and (container is None or not container.running):
            why = (
                "its container is gone"
                if container is None
                else f"its container {container.describe()}"
            )
            await self._terminate(record, f"found at controller start: {why}")
        elif record.state is State.RUNNING:
            self._client_for(record)

    # --- create ---------------------------------------------------------------------------

    async def create(self, params: CreateParams) -> SandboxRecord:
        earlier = await self._earlier_answer(params)
        if earlier is not None:
            return earlier
        record = self._new_record(params, await self._effective_spec(params))
        try:
            claimed = await self._claim_from_pool(record)
        except AlreadyExists:
            earlier = await self._earlier_answer(params)  # a concurrent retry won the race
            if earlier is not None:
                return earlier
            raise
        if claimed is not None:
            return claimed
        self._quotas.take_create_slot()
        try:
            async with self._project_locks.setdefault(record.project, asyncio.Lock()):
                live = await self._registry.count_live(record.project)
                self._quotas.check_sandbox_count(record.project, live)
                await self._registry.insert(record)
        except AlreadyExists:
            self._quotas.release_create_slot()
            earlier = await self._earlier_answer(params)  # a concurrent retry won the race
            if earlier is not None:
                return earlier
            raise
        except BaseException:
            self._quotas.release_create_slot()
            raise
        # The caller may go away; provisioning finishes (or cleans up) regardless, and holds
        # its slot until then.
        future = asyncio.ensure_future(self._provision(record))
        self._provisioning[record.uid] = future

        def done(_: object) -> None:
            self._provisioning.pop(record.uid, None)
            self._quotas.release_create_slot()

        future.add_done_callback(done)
        return await asyncio.shield(future)

    async def _claim_from_pool(self, record: SandboxRecord) -> SandboxRecord | None:
        """The sandbox `record` describes, made of a warm pool member of its spec; None when
        the pool has none ready."""
        while (member := self._pool.take(record.spec)) is not None:
            try:
                # Its channel is open: a status call costs a millisecond and proves it answers.
                await self._client_for(member).status(timeout=1.0)
            except ExecutorFailed as exc:
                log.warning("a warm pool sandbox does not answer", uid=member.uid, error=str(exc))
                await asyncio.shield(asyncio.ensure_future(self._delete(member, "died")))
                continue
            claimed = replace(
                record,
                uid=member.uid,
                container_name=member.container_name,
                socket_dir=member.socket_dir,
                state=State.RUNNING,
                incarnation=member.incarnation,
            )
            # Once the claim is written, the sandbox is the caller's even if the caller left:
            # the claim runs on, shielded, so a member is never both claimed and given back.
            if await asyncio.shield(asyncio.ensure_future(self._claim(member, claimed))):
                log.info("sandbox created from the warm pool", sandbox=claimed.name, uid=member.uid)
                return claimed
        return None

    async def _claim(self, member: SandboxRecord, claimed: SandboxRecord) -> bool:
        try:
            async with self._project_locks.setdefault(claimed.project, asyncio.Lock()):
                live = await self._registry.count_live(claimed.project)
                self._quotas.check_sandbox_count(claimed.project, live)
                return await self._registry.claim_pool_member(
                    member.uid,
                    project=claimed.project,
                    sandbox_id=claimed.sandbox_id,
                    display_name=claimed.display_name,
                    labels=claimed.labels,
                    expire_time=claimed.expire_time,
                    request_id=claimed.request_id,
                    create_request=claimed.create_request,
                    create_time=claimed.create_time,
                    update_time=claimed.update_time,
                    last_active_time=claimed.last_active_time,
                )
        except BaseException:  # over quota, name taken: the member is still unused
            self._pool.give_back(member)
            raise

    async def _start_pool_member(self, spec: Spec) -> SandboxRecord:
        """Starts a warm pool member of this spec; returns it once it has preloaded."""
        image = self._config.image_for(spec.image_profile)
        if not await self._runtime.image_exists(image):
            raise FailedPrecondition(
                f"no image {image}: build it with sandbox-image/build.sh {spec.image_profile}"
            )
        # A slot as users' creates leave one: the pool never takes their place.
        while True:
            if self._quotas.try_take_create_slot():
                break
            await asyncio.sleep(START_CHECK_INTERVAL)
        try:
            now = self._clock()
            uid = secrets.token_hex(16)
            record = SandboxRecord(
                uid=uid,
                project=POOL_PROJECT,
                sandbox_id=uid,
                spec=spec,
                state=State.PROVISIONING,
                create_time=now,
                update_time=now,
                # Past it, the reaper deletes the member and the pool starts a fresh one.
                expire_time=now + self._config.max_ttl,
                last_active_time=now,
                container_name=f"petri-{uid}",
                socket_dir=str(self._socket_root / uid),
            )
            await self._registry.insert(record)
            future = asyncio.ensure_future(self._provision(record))
            self._provisioning[uid] = future
            future.add_done_callback(lambda _: self._provisioning.pop(uid, None))
            record = await asyncio.shield(future)
        finally:
            self._quotas.release_create_slot()
        try:
            await self._wait_preloaded(record)
        except BaseException:
            await asyncio.shield(asyncio.ensure_future(self._delete(record, "died")))
            raise
        return record

    async def _wait_preloaded(self, record: SandboxRecord) -> None:
        client = self._client_for(record)
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

    async def _earlier_answer(self, params: CreateParams) -> SandboxRecord | None:
        """The answer to a retried Create (its request_id made a sandbox already); None for
        a first request."""
        if not params.request_id:
            return None
        previous = await self._registry.get_by_request_id(params.project, params.request_id)
        return None if previous is None else await self._replay(previous, params)

    async def _replay(self, previous: SandboxRecord, params: CreateParams) -> SandboxRecord:
        """The answer to a retried Create: the sandbox the first request made, once RUNNING.
        AlreadyExists when the request_id was reused for a different request (AIP-155: a
        request_id names one request)."""
        request_id = quote(params.request_id)
        if previous.create_request is not None:  # None: created before requests were kept
            differing = differing_fields(previous.create_request, create_request_json(params))
            if differing:
                raise AlreadyExists(
                    f"request_id {request_id} was already used by a different CreateSandbox "
                    f"(which created {previous.name}); these fields differ: "
                    f"{', '.join(differing)}. Retry with the same request, or use a new "
                    "request_id for a new sandbox"
                )
        if previous.delete_time is not None:
            raise AlreadyExists(
                f"request_id {request_id} already created {previous.name}, which was "
                f"{previous.delete_reason} at {previous.delete_time.isoformat()}"
            )
        pending = self._provisioning.get(previous.uid)
        if pending is not None:
            return await asyncio.shield(pending)
        return previous

    async def _effective_spec(self, params: CreateParams, check_image: bool = True) -> Spec:
        profile = params.image_profile or self._config.default_image_profile
        if _PROFILE.fullmatch(profile) is None:
            raise InvalidArgument(
                f"invalid image_profile {quote(profile)}: lowercase letters, digits, '.', '_', '-'"
            )
        default = Runtime.GVISOR if self._config.default_runtime == "gvisor" else Runtime.RUNC
        runtime = params.runtime or default
        if runtime is Runtime.GVISOR and self._gvisor is None:
            raise FailedPrecondition(
                "runtime GVISOR is not available on this server (gVisor's runsc is not "
                "installed); use RUNC or leave it unset"
            )
        image = self._config.image_for(profile)
        if check_image and not await self._runtime.image_exists(image):
            raise FailedPrecondition(
                f"image profile {profile!r} is not available on this server (no image {image}); "
                f"an operator can build it with sandbox-image/build.sh {profile}"
            )
        return Spec(profile, runtime, self._effective_resources(params.resources, runtime))

    def _cgroups_for(self, runtime: Runtime) -> HostCapabilities:
        """What cgroups enforce for a sandbox of this runtime: runsc runs with
        --ignore-cgroups, so a gVisor sandbox gets none, whatever the host delegates."""
        if runtime is Runtime.GVISOR:
            return HostCapabilities(self._host.cgroup_version, memory=False, cpu=False, pids=False)
        return self._host

    def _effective_resources(self, requested: Resources, runtime: Runtime) -> Resources:
        cgroups = self._cgroups_for(runtime)
        minimums = {
            "cpu_millis": MIN_CPU_MILLIS,
            "memory_bytes": self._config.min_memory,
            "disk_bytes": MIN_DISK_BYTES,
            "max_processes": MIN_PROCESSES,
        }
        for field_name, minimum in minimums.items():
            asked = getattr(requested, field_name)
            if asked < 0:
                raise InvalidArgument(f"resources.{field_name} must not be negative")
            if 0 < asked < minimum:
                raise InvalidArgument(
                    f"resources.{field_name} {asked} is below this server's minimum {minimum}: "
                    "ask for at least that much, or leave it unset for the default"
                )
        unenforceable = [
            name
            for name, asked, can in (("cpu_millis", requested.cpu_millis, cgroups.cpu),)
            if asked and not can
        ]
        if unenforceable:
            raise FailedPrecondition(
                f"this server cannot enforce resources.{', resources.'.join(unenforceable)} "
                f"for a {runtime.name} sandbox (no delegated cgroup controller: rootless "
                f"podman on cgroups {self._host.cgroup_version}, or gVisor, which runs without "
                "cgroups); leave them unset"
            )
        disk = requested.disk_bytes or self._config.workspace_size
        if disk > self._config.workspace_size:
            raise InvalidArgument(
                f"resources.disk_bytes {disk} exceeds this server's maximum "
                f"{self._config.workspace_size}"
            )
        memory = requested.memory_bytes or self._config.default_memory
        if memory > self._config.max_memory:
            raise InvalidArgument(
                f"resources.memory_bytes {memory} exceeds this server's maximum "
                f"{self._config.max_memory}"
            )
        processes = requested.max_processes or self._config.default_max_processes
        if processes > self._config.max_processes:
            raise InvalidArgument(
                f"resources.max_processes {processes} exceeds this server's maximum "
                f"{self._config.max_processes}"
            )
        return replace(requested, disk_bytes=disk, max_processes=processes, memory_bytes=memory)

    def expiry(
        self, now: datetime, expire_time: datetime | None, ttl: timedelta | None
    ) -> datetime:
        """The expire_time for a create or an update; InvalidArgument beyond the maximum."""
        maximum = self._config.max_ttl
        if ttl is not None:
            if ttl <= timedelta(0):
                raise InvalidArgument("ttl must be positive")
            if ttl > maximum:
                raise InvalidArgument(
                    f"ttl {format_duration(ttl)} exceeds the maximum of {format_duration(maximum)}"
                )
            return now + ttl
        if expire_time is not None:
            if expire_time <= now:
                raise InvalidArgument(f"expire_time {expire_time.isoformat()} is not in the future")
            if expire_time > now + maximum:
                raise InvalidArgument(
                    f"expire_time {expire_time.isoformat()} is more than the maximum of "
                    f"{format_duration(maximum)} from now"
                )
            return expire_time
        return now + self._config.default_ttl

    def _new_record(self, params: CreateParams, spec: Spec) -> SandboxRecord:
        now = self._clock()
        sandbox_id = (
            validate_sandbox_id(params.sandbox_id) if params.sandbox_id else generate_sandbox_id()
        )
        uid = secrets.token_hex(16)
        return SandboxRecord(
            uid=uid,
            project=params.project,
            sandbox_id=sandbox_id,
            display_name=validate_display_name(params.display_name),
            labels=validate_labels(params.labels),
            spec=spec,
            state=State.PROVISIONING,
            create_time=now,
            update_time=now,
            expire_time=self.expiry(now, params.expire_time, params.ttl),
            last_active_time=now,
            request_id=params.request_id or None,
            create_request=create_request_json(params) if params.request_id else None,
            container_name=f"petri-{uid}",
            socket_dir=str(self._socket_root / uid),
        )

    async def _provision(self, record: SandboxRecord) -> SandboxRecord:
        gvisor = record.spec.runtime is Runtime.GVISOR
        cgroups = self._cgroups_for(record.spec.runtime)
        labels = {
            LABEL_MANAGED: "true",
            LABEL_REGISTRY: self.registry_label,
            LABEL_UID: record.uid,
        }
        worker_uid = await self._take_worker_uid()
        self._worker_uid_of[record.uid] = worker_uid
        labels[LABEL_WORKER_UID] = str(worker_uid)
        # A file only the sandbox's root can read (not the environment: gVisor shows PID 1's
        # to every uid); a label keeps it for a restarted controller.
        key = self._executor_keys[record.uid] = secrets.token_urlsafe(32)
        labels[LABEL_EXECUTOR_KEY] = key
        spec = ContainerSpec(
            name=record.container_name,
            image=self._config.image_for(record.spec.image_profile),
            labels=labels,
            socket_dir=Path(record.socket_dir),
            workspace_bytes=record.spec.resources.disk_bytes,
            tmp_bytes=self._config.tmp_size,
            open_files=self._config.open_files,
            # The memory cgroup where the host delegates it; else the interpreter's address
            # space (RLIMIT_AS, set by the executor on the worker).
            memory_bytes=record.spec.resources.memory_bytes if cgroups.memory else 0,
            cpu_millis=record.spec.resources.cpu_millis,
            # The sandbox's process limit is the worker's RLIMIT_NPROC on a uid of its own
            # (PETRI_PROCESS_LIMIT), plus the pids cgroup where the host delegates it.
            max_processes=record.spec.resources.max_processes if cgroups.pids else 0,
            userns_size=0 if gvisor else self._config.userns_size,
            environment={
                "PETRI_SANDBOX_UID": record.uid,  # what executors of older images check
                "PETRI_WORKER_UID": str(worker_uid),
                # The executor sets it on user code's uid, which is this sandbox's alone.
                "PETRI_PROCESS_LIMIT": str(record.spec.resources.max_processes),
                "PETRI_MEMORY_LIMIT": (
                    "0" if cgroups.memory else str(record.spec.resources.memory_bytes)
                ),
                "PETRI_PRELOAD": ",".join(
                    self._config.gvisor_preload if gvisor else self._config.preload
                ),
            },
        )
        try:
            # podman gives it to the sandbox's root (its own uids); nobody else can reach it:
            # its parent is ours alone (0700).
            os.mkdir(record.socket_dir, 0o700)  # on the runtime tmpfs: fine on the loop
            # The executor answers only calls that carry this key (see executor_client).
            _write_key(Path(record.socket_dir) / KEY_FILE_NAME, key)
            creator = self._gvisor if record.spec.runtime is Runtime.GVISOR else self._runtime
            assert creator is not None
            await creator.start(spec)
            client = self._client_for(record)
            status = await self._wait_started(record, client)
        except BaseException as exc:
            log.warning("sandbox failed to start", sandbox=record.name, error=str(exc))
            with contextlib.suppress(Exception):
                await self._runtime.remove(record.container_name)
            await self._forget_client(record.uid)
            await self._remove_socket_dir(record)
            self._release_worker_uid(record.uid)
            # It never existed for the caller, who gets the error: a retry may start afresh.
            await self._registry.forget(record.uid)
            raise
        record.state = State.RUNNING
        record.incarnation = _checked_incarnation(status.incarnation)
        record.update_time = self._clock()
        await self._registry.set_fields(
            record.uid,
            state=record.state,
            incarnation=record.incarnation,
            update_time=record.update_time,
        )
        log.info("sandbox created", sandbox=record.name, uid=record.uid)
        return record

    async def _wait_started(
        self, record: SandboxRecord, client: ExecutorClient
    ) -> executor_pb2.ExecutorStatus:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.start_timeout.total_seconds()
        while True:
            try:
                return await client.wait_ready(START_CHECK_INTERVAL)
            except Unavailable:
                if loop.time() > deadline:
                    raise
            status = await self._runtime.status(record.container_name)
            if status is None or not status.running:
                why = "vanished" if status is None else status.describe()
                logs = await self._runtime.logs_tail(record.container_name, 20)
                raise Unavailable(
                    f"the sandbox's container {why} while starting"
                    + (f"; its last output:\n{logs}" if logs else "")
                )

    async def image_profiles(self) -> list[ImageProfile]:
        """The profiles built on this server, with their manifests (the images' labels)."""
        profiles = []
        images = await self._runtime.list_images(self._config.image_repository)
        for image in sorted(images, key=lambda i: i.tag):
            try:
                manifest = json.loads(image.labels.get(LABEL_MANIFEST, "{}"))
            except ValueError:
                manifest = {}
            packages = manifest.get("packages") if isinstance(manifest, dict) else None
            profiles.append(
                ImageProfile(
                    profile=image.tag,
                    python_version=str(manifest.get("python", "")),
                    os=str(manifest.get("os", "")),
                    packages={str(k): str(v) for k, v in (packages or {}).items()},
                    size_bytes=image.size_bytes,
                    create_time=datetime.fromtimestamp(image.created, UTC),
                    is_default=image.tag == self._config.default_image_profile,
                )
            )
        return profiles

    # --- read -----------------------------------------------------------------------------

    async def get(self, name: SandboxName) -> SandboxRecord:
        record = await self._registry.get_live(name.project, name.sandbox_id)
        if record is None:
            raise await self._not_found(name)
        return record

    async def _not_found(self, name: SandboxName) -> NotFound:
        tombstone = await self._registry.get_latest_tombstone(name.project, name.sandbox_id)
        if tombstone is not None and tombstone.delete_time is not None:
            return NotFound(
                f"sandbox {name} was {tombstone.delete_reason} at "
                f"{tombstone.delete_time.isoformat()}"
            )
        return NotFound(f"sandbox {name} does not exist")

    async def list_page(self, query: ListQuery) -> list[SandboxRecord]:
        return await self._registry.list_page(query)

    # --- update ---------------------------------------------------------------------------

    async def update(self, name: SandboxName, params: UpdateParams) -> SandboxRecord:
        record = await self.get(name)
        now = self._clock()
        fields: dict[str, object] = {"update_time": now}
        if params.display_name is not None:
            fields["display_name"] = validate_display_name(params.display_name)
        if params.labels is not None:
            fields["labels"] = validate_labels(params.labels)
        if params.expire_time is not None or params.ttl is not None:
            fields["expire_time"] = self.expiry(now, params.expire_time, params.ttl)
        if not await self._registry.set_fields(record.uid, **fields):
            raise await self._not_found(name)  # deleted meanwhile
        return await self.get(name)

    # --- delete ---------------------------------------------------------------------------

    async def delete(self, name: SandboxName, allow_missing: bool) -> None:
        record = await self._registry.get_live(name.project, name.sandbox_id)
        pending = self._provisioning.get(record.uid) if record is not None else None
        if pending is not None:  # let its creation finish (or fail) first
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
            record = await self._registry.get_live(name.project, name.sandbox_id)
        if record is None:
            if allow_missing:
                return
            raise await self._not_found(name)
        await asyncio.shield(asyncio.ensure_future(self._delete(record, "deleted")))

    async def expire(self, record: SandboxRecord) -> None:
        """Deletes a sandbox whose time is up (the reaper's call); its tombstone says so."""
        if record.uid in self._provisioning:
            return  # its Create is still running; the next round takes it
        await asyncio.shield(asyncio.ensure_future(self._delete(record, "expired")))

    async def _delete(self, record: SandboxRecord, reason: str) -> None:
        if not await self._registry.set_fields(
            record.uid, state=State.DEPROVISIONING, update_time=self._clock()
        ):
            return  # deleted by someone else meanwhile
        await self._finish_delete(record, reason)

    async def _finish_delete(self, record: SandboxRecord, reason: str) -> None:
        # The container first: executions in flight then end with a lost executor, which they
        # report as "deleted during the execution", rather than with a closed channel. An idle
        # session would make the executor wait its stop grace for nothing: it goes before.
        client = self._clients.get(record.uid)
        if client is not None:
            client.end_idle_session()
        await self._runtime.remove(record.container_name)
        await self._forget_client(record.uid)
        await self._remove_socket_dir(record)
        self._release_worker_uid(record.uid)
        if record.project == POOL_PROJECT:
            self._pool.drop(record.uid)
            await self._registry.forget(record.uid)  # it never was anyone's sandbox
        else:
            await self._tombstone(record, reason)
        self._locks.pop(record.uid, None)
        log.info("sandbox deleted", sandbox=record.name, reason=reason)

    async def _tombstone(self, record: SandboxRecord, reason: str) -> None:
        now = self._clock()
        await self._registry.set_fields(
            record.uid, delete_time=now, delete_reason=reason, update_time=now
        )

    async def _terminate(self, record: SandboxRecord, why: str) -> None:
        await self._forget_client(record.uid)
        await self._registry.set_fields(
            record.uid, state=State.TERMINATED, state_message=why, update_time=self._clock()
        )
        log.warning("sandbox terminated", sandbox=record.name, why=why)

    # --- execute --------------------------------------------------------------------------

    def execution_timeout(self, requested: timedelta | None) -> timedelta:
        if requested is None:
            return self._config.default_timeout
        if requested <= timedelta(0):
            raise InvalidArgument("timeout must be positive (or unset for the server default)")
        if requested > self._config.max_timeout:
            raise InvalidArgument(
                f"timeout {format_duration(requested)} exceeds the maximum of "
                f"{format_duration(self._config.max_timeout)}"
            )
        return requested

    async def execute(
        self,
        name: SandboxName,
        code: str,
        timeout: timedelta | None,
        inputs: AsyncIterator[execution_pb2.FileChunk] | None = None,
    ) -> AsyncGenerator[executor_pb2.ExecuteEvent, None]:
        """Sends the input files, runs the code after the executions queued before it, and
        yields the executor's events. `inputs` must be checked already (file_inputs).

        Close the iterator (contextlib.aclosing) to interrupt the execution early.
        """
        if not code:
            raise InvalidArgument("code is empty: send the Python source to run")
        if len(code.encode()) > self._config.max_code_bytes:
            raise InvalidArgument(
                f"code is {len(code.encode())} bytes, more than this server's maximum of "
                f"{self._config.max_code_bytes}"
            )
        effective_timeout = self.execution_timeout(timeout)
        record = await self.get(name)
        self._require_running(record)
        self._quotas.count_execute(record.project)
        request = executor_pb2.ExecuteRequest(
            code=code,
            max_stream_bytes=self._config.max_output_bytes,
            max_input_bytes=self._config.max_input_bytes,
            max_output_file_bytes=self._config.max_output_file_bytes,
            max_output_files=self._config.max_output_files,
        )
        request.timeout.FromTimedelta(effective_timeout)
        request.kill_grace.FromTimedelta(self._config.kill_grace)
        lock = self._locks.setdefault(record.uid, asyncio.Lock())
        queued = lock.locked()
        async with lock:
            if queued:  # it may have changed while this execution waited its turn
                record = await self.get(name)
                self._require_running(record)
            # A stuck executor must not hold this sandbox's queue for ever: once the request
            # and the input files are sent, it has this long to answer, not counting the time
            # the caller takes to take each event. The upload has as long again, which is not
            # the code's time.
            answer_within = (
                effective_timeout + self._config.kill_grace + self._config.executor_slack
            )
            seconds = answer_within.total_seconds()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + seconds
            waiting: asyncio.Timeout | None = None
            sent = False

            def start_the_clock() -> None:
                nonlocal sent, deadline
                sent = True
                deadline = loop.time() + seconds
                if waiting is not None and not waiting.expired():
                    waiting.reschedule(deadline)

            events = self._client_for(record).execute(request, inputs, start_the_clock)
            answered = False
            try:
                # Closing `events` interrupts the code: a caller that went away.
                async with contextlib.aclosing(events):
                    while True:
                        async with asyncio.timeout_at(deadline) as waiting:
                            event = await anext(events, None)
                        waiting = None
                        if event is None:
                            break
                        if event.HasField("result"):
                            answered = True
                            self._record_execution(record, event.result)
                        paused = loop.time()
                        yield event
                        deadline += loop.time() - paused
            except (asyncio.CancelledError, GeneratorExit):
                # The caller left before the result: nobody waits out the deadline below, so
                # a stuck executor would go unnoticed; ask it, in the background, if it answers.
                if not answered:
                    self._check_answering(record)
                raise
            except TimeoutError:
                if not sent:
                    raise DeadlineExceeded(
                        f"the input files of this execution did not all arrive within "
                        f"{format_duration(answer_within)}: send them, then half-close the "
                        "request stream; nothing ran"
                    ) from None
                raise await asyncio.shield(
                    asyncio.ensure_future(self._executor_stuck(record, answer_within))
                ) from None
            except ExecutorFailed as exc:
                raise await self._executor_failed(record, exc, sent) from exc

    def _require_running(self, record: SandboxRecord) -> None:
        if record.state is not State.RUNNING:
            detail = f": {record.state_message}" if record.state_message else ""
            raise FailedPrecondition(
                f"sandbox {record.name} is {record.state.name}{detail}; it cannot run code"
            )

    def _record_execution(self, record: SandboxRecord, result: executor_pb2.ExecuteResult) -> None:
        now = self._clock()
        # The executor's words are the sandbox's: keep them sane before storing them.
        record.execution_count = max(record.execution_count, min(result.execution_count, 2**62))
        record.incarnation = _checked_incarnation(result.incarnation)
        # Bookkeeping, off the reply's path: queued on the registry's thread, so any read
        # after this one sees it.
        self._registry.set_fields_soon(
            record.uid,
            execution_count=record.execution_count,
            incarnation=record.incarnation,
            last_active_time=now,
            update_time=now,
        )

    async def _executor_failed(
        self, record: SandboxRecord, failure: ExecutorFailed, sent: bool
    ) -> Exception:
        """The error for a call the executor ended without a result; `sent`: the request and
        its inputs were all sent, so the code may have run. (The executor's refusals of a
        request or its inputs come from the client as InvalidArgument or ResourceExhausted.)"""
        code, said = failure.code, failure.details  # the client bounds the executor's words
        # The executor refuses a call without its key before it reads a message.
        may_have_run = sent and not failure.refused
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is State.DEPROVISIONING:
            return FailedPrecondition(f"sandbox {record.name} was deleted during the execution")
        status = await self._runtime.status(record.container_name)
        if status is None or not status.running:
            why = (
                "its container is gone" if status is None else f"its container {status.describe()}"
            )
            await self._terminate(current, why)
            return FailedPrecondition(
                f"sandbox {record.name} is TERMINATED: {why}; "
                + (_MAY_HAVE_RUN if may_have_run else "the code did not run")
            )
        if not may_have_run:
            return Unavailable(
                f"could not reach the executor of sandbox {record.name} ({code}: {said}); "
                "the code did not run: retry"
            )
        return OutcomeUnknown(
            f"lost contact with the executor of sandbox {record.name} during the execution "
            f"({code}: {said}); {_MAY_HAVE_RUN}: check the sandbox before running it again"
        )

    async def _executor_stuck(self, record: SandboxRecord, waited: timedelta) -> Exception:
        """Marks TERMINATED a sandbox whose executor did not answer in time, and removes its
        container; returns the caller's error."""
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is State.DEPROVISIONING:
            return FailedPrecondition(f"sandbox {record.name} was deleted during the execution")
        why = (
            f"its executor stopped answering (an execution got no result within "
            f"{format_duration(waited)}: its timeout, the kill grace and "
            f"{format_duration(self._config.executor_slack)}); its container was removed"
        )
        if current.state is State.RUNNING:
            await self._remove_stuck(current, why)
        elif current.state_message:  # terminated meanwhile (its container died): say why
            why = current.state_message
        return OutcomeUnknown(
            f"sandbox {record.name} is TERMINATED: {why}; {_MAY_HAVE_RUN}; create a new sandbox"
        )

    async def _remove_stuck(self, current: SandboxRecord, why: str) -> None:
        """Marks TERMINATED a RUNNING sandbox whose executor stopped answering and removes its
        container (a stuck executor cannot be trusted to stop what it runs); its last output
        goes to the log."""
        logs = await self._runtime.logs_tail(current.container_name, 20)
        log.warning("an executor stopped answering", sandbox=current.name, logs=logs)
        # TERMINATED first: the container check must not find it RUNNING without a container.
        await self._terminate(current, why)
        await self._runtime.remove(current.container_name)

    def _check_answering(self, record: SandboxRecord) -> None:
        """Starts a check that the sandbox's executor answers, unless one is under way."""
        if record.uid in self._answer_checks:
            return
        task = asyncio.get_running_loop().create_task(self._answering_or_terminated(record))
        self._answer_checks[record.uid] = task
        task.add_done_callback(lambda _: self._answer_checks.pop(record.uid, None))

    async def _answering_or_terminated(self, record: SandboxRecord) -> None:
        """Asks the executor of a sandbox whose caller left an execution for its status, and
        marks the sandbox TERMINATED if it does not answer: a healthy one answers at once, even
        while it interrupts the code or runs the next execution."""
        client = self._clients.get(record.uid)
        if client is None:
            return  # terminated or deleted meanwhile: nothing left to check
        waited = self._config.kill_grace + ANSWER_CHECK_SLACK
        try:
            await client.status(timeout=waited.total_seconds())
            return
        except ExecutorFailed as exc:
            if not exc.timed_out:
                # Gone rather than stuck (a container that died, a delete that closed the
                # channel): the container check and the delete deal with those.
                log.info("executor check failed", sandbox=record.name, code=exc.code)
                return
        current = await self._registry.get_live(record.project, record.sandbox_id)
        if current is None or current.state is not State.RUNNING:
            return  # deleted, being deleted or terminated meanwhile
        if self._clients.get(record.uid) is not client:
            return  # a new client (an adopted sandbox): this answer is not about it
        await self._remove_stuck(
            current,
            f"its executor stopped answering (no status within {format_duration(waited)} "
            "after its caller left an execution); its container was removed",
        )

    # --- executor clients -----------------------------------------------------------------

    def _client_for(self, record: SandboxRecord) -> ExecutorClient:
        client = self._clients.get(record.uid)
        if client is None:
            client = ExecutorClient(
                Path(record.socket_dir) / SOCKET_NAME,
                self._executor_keys.get(record.uid, ""),
                self._config.max_message_bytes,
            )
            self._clients[record.uid] = client
        return client

    async def _forget_client(self, uid: str) -> None:
        self._executor_keys.pop(uid, None)
        client = self._clients.pop(uid, None)
        if client is not None:
            await client.close()

    async def _take_worker_uid(self) -> int:
        try:
            return self._worker_uids.take()
        except ResourceExhausted:
            # Controllers that died may still hold some: reclaim those and look again.
            await self._reconcile_worker_uids()
            return self._worker_uids.take()

    async def _reconcile_worker_uids(self) -> None:
        # The stale ones first, the containers after: a controller that is gone makes none.
        stale = await asyncio.to_thread(self._worker_uids.stale)
        in_containers = {
            int(value)
            for container in await self._runtime.list_managed(None)
            if (value := container.labels.get(LABEL_WORKER_UID, "")).isdigit()
        }
        await asyncio.to_thread(self._worker_uids.reconcile, stale, in_containers)

    def _release_worker_uid(self, uid: str) -> None:
        worker_uid = self._worker_uid_of.pop(uid, None)
        if worker_uid is not None:
            self._worker_uids.release(worker_uid)

    async def _remove_socket_dir(self, record: SandboxRecord) -> None:
        if record.socket_dir:
            await asyncio.to_thread(_remove_tree, record.socket_dir, self._config.podman_binary)


def _write_key(path: Path, key: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(key)


def _remove_tree(path: str, podman_binary: str) -> None:
    """Removes a directory the sandbox could write into, however deep it made it, and
    whatever its own uids own in it."""
    try:
        shutil.rmtree(path, ignore_errors=True)
    except RecursionError:  # deeper than Python's recursion limit
        pass
    if os.path.lexists(path):
        # What the sandbox's uids own can only go as the root of our user namespace.
        command = [podman_binary, "unshare", "rm", "-rf", "--one-file-system", "--", path]
        subprocess.run(command, check=False, capture_output=True)


_MAY_HAVE_RUN = "the code may have run (it had been sent to the sandbox)"

_INCARNATION = re.compile(r"[0-9a-f]{1,32}")


def _checked_incarnation(value: str) -> str:
    return value if _INCARNATION.fullmatch(value) else "invalid"
