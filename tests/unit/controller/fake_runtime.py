"""A container runtime in memory (controller.runtime.container.ContainerRuntime): each
"container" is a stand-in executor serving the sandbox's socket. Tests make containers fail to
start, exit, or vanish, as podman and the kernel would."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from controller.errors import Unavailable
from controller.runtime.container import (
    LABEL_REGISTRY,
    LABEL_UID,
    ContainerEvent,
    ContainerSpec,
    ContainerStatus,
    HostCapabilities,
    ImageInfo,
)
from petri.protocol import EXECUTOR_PROTOCOL
from tests.unit.controller.standin_executor import KeyFileMissing, Script, StandInExecutor

LABEL_MANIFEST = "io.petri.manifest"
# podman's remove returns well after the container's processes died, and the controller's
# executor client sees its call end meanwhile. An instant remove would let the controller close
# the channel first, and a read pending on it then raises CancelledError, which leaves the
# caller's ExecuteCode without an answer (a race of the executor client: its reads are not
# guarded as its writes are; test_service_execute.py shows it with executors_outlive_remove).
REMOVE_SECONDS = 0.02


class FakeEvents:
    """A subscription to the fake's events: what podman's stream is to PodmanRuntime."""

    def __init__(self, registry_label: str) -> None:
        self.registry_label = registry_label
        self._queue: asyncio.Queue[ContainerEvent | None] = asyncio.Queue()
        self.closed = False

    def __repr__(self) -> str:
        return f"<FakeEvents {self.registry_label} closed={self.closed}>"

    def put(self, event: ContainerEvent | None) -> None:
        self._queue.put_nowait(event)

    def __aiter__(self) -> FakeEvents:
        return self

    async def __anext__(self) -> ContainerEvent:
        event = await self._queue.get()
        if event is None:  # the stream ended (the podman service restarted)
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakeContainer:
    spec: ContainerSpec
    executor: StandInExecutor | None
    running: bool = True
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""

    def status(self) -> ContainerStatus:
        return ContainerStatus(
            self.spec.name,
            self.running,
            self.exit_code,
            self.oom_killed,
            dict(self.spec.labels),
            self.error,
        )


class FakeRuntime:
    def __init__(self, images: set[str], scripts: dict[str, Script] | None = None) -> None:
        self.images = images
        # What every sandbox's executor runs, by code; shared so a test scripts them all.
        self.scripts: dict[str, Script] = {} if scripts is None else scripts
        self.containers: dict[str, FakeContainer] = {}
        self.host = HostCapabilities("v2", memory=True, cpu=True, pids=True)
        # While set, start() raises it (podman down, a bad image...).
        self.start_error: Exception | None = None
        # While cleared, start() waits: a slow podman, to hold creates in progress.
        self.starts_open = asyncio.Event()
        self.starts_open.set()
        self.starts_waiting = 0
        self.starts = 0
        # While set, a started container exits at once with this message (a broken image).
        self.crash_on_start: str | None = None
        # While set, a removed container's executor goes on serving until shutdown(): its
        # connections stay open, as those of a process that takes its time to die.
        self.executors_outlive_remove = False
        # The protocol version the executors of containers started from now on report.
        self.executor_protocol = EXECUTOR_PROTOCOL
        # How long a remove takes after its container's executor stopped (a slow podman).
        self.remove_seconds = REMOVE_SECONDS
        self._lingering: list[StandInExecutor] = []
        # The event streams subscribed, the ended ones too; while cleared, events() waits (a
        # podman service that is down), and while set, events() raises it.
        self.subscriptions: list[FakeEvents] = []
        self.events_open = asyncio.Event()
        self.events_open.set()
        self.events_error: Exception | None = None
        # While False, no event is sent (a stream that missed them: the poll must find them).
        self.send_events = True

    def __repr__(self) -> str:
        return f"<FakeRuntime containers={len(self.containers)} starts={self.starts}>"

    def container_of(self, uid: str) -> FakeContainer | None:
        """The container of the sandbox with this uid (as its labels say)."""
        for container in self.containers.values():
            if container.spec.labels.get(LABEL_UID) == uid:
                return container
        return None

    def executor_of(self, uid: str) -> StandInExecutor:
        container = self.container_of(uid)
        assert container is not None and container.executor is not None, f"{uid}: no executor"
        return container.executor

    def uids(self) -> set[str]:
        """The sandbox uids of the running containers."""
        return {c.spec.labels.get(LABEL_UID, "") for c in self.containers.values() if c.running}

    # --- what tests do to containers ------------------------------------------------------

    async def exit(self, uid: str, exit_code: int = 137, oom_killed: bool = False) -> None:
        """The sandbox's container stops (its executor killed, OOM, `podman kill`); podman
        still lists it."""
        container = self.container_of(uid)
        assert container is not None, f"no container for {uid}"
        container.running, container.exit_code, container.oom_killed = False, exit_code, oom_killed
        if container.executor is not None:
            await container.executor.stop()

        self.publish(container, "died")
        if oom_killed:
            self.publish(container, "oom")

    async def vanish(self, uid: str) -> None:
        """podman loses the sandbox's container altogether."""
        await self.exit(uid)
        gone = [c for c in self.containers.values() if c.spec.labels.get(LABEL_UID) == uid]
        for container in gone:
            del self.containers[container.spec.name]
            self.publish(container, "remove")

    def publish(self, container: FakeContainer, action: str) -> None:
        """Tells the container's event to the streams of its registry, as podman does."""
        if not self.send_events:
            return
        for stream in self.subscriptions:
            if not stream.closed and stream.registry_label == container.spec.labels.get(
                LABEL_REGISTRY
            ):
                stream.put(ContainerEvent(container.spec.name, action))

    def end_events(self) -> None:
        """Ends every event stream, as a restart of the podman service does."""
        for stream in self.subscriptions:
            stream.put(None)

    async def shutdown(self) -> None:
        """Stops every stand-in executor (the end of a test)."""
        for container in self.containers.values():
            if container.executor is not None:
                await container.executor.stop()
        for executor in self._lingering:
            await executor.stop()

    # --- ContainerRuntime -----------------------------------------------------------------

    async def check(self) -> HostCapabilities:
        return self.host

    async def image_exists(self, image: str) -> bool:
        return image in self.images

    async def list_images(self, repository: str) -> list[ImageInfo]:
        manifest = json.dumps({"python": "3.13.0", "os": "debian", "packages": {"numpy": "2"}})
        return [
            ImageInfo(image.rpartition(":")[2], {LABEL_MANIFEST: manifest}, 1 << 20, 0.0)
            for image in sorted(self.images)
            if image.rpartition(":")[0] == repository
        ]

    async def start(self, spec: ContainerSpec) -> None:
        self.starts_waiting += 1
        try:
            await self.starts_open.wait()
        finally:
            self.starts_waiting -= 1
        if self.start_error is not None:
            raise self.start_error
        if spec.image not in self.images:  # as podman refuses it
            raise Unavailable(f"{spec.image}: image not known")
        if spec.name in self.containers:
            raise Unavailable(f"container {spec.name} exists already")
        self.starts += 1
        if self.crash_on_start is not None:
            exited = FakeContainer(spec, None, False, 1, error=self.crash_on_start)
            self.containers[spec.name] = exited
            self.publish(exited, "died")  # during the controller's own create
            return
        try:
            executor: StandInExecutor | None = StandInExecutor(
                spec.socket_dir, self.scripts, self.executor_protocol
            )
        except KeyFileMissing as exc:  # the daemon exits: so does its container
            self.containers[spec.name] = FakeContainer(spec, None, False, 1, error=str(exc))
            self.publish(self.containers[spec.name], "died")
            return
        assert executor is not None
        self.containers[spec.name] = FakeContainer(spec, executor)
        await executor.start()

    async def status(self, name: str) -> ContainerStatus | None:
        container = self.containers.get(name)
        return None if container is None else container.status()

    async def remove(self, name: str) -> None:
        container = self.containers.pop(name, None)
        if container is not None:
            if container.executor is not None and self.executors_outlive_remove:
                self._lingering.append(container.executor)
            elif container.executor is not None:
                await container.executor.stop()
                await asyncio.sleep(self.remove_seconds)
            if container.running:
                self.publish(container, "died")
            self.publish(container, "remove")

    async def list_managed(self, registry_label: str | None) -> list[ContainerStatus]:
        return [
            c.status()
            for c in self.containers.values()
            if registry_label is None or c.spec.labels.get(LABEL_REGISTRY) == registry_label
        ]

    async def events(self, registry_label: str) -> FakeEvents:
        await self.events_open.wait()
        if self.events_error is not None:
            raise self.events_error
        stream = FakeEvents(registry_label)
        self.subscriptions.append(stream)
        return stream

    def live_subscriptions(self) -> int:
        return sum(1 for stream in self.subscriptions if not stream.closed)

    async def logs_tail(self, name: str, lines: int) -> str:
        return ""

    async def close(self) -> None:
        pass  # containers outlive the controller, as podman's do
