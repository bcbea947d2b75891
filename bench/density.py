"""Density: the memory an idle sandbox costs, and how many idle sandboxes this machine holds
with every one still answering.

Memory is read from /proc, three ways: RSS (VmRSS, what the target names; it counts shared
pages once per process), PSS (smaps_rollup Pss: a shared page split between its sharers, so
the sum over sandboxes is what they really take) and the machine's MemAvailable drop, which
also sees what no sandbox process owns (kernel memory, the controller's and podman's growth)
but also whatever else the machine does meanwhile. A sandbox's processes are its conmon and
everything below it: tini, the executor daemon and its worker. The fit estimates extrapolate
from the memory left once they are held, at the PSS cost and at the MemAvailable drop.

Disk is measured too, because it can bind first: rootless overlay storage cannot idmap-mount
a layer, so podman runs a container whose uid mapping differs from its image's on an
ID-mapped copy of the whole image, one per mapping, kept after the container is deleted until
the image is removed. Sandboxes with mappings of their own (podman's --userns=auto) each get
a copy, and then share no page of their image's files either, so it costs memory as well.

Run as the service user (scripts/bench does): python -m bench.density [--count N] [--profile P]
"""

import argparse
import asyncio
import json
import os
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from bench.harness import channel_to, controller_process, median, print_table
from controller.runtime.container import LABEL_UID
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub

PARENT = "projects/bench"
# Marks this benchmark's sandboxes, so cleanup deletes them (and creates still in flight when
# it was interrupted) and nothing else in the project.
LABEL = ("bench", "density")
MiB = 1 << 20
GiB = 1 << 30
# Left free for the rest of the machine: creation stops short of them, and the fit estimates
# leave them. The disk floor is larger: the machine's other users build multi-GB images.
MEMORY_FLOOR = 2 * GiB
DISK_FLOOR = 10 * GiB
# Bounded so the controller's create queue and the 2 cores stay usable by others meanwhile.
CREATE_CONCURRENCY = 4
CHECK_CONCURRENCY = 8
DELETE_CONCURRENCY = 8
PROGRESS_EVERY = 25
# Per call: a create that must first copy a multi-GB image for its uid range takes a minute
# or more on a busy 2-core machine.
CALL_TIMEOUT_S = 600.0
# After the checks, before the reading: lets the workers' last allocations settle.
SETTLE_S = 2.0
# How long the CPU time of the held, idle sandboxes (and of the controller watching them) is
# sampled.
IDLE_WINDOW_S = 10.0
KINDS = ("conmon", "tini", "executor", "worker")


@dataclass(frozen=True)
class DensityFigures:
    profile: str
    sandboxes_held: int
    answering: int
    stopped_because: str  # empty when all `count` were created
    seconds_to_create: float
    available_before_bytes: int
    available_held_bytes: int
    rss_per_sandbox_bytes: float  # median over sandboxes of the sum over their processes
    pss_per_sandbox_bytes: float
    available_drop_per_sandbox_bytes: float
    by_process: dict[str, tuple[float, float]]  # kind → (median RSS, median PSS), bytes
    # Idle sandboxes this machine's memory holds, leaving MEMORY_FLOOR free: at the PSS cost,
    # and at the MemAvailable drop (which whatever else the machine runs meanwhile blurs;
    # None when others freed more than the sandboxes took).
    fit_estimate: int
    fit_estimate_by_available_drop: int | None
    image_bytes: int
    sandboxes_on_image_copy: int  # of those held, how many ran on an ID-mapped copy
    image_copies_used: int  # how many different copies they ran on
    image_copies_before: int  # podman's ID-mapped copies of the image, before the run
    image_copies_held: int  # ... while the sandboxes were held
    disk_free_before_bytes: int  # on podman's storage, before the run
    disk_free_held_bytes: int
    disk_free_after_bytes: int  # after the sandboxes were deleted
    disk_fit_estimate: int | None  # None: no image copy per sandbox, disk does not bind
    # CPU while they are held and idle, in % of one core: all sandboxes' processes together,
    # and the controller with its podman service (None when its pid was not given).
    idle_cpu_percent_sandboxes: float
    idle_cpu_percent_controller: float | None


@dataclass(frozen=True)
class ProcessMemory:
    kind: str
    pid: int
    rss_bytes: int
    pss_bytes: int


def _podman_json(*args: str) -> Any:
    result = subprocess.run(["podman", *args], check=True, capture_output=True, text=True)
    return json.loads(result.stdout)


@dataclass(frozen=True)
class _Storage:
    """Where podman keeps images and containers."""

    root: Path
    driver: str

    @classmethod
    def find(cls) -> "_Storage":
        store = _podman_json("info", "--format", "json")["store"]
        return cls(Path(store["graphRoot"]), str(store["graphDriverName"]))

    def image_copies(self) -> dict[str, int]:
        """How many ID-mapped copies of each image podman keeps. No podman command shows
        them: they are listed in containers/storage's own index of images, `mapped-layers`."""
        images = json.loads((self.root / f"{self.driver}-images" / "images.json").read_text())
        return {image["id"]: len(image.get("mapped-layers") or []) for image in images}


@dataclass(frozen=True)
class _Machine:
    """What the machine has left: memory, and disk where podman keeps containers."""

    available_bytes: int
    disk_free_bytes: int

    @classmethod
    def read(cls, storage: _Storage) -> "_Machine":
        disk = os.statvfs(storage.root)
        return cls(mem_available(), disk.f_bavail * disk.f_frsize)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _kib_field(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0  # a zombie has no memory lines


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc/*/stat."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # it exited while we looked
            continue
        # The command name may hold spaces and parentheses: the fields start after the last ')'.
        parents[int(stat.parent.name)] = int(text.rpartition(")")[2].split()[1])
    return parents


def _descendants(root: int, parents: dict[int, int]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _cpu_seconds(pids: Iterable[int]) -> float:
    """User plus system time of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:  # it exited while we looked
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    return ticks / os.sysconf("SC_CLK_TCK")


async def _idle_cpu_percent(groups: list[set[int]]) -> list[float]:
    """CPU use of each group of processes over IDLE_WINDOW_S, in % of one core."""
    start = [_cpu_seconds(pids) for pids in groups]
    await asyncio.sleep(IDLE_WINDOW_S)
    return [
        (_cpu_seconds(pids) - begun) / IDLE_WINDOW_S * 100
        for pids, begun in zip(groups, start, strict=True)
    ]


def _kind(pid: int, conmon_pid: int) -> str:
    if pid == conmon_pid:
        return "conmon"
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm == "tini":  # before the command line: tini's ends with the executor's
        return "tini"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"executor.worker" in argv:
        return "worker"
    if b"executor" in argv:
        return "executor"
    return f"other ({comm})"


def _containers(uids: set[str]) -> list[dict[str, Any]]:
    """`podman inspect` of the containers of these sandboxes (found by their uid label)."""
    listed = _podman_json("ps", "--all", "--filter", f"label={LABEL_UID}", "--format", "json")
    ids = [c["Id"] for c in listed if (c.get("Labels") or {}).get(LABEL_UID) in uids]
    return list(_podman_json("container", "inspect", *ids)) if ids else []


def sandbox_processes(conmon_pids: list[int]) -> list[list[ProcessMemory]]:
    """For each container (by its conmon), its conmon and every process below it."""
    parents = _parents()
    sandboxes = []
    for conmon in conmon_pids:
        processes = []
        for pid in _descendants(conmon, parents):
            proc = Path(f"/proc/{pid}")
            try:
                processes.append(
                    ProcessMemory(
                        kind=_kind(pid, conmon),
                        pid=pid,
                        rss_bytes=_kib_field(proc / "status", "VmRSS:"),
                        pss_bytes=_kib_field(proc / "smaps_rollup", "Pss:"),
                    )
                )
            except FileNotFoundError:  # it exited while we looked
                continue
        sandboxes.append(processes)
    return sandboxes


@dataclass(frozen=True)
class _Image:
    id: str
    size_bytes: int
    top_dir: str  # its top layer's files, on the host

    @classmethod
    def of(cls, container: dict[str, Any]) -> "_Image":
        image = _podman_json("image", "inspect", str(container["Image"]))[0]
        return cls(image["Id"], int(image["Size"]), image["GraphDriver"]["Data"]["UpperDir"])

    def copy_under(self, container: dict[str, Any]) -> str | None:
        """The ID-mapped copy of the image the container runs on (its topmost read-only
        layer), or None when it runs on the image's own files."""
        top = str(container["GraphDriver"]["Data"].get("LowerDir") or "").split(":")[0]
        return None if top == self.top_dir else top


class _Creator:
    """Creates sandboxes a few at a time until `count`, a failed create, or a floor.

    Each create in flight may copy the whole image (see the module docstring), so the disk
    check reserves an image's size for each; the first create runs alone to learn that size.
    """

    def __init__(self, stub: "SandboxServiceAsyncStub", profile: str, storage: _Storage) -> None:
        self._stub = stub
        self._storage = storage
        self._request = sandbox_pb2.CreateSandboxRequest(
            parent=PARENT,
            sandbox=sandbox_pb2.Sandbox(
                labels=dict([LABEL]), spec=sandbox_pb2.SandboxSpec(image_profile=profile)
            ),
        )
        self.created: list[sandbox_pb2.Sandbox] = []
        self.stopped_because = ""
        self.image: _Image | None = None
        self._sandbox_bytes = 0  # the first sandbox's PSS, once it is known
        self._launched = 0
        self._in_flight = 0

    def _may_launch(self, count: int) -> bool:
        if self._launched >= count or self.stopped_because:
            return False
        machine = _Machine.read(self._storage)
        # A sandbox's worker preloads its modules after the create returns: besides the
        # creates in flight and the next, as many again may not have shown their memory yet.
        coming = self._in_flight + 1 + CREATE_CONCURRENCY
        if machine.available_bytes - coming * self._sandbox_bytes < MEMORY_FLOOR:
            self.stopped_because = (
                f"MemAvailable {machine.available_bytes / GiB:.2f} GiB, less "
                f"{coming * self._sandbox_bytes / GiB:.2f} GiB for {coming} sandboxes still to "
                f"show, is under the {MEMORY_FLOOR / GiB:.0f} GiB floor"
            )
            return False
        reserved = (self._in_flight + 1) * self._image_bytes
        if machine.disk_free_bytes - reserved < DISK_FLOOR:
            self.stopped_because = (
                f"disk free {machine.disk_free_bytes / GiB:.1f} GiB, less "
                f"{reserved / GiB:.1f} GiB for image copies of the creates in flight and the "
                f"next, is under the {DISK_FLOOR / GiB:.0f} GiB floor"
            )
        return not self.stopped_because

    @property
    def _image_bytes(self) -> int:
        return self.image.size_bytes if self.image else 0

    async def _create_one(self) -> bool:
        self._launched += 1
        self._in_flight += 1
        try:
            sandbox = await self._stub.CreateSandbox(self._request, timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            self.stopped_because = self.stopped_because or (
                f"create {self._launched} failed: {exc.code().name}: {exc.details()}"
            )
            return False
        finally:
            self._in_flight -= 1
        self.created.append(sandbox)
        if len(self.created) % PROGRESS_EVERY == 0:
            machine = _Machine.read(self._storage)
            print(
                f"  {len(self.created)} created, "
                f"MemAvailable {machine.available_bytes / GiB:.2f} GiB, "
                f"disk free {machine.disk_free_bytes / GiB:.1f} GiB",
                flush=True,
            )
        return True

    async def run(self, count: int) -> _Image:
        """Creates them; returns their image. Raises RuntimeError when not even the first
        could be created."""
        if not self._may_launch(count) or not await self._create_one():
            raise RuntimeError(f"no sandbox could be created: {self.stopped_because}")
        first = (await asyncio.to_thread(_containers, {self.created[0].uid}))[0]
        image = self.image = await asyncio.to_thread(_Image.of, first)
        # An execution waits for the preload; then the first sandbox's PSS is what each next
        # one will cost, or a little less (they will share its pages).
        await _answering(self._stub, [self.created[0].name])
        conmon = int(first["State"]["ConmonPid"])
        processes = (await asyncio.to_thread(sandbox_processes, [conmon]))[0]
        self._sandbox_bytes = sum(p.pss_bytes for p in processes)

        async def creator() -> None:
            while self._may_launch(count) and await self._create_one():
                pass

        await asyncio.gather(*(creator() for _ in range(CREATE_CONCURRENCY)))
        return image


async def _answering(stub: "SandboxServiceAsyncStub", names: list[str]) -> int:
    """How many of the sandboxes answer `1+1` with 2."""
    gate = asyncio.Semaphore(CHECK_CONCURRENCY)

    async def answers(name: str) -> bool:
        async with gate:
            try:
                response = await stub.ExecuteCode(
                    sandbox_pb2.ExecuteCodeRequest(name=name, code="1+1"), timeout=CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                print(f"  {name} did not answer: {exc.code().name}: {exc.details()}", flush=True)
                return False
        texts = [o.text.get("text/plain") for o in response.outputs]
        return texts == ["2"] and not response.HasField("error")

    return sum(await asyncio.gather(*(answers(n) for n in names)))


async def delete_labelled(stub: "SandboxServiceAsyncStub") -> int:
    """Deletes every sandbox of this benchmark in the project, a few at a time."""
    names: list[str] = []
    page_token = ""
    while True:
        page = await stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(
                parent=PARENT,
                filter=f'labels.{LABEL[0]} = "{LABEL[1]}"',
                page_size=1000,
                page_token=page_token,
            )
        )
        names.extend(s.name for s in page.sandboxes)
        page_token = page.next_page_token
        if not page_token:
            break
    gate = asyncio.Semaphore(DELETE_CONCURRENCY)

    async def delete(name: str) -> None:
        async with gate:
            await stub.DeleteSandbox(
                sandbox_pb2.DeleteSandboxRequest(name=name, allow_missing=True),
                timeout=CALL_TIMEOUT_S,
            )

    await asyncio.gather(*(delete(n) for n in names))
    return len(names)


def _memory_figures(
    sandboxes: list[list[ProcessMemory]],
) -> tuple[float, float, dict[str, tuple[float, float]]]:
    """Median RSS and PSS per sandbox (summed over its processes), and per process kind."""
    by_kind: dict[str, list[ProcessMemory]] = {}
    for process in (p for processes in sandboxes for p in processes):
        by_kind.setdefault(process.kind, []).append(process)
    by_process = {
        kind: (median([p.rss_bytes for p in ps]), median([p.pss_bytes for p in ps]))
        for kind, ps in by_kind.items()
    }
    rss = median([sum(p.rss_bytes for p in processes) for processes in sandboxes])
    pss = median([sum(p.pss_bytes for p in processes) for processes in sandboxes])
    return rss, pss, by_process


async def measure_density(
    address: str, count: int, profile: str = "", controller_pid: int | None = None
) -> DensityFigures:
    """Creates up to `count` idle sandboxes of `profile` (the server's default when empty) in
    projects/bench, checks that each answers, reads their memory, disk and idle CPU (and the
    controller's, given its pid), and deletes them.

    Runs as the controller's podman user, on its machine. The controller's quotas must allow
    `count` sandboxes in the project and `count` executes a minute. Raises RuntimeError when
    not even one sandbox could be created.
    """
    storage = await asyncio.to_thread(_Storage.find)
    copies_before = storage.image_copies()
    before = _Machine.read(storage)
    async with channel_to(address) as channel:
        stub: SandboxServiceAsyncStub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        try:
            creator = _Creator(stub, profile, storage)
            started = time.perf_counter()
            image = await creator.run(count)
            seconds_to_create = time.perf_counter() - started
            created = creator.created
            print(f"  {len(created)} created in {seconds_to_create:.1f} s; checking", flush=True)
            answering = await _answering(stub, [s.name for s in created])
            await asyncio.sleep(SETTLE_S)
            held = _Machine.read(storage)
            containers = await asyncio.to_thread(_containers, {s.uid for s in created})
            conmons = [int(c["State"]["ConmonPid"]) for c in containers]
            sandboxes = await asyncio.to_thread(sandbox_processes, conmons)
            copies_held = storage.image_copies().get(image.id, 0)
            copies = [image.copy_under(c) for c in containers]
            copies_used = len({c for c in copies if c is not None})
            in_sandboxes = {p.pid for processes in sandboxes for p in processes}
            groups = [in_sandboxes]
            if controller_pid is not None:
                # Its podman service is its child; conmons are not (podman daemonizes them).
                controller = set(_descendants(controller_pid, _parents())) - in_sandboxes
                groups.append(controller)
            idle_cpu = await _idle_cpu_percent(groups)
        finally:
            started = time.perf_counter()
            deleted = await delete_labelled(stub)
            print(f"  {deleted} deleted in {time.perf_counter() - started:.1f} s", flush=True)
    after = _Machine.read(storage)
    n = len(created)
    rss, pss, by_process = _memory_figures(sandboxes)
    drop = (before.available_bytes - held.available_bytes) / n
    room = held.available_bytes - MEMORY_FLOOR
    fit = n + max(0, int(room / pss))
    fit_by_drop = n + max(0, int(room / drop)) if drop > 0 else None
    # With a copy per sandbox, the disk holds as many sandboxes as copies fit beside the ones
    # cached already; with one shared copy (or none), disk does not grow with sandboxes.
    cached = copies_before.get(image.id, 0)
    disk_fit = (
        cached + int((before.disk_free_bytes - DISK_FLOOR) / image.size_bytes)
        if copies_used > 1
        else None
    )
    return DensityFigures(
        profile=created[0].spec.image_profile,
        sandboxes_held=n,
        answering=answering,
        stopped_because=creator.stopped_because,
        seconds_to_create=seconds_to_create,
        available_before_bytes=before.available_bytes,
        available_held_bytes=held.available_bytes,
        rss_per_sandbox_bytes=rss,
        pss_per_sandbox_bytes=pss,
        available_drop_per_sandbox_bytes=drop,
        by_process=by_process,
        fit_estimate=fit,
        fit_estimate_by_available_drop=fit_by_drop,
        image_bytes=image.size_bytes,
        sandboxes_on_image_copy=sum(c is not None for c in copies),
        image_copies_used=copies_used,
        image_copies_before=cached,
        image_copies_held=copies_held,
        disk_free_before_bytes=before.disk_free_bytes,
        disk_free_held_bytes=held.disk_free_bytes,
        disk_free_after_bytes=after.disk_free_bytes,
        disk_fit_estimate=disk_fit,
        idle_cpu_percent_sandboxes=idle_cpu[0],
        idle_cpu_percent_controller=idle_cpu[1] if controller_pid is not None else None,
    )


def _mib(value: float) -> str:
    return f"{value / MiB:.1f}"


def _gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


def print_figures(figures: DensityFigures, count: int) -> None:
    f = figures
    rows = [
        [kind, _mib(rss), _mib(pss)]
        for kind, (rss, pss) in sorted(
            f.by_process.items(),
            key=lambda item: KINDS.index(item[0]) if item[0] in KINDS else len(KINDS),
        )
    ]
    rows.append(["sandbox (sum)", _mib(f.rss_per_sandbox_bytes), _mib(f.pss_per_sandbox_bytes)])
    print_table(
        f"memory of an idle sandbox ({f.profile}), MiB, medians over {f.sandboxes_held} sandboxes",
        ["process", "RSS", "PSS"],
        rows,
    )
    limits = [f.fit_estimate]
    limits += [f.disk_fit_estimate] if f.disk_fit_estimate is not None else []
    print_table(
        f"idle sandboxes held ({f.profile})",
        ["what", "value"],
        [
            ["asked for", str(count)],
            ["held", str(f.sandboxes_held)],
            ["answering `1+1` → 2", str(f.answering)],
            ["stopped early because", f.stopped_because or "-"],
            ["time to create them", f"{f.seconds_to_create:.1f} s"],
            ["creates per second", f"{f.sandboxes_held / f.seconds_to_create:.2f}"],
            [
                "MemAvailable before → held",
                f"{_gib(f.available_before_bytes)} → {_gib(f.available_held_bytes)}",
            ],
            ["MemAvailable drop per sandbox", f"{_mib(f.available_drop_per_sandbox_bytes)} MiB"],
            [
                f"CPU while idle, all sandboxes, {IDLE_WINDOW_S:.0f} s",
                f"{f.idle_cpu_percent_sandboxes:.1f} % of a core",
            ],
            [
                "CPU while idle, controller and its podman service",
                "-"
                if f.idle_cpu_percent_controller is None
                else f"{f.idle_cpu_percent_controller:.1f} % of a core",
            ],
            ["image size", _gib(f.image_bytes)],
            [
                "sandboxes on an ID-mapped image copy (copies)",
                f"{f.sandboxes_on_image_copy} ({f.image_copies_used})",
            ],
            [
                "ID-mapped image copies before → held",
                f"{f.image_copies_before} → {f.image_copies_held}",
            ],
            [
                "disk free before → held → deleted",
                f"{_gib(f.disk_free_before_bytes)} → "
                f"{_gib(f.disk_free_held_bytes)} → {_gib(f.disk_free_after_bytes)}",
            ],
            [
                f"fit estimate, memory at PSS (leaving {MEMORY_FLOOR // GiB} GiB)",
                str(f.fit_estimate),
            ],
            [
                "fit estimate, memory at the MemAvailable drop",
                "- (MemAvailable rose: others freed memory meanwhile)"
                if f.fit_estimate_by_available_drop is None
                else str(f.fit_estimate_by_available_drop),
            ],
            [
                f"fit estimate, disk (leaving {DISK_FLOOR // GiB} GiB)",
                "- (no copy per sandbox)"
                if f.disk_fit_estimate is None
                else str(f.disk_fit_estimate),
            ],
            ["fit estimate, memory and disk", str(min(limits))],
        ],
    )


async def run(count: int, profile: str) -> None:
    settings = {
        "max_sandboxes_per_project": str(count + 10),
        "max_executes_per_minute": "10000000",
        # Pool members are sandboxes of no project, started in the background: they would blur
        # the MemAvailable drop per sandbox.
        "warm_pool": "",
    }
    async with controller_process(**settings) as controller:
        figures = await measure_density(
            controller.address, count, profile, controller_pid=controller.process.pid
        )
    print_figures(figures, count)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--profile", default="", help="image profile (default: the server's)")
    args = parser.parse_args()
    asyncio.run(run(args.count, args.profile))


if __name__ == "__main__":
    main()
