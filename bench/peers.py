"""The same workloads as petri (bench/workloads.py) through the two peers a user would pick
instead of petri, so the suite can put their figures side by side:

- llm-sandbox (PyPI `llm-sandbox`) with its Podman backend and a stateful
  `InteractiveSandboxSession`: a container per session, code run by an IPython runner in it.
- a local Jupyter kernel through jupyter_client: no isolation at all, the floor.

For each: open (create/start → ready), create + first execution (open, put the CSV in, run
PANDAS_CODE, get its output) and the stateful round trip of ROUND_TRIP_CODE. Every output is
checked (the pandas summary's counts, `1+1` gives 2), so a broken peer cannot report fast,
bogus numbers. Containers and kernels are removed afterwards, also on failure.

llm-sandbox needs an image with IPython: `python -m bench.peers` builds
localhost/petri-bench-peer:llm-sandbox from petri's `full` image when it is missing or stale
(bench/peer_images/llm-sandbox/), and talks to a `podman system service` of its own.

Run as the service user: python -m bench.peers [--opens N] [--round-trips N]
[--only llm-sandbox|jupyter]
"""

import argparse
import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel
from llm_sandbox import InteractiveSandboxSession, SandboxBackend
from podman import PodmanClient

from bench.harness import median, percentile, print_table
from bench.workloads import CSV_NAME, PANDAS_CODE, ROUND_TRIP_CODE, sales_csv

LLM_SANDBOX = "llm-sandbox (podman, stateful session)"
JUPYTER = "jupyter kernel (local)"

# The `full` image of the repository the controllers here use (scripts/bench: the test slot's).
BASE_IMAGE = os.environ.get("PETRI_IMAGE_REPOSITORY", "localhost/petri-sandbox") + ":full"
LLM_SANDBOX_IMAGE = "localhost/petri-bench-peer:llm-sandbox"
LLM_SANDBOX_IMAGE_DIR = Path(__file__).parent / "peer_images" / "llm-sandbox"
# The hash of what the image was built from (FROM `full`, it inherits petri's own labels).
INPUTS_LABEL = "petri.bench-peer.inputs"
LLM_SANDBOX_WORKDIR = "/sandbox"  # the Containerfile's WORKDIR: where the runner starts
# Every container this module creates carries this label, with the run's id as its value, so
# cleanup removes exactly those and never a sandbox of petri's or anyone else's.
RUN_LABEL = "petri-bench.peers-run"
EXECUTE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PeerFigures:
    """One peer's figures, in seconds, one value per measured operation."""

    name: str
    open_seconds: list[float]  # create/start → ready
    create_first_exec_seconds: list[float]  # open + the CSV in + first PANDAS_CODE, output back
    round_trip_seconds: list[float]  # ROUND_TRIP_CODE in an open, stateful session


def _log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


# --- Output checks -------------------------------------------------------------------------


def _expected_counts() -> Counter[str]:
    rows = csv.DictReader(io.StringIO(sales_csv().decode()))
    return Counter(row["region"] for row in rows)


def check_pandas_output(peer: str, stdout: str) -> None:
    """Raises unless stdout is PANDAS_CODE's summary: a row per region with its row count."""
    counts = {}
    for line in stdout.splitlines():
        words = line.split()
        if len(words) >= 2:
            counts[words[0]] = words[1]
    for region, count in _expected_counts().items():
        if counts.get(region) != str(count):
            raise RuntimeError(f"{peer}: no summary row '{region} {count} ...' in {stdout!r}")


def check_round_trip(peer: str, value: str) -> None:
    if value.strip() != "2":
        raise RuntimeError(f"{peer}: {ROUND_TRIP_CODE!r} gave {value!r}, not 2")


# --- llm-sandbox's image -------------------------------------------------------------------


def _podman(*args: str) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:2])} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


def _inspect(image: str, template: str) -> str | None:
    """`podman image inspect -f TEMPLATE IMAGE`, or None if there is no such image."""
    done = subprocess.run(
        ["podman", "image", "inspect", "-f", template, image],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def _label(name: str) -> str:
    return f'{{{{index .Labels "{name}"}}}}'


def _download_wheels(python_version: str, into: Path) -> None:
    """The requirements' wheels for the image's Python into `into`, through a per-user cache
    (as sandbox-image/build.sh does): offline from the cache when it has them all."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = cache / "petri" / "wheels" / "bench-llm-sandbox"
    cache.mkdir(parents=True, exist_ok=True)
    download = [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
        "--only-binary=:all:", "--python-version", python_version, "--implementation", "cp",
        "--find-links", str(cache), "-r", str(LLM_SANDBOX_IMAGE_DIR / "requirements.txt"),
    ]  # fmt: skip
    offline = subprocess.run([*download, "--no-index", "-d", str(into)], capture_output=True)
    if offline.returncode == 0:
        return
    _log(f"downloading IPython's wheels for Python {python_version} into {cache}")
    subprocess.run([*download, "-d", str(cache)], check=True)
    subprocess.run([*download, "--no-index", "-d", str(into)], check=True)


def ensure_llm_sandbox_image() -> str:
    """Builds LLM_SANDBOX_IMAGE from BASE_IMAGE unless an image from the same inputs (base
    image id, Containerfile, requirements) exists; returns its name."""
    base = _inspect(BASE_IMAGE, "{{.Id}} " + _label("io.petri.manifest"))
    if base is None:
        raise RuntimeError(f"{BASE_IMAGE} is missing: build it with sandbox-image/build.sh full")
    base_id, _, manifest = base.partition(" ")
    inputs = hashlib.sha256(base_id.encode())
    for name in ("Containerfile", "requirements.txt"):
        inputs.update((LLM_SANDBOX_IMAGE_DIR / name).read_bytes())
    built = _inspect(LLM_SANDBOX_IMAGE, "{{.Id}} " + _label(INPUTS_LABEL)) or ""
    built_id, _, built_inputs = built.partition(" ")
    if built_inputs == inputs.hexdigest():
        _log(f"{LLM_SANDBOX_IMAGE} is up to date")
        return LLM_SANDBOX_IMAGE
    started = time.perf_counter()
    _log(f"building {LLM_SANDBOX_IMAGE} from {BASE_IMAGE} (IPython added)")
    python_version = ".".join(json.loads(manifest)["python"].split(".")[:2])
    with tempfile.TemporaryDirectory(prefix="petri-bench-peer-image-") as context:
        wheels = Path(context) / "wheels"
        wheels.mkdir()
        _download_wheels(python_version, wheels)
        shutil.copy(LLM_SANDBOX_IMAGE_DIR / "requirements.txt", wheels)
        _podman(
            "build", "--network", "none", "-q", "-t", LLM_SANDBOX_IMAGE,
            "--build-arg", f"BASE={BASE_IMAGE}", "--label", f"{INPUTS_LABEL}={inputs.hexdigest()}",
            "-f", str(LLM_SANDBOX_IMAGE_DIR / "Containerfile"), context,
        )  # fmt: skip
    _log(f"built {LLM_SANDBOX_IMAGE} in {time.perf_counter() - started:.0f} s")
    if built_id:
        # The image made from an older `full` (rebuilt on every executor/ change): while it
        # exists, that old `full` cannot be removed either. Kept if a container still uses it.
        subprocess.run(["podman", "rmi", built_id], capture_output=True, check=False)
    return LLM_SANDBOX_IMAGE


# --- A podman REST service of our own ------------------------------------------------------


@contextlib.contextmanager
def podman_service() -> Iterator[str]:
    """A `podman system service` on a socket in a private folder (a shared one can be removed
    under us by other podman users); yields its base URL, stops it afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="petri-bench-peers-", dir=os.environ["XDG_RUNTIME_DIR"]))
    url = f"unix://{folder}/podman.sock"
    with open(folder / "service.log", "wb") as log:
        process = subprocess.Popen(
            ["podman", "system", "service", "--time=0", url], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 30
        with PodmanClient(base_url=url) as client:
            while not ((folder / "podman.sock").exists() and _pings(client)):
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (folder / "service.log").read_text()[-2000:]
                    raise RuntimeError(f"podman system service did not come up: {log_text}")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _pings(client: PodmanClient) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # not listening yet: podman-py raises several kinds here
        return False


# --- llm-sandbox ---------------------------------------------------------------------------


class _Session(InteractiveSandboxSession):  # type: ignore[misc]  # llm-sandbox is untyped
    """llm-sandbox's session, able to read files back on a Python whose tarfile lacks
    data_filter (PEP 706; Debian 12's 3.11.2, the service venv's, has none).

    The interactive session reads every result back with copy_from_runtime, and llm-sandbox
    refuses to extract archives without tarfile.data_filter. Rather than patch the stdlib, this
    reads the single regular file out of the archive and writes only its bytes to `dest`:
    nothing in the archive picks a path, mode, owner or link, which is what the filter guards
    against. With data_filter present, llm-sandbox's own code runs unchanged.
    """

    def copy_from_runtime(self, src: str, dest: str) -> None:
        if hasattr(tarfile, "data_filter"):
            super().copy_from_runtime(src, dest)
            return
        data, _ = self.container_api.copy_from_container(self.container, src)
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            member = archive.next()
            content = archive.extractfile(member) if member and member.isfile() else None
            if content is None:
                raise FileNotFoundError(f"{src} is not a regular file in the container")
            Path(dest).write_bytes(content.read())


def _llm_sandbox_session(client: PodmanClient, run_id: str) -> _Session:
    return _Session(
        backend=SandboxBackend.PODMAN,
        client=client,
        image=LLM_SANDBOX_IMAGE,
        workdir=LLM_SANDBOX_WORKDIR,
        timeout=EXECUTE_TIMEOUT_S,
        runtime_configs={
            "network_mode": "none",  # rootless podman here has no usable network; petri has none
            "command": ["sleep", "infinity"],  # not petri's executor (the image's CMD)
            "labels": {RUN_LABEL: run_id},
        },
    )


def _run_checked(session: _Session, code: str) -> str:
    output = session.run(code)
    if output.exit_code != 0:
        raise RuntimeError(f"{LLM_SANDBOX}: {code!r} failed: {output.stderr or output.stdout}")
    stdout: str = output.stdout
    return stdout


def measure_llm_sandbox(opens: int, round_trips: int) -> PeerFigures:
    """Opens `opens` sessions one after another (each timed to ready, then to the first
    PANDAS_CODE output), and times `round_trips` runs of ROUND_TRIP_CODE in the last one.
    Blocking (llm-sandbox is): an async driver calls it with asyncio.to_thread. Builds the
    image first if needed; needs rootless podman as the calling user."""
    ensure_llm_sandbox_image()
    run_id = uuid.uuid4().hex[:12]
    open_times, first_times, trips = [], [], []
    with (
        tempfile.TemporaryDirectory(prefix="petri-bench-peers-") as scratch,
        podman_service() as url,
        PodmanClient(base_url=url) as client,
    ):
        csv_path = Path(scratch) / CSV_NAME
        csv_path.write_bytes(sales_csv())  # the session API copies files from a host path
        try:
            for index in range(opens):
                session = _llm_sandbox_session(client, run_id)
                try:
                    started = time.perf_counter()
                    session.open()
                    open_times.append(time.perf_counter() - started)
                    session.copy_to_runtime(str(csv_path), f"{LLM_SANDBOX_WORKDIR}/{CSV_NAME}")
                    stdout = _run_checked(session, PANDAS_CODE)
                    first_times.append(time.perf_counter() - started)
                    check_pandas_output(LLM_SANDBOX, stdout)
                    _log(
                        f"llm-sandbox session {index + 1}/{opens}: open {open_times[-1]:.2f} s,"
                        f" + first execution {first_times[-1]:.2f} s"
                    )
                    if index == opens - 1:
                        trips = _time_round_trips(
                            LLM_SANDBOX, round_trips, partial(_llm_sandbox_value, session)
                        )
                finally:
                    session.close()
        finally:
            _remove_containers(client, run_id)
    return PeerFigures(LLM_SANDBOX, open_times, first_times, trips)


def _llm_sandbox_value(session: _Session) -> str:
    # IPython's displayhook prints the last expression's value as "Out[N]: 2".
    return _run_checked(session, ROUND_TRIP_CODE).rpartition(":")[2]


def _remove_containers(client: PodmanClient, run_id: str) -> None:
    """Removes this run's containers that session.close() left (it swallows its errors)."""
    for container in client.containers.list(all=True, filters={"label": f"{RUN_LABEL}={run_id}"}):
        _log(f"removing leftover container {container.name}")
        with contextlib.suppress(Exception):  # already gone: nothing left to do
            container.remove(force=True)


def _time_round_trips(peer: str, count: int, value: Callable[[], str]) -> list[float]:
    """Times `count` calls of `value` (one untimed first, to warm up), checking each answer."""
    check_round_trip(peer, value())
    times = []
    for _ in range(count):
        started = time.perf_counter()
        answer = value()
        times.append(time.perf_counter() - started)
        check_round_trip(peer, answer)
    return times


# --- Jupyter kernel ------------------------------------------------------------------------


@dataclass
class _KernelOutput:
    stdout: str = ""
    result: str = ""  # the execute_result's text/plain


def _execute(client: BlockingKernelClient, code: str) -> _KernelOutput:
    """Runs code and waits for the kernel to go idle, collecting stdout and the result."""
    output = _KernelOutput()

    def on_message(message: dict[str, Any]) -> None:
        content = message["content"]
        if message["msg_type"] == "stream" and content["name"] == "stdout":
            output.stdout += content["text"]
        elif message["msg_type"] == "execute_result":
            output.result = content["data"].get("text/plain", "")

    reply = client.execute_interactive(code, output_hook=on_message, timeout=EXECUTE_TIMEOUT_S)
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"{JUPYTER}: {code!r} failed: {reply['content']}")
    return output


def _kernel_value(client: BlockingKernelClient) -> str:
    return _execute(client, ROUND_TRIP_CODE).result


@contextlib.contextmanager
def _kernel(cwd: Path) -> Iterator[BlockingKernelClient]:
    """A kernel of this venv's Python (ipykernel) in `cwd`, shut down afterwards."""
    manager: KernelManager | None = None
    client: BlockingKernelClient | None = None
    try:
        manager, client = start_new_kernel(kernel_name="python3", cwd=str(cwd))
        yield client
    finally:
        if client is not None:
            client.stop_channels()
        if manager is not None:
            manager.shutdown_kernel(now=True)


def measure_jupyter(opens: int, round_trips: int) -> PeerFigures:
    """Starts `opens` kernels one after another (each timed to ready, then to the first
    PANDAS_CODE output, the CSV written into its cwd, a temp dir), and times `round_trips`
    executions of ROUND_TRIP_CODE in the last one. Blocking: an async driver calls it with
    asyncio.to_thread. pandas must be importable in this Python."""
    csv_bytes = sales_csv()
    open_times, first_times, trips = [], [], []
    for index in range(opens):
        with tempfile.TemporaryDirectory(prefix="petri-bench-kernel-") as cwd:
            started = time.perf_counter()
            with _kernel(Path(cwd)) as client:
                open_times.append(time.perf_counter() - started)
                (Path(cwd) / CSV_NAME).write_bytes(csv_bytes)
                stdout = _execute(client, PANDAS_CODE).stdout
                first_times.append(time.perf_counter() - started)
                check_pandas_output(JUPYTER, stdout)
                _log(
                    f"jupyter kernel {index + 1}/{opens}: start {open_times[-1]:.2f} s,"
                    f" + first execution {first_times[-1]:.2f} s"
                )
                if index == opens - 1:
                    trips = _time_round_trips(JUPYTER, round_trips, partial(_kernel_value, client))
    return PeerFigures(JUPYTER, open_times, first_times, trips)


# --- The table -----------------------------------------------------------------------------


def _row(peer: str, what: str, seconds: list[float]) -> list[str]:
    return [
        peer,
        what,
        str(len(seconds)),
        f"{median(seconds) * 1000:.1f}",
        f"{percentile(seconds, 0.9) * 1000:.1f}",
        f"{percentile(seconds, 0.99) * 1000:.1f}",
    ]


def print_figures(figures: list[PeerFigures]) -> None:
    rows = []
    for peer in figures:
        rows += [
            _row(peer.name, "open (create → ready)", peer.open_seconds),
            _row(peer.name, "create + first exec (pandas, CSV)", peer.create_first_exec_seconds),
            _row(peer.name, f"round trip `{ROUND_TRIP_CODE}`", peer.round_trip_seconds),
        ]
    print_table(
        "petri's peers on petri's workloads, milliseconds",
        ["peer", "what", "n", "p50", "p90", "p99"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--opens", type=int, default=5, help="sessions/kernels opened per peer")
    parser.add_argument(
        "--round-trips",
        type=int,
        help="round trips per peer (default: 30 for llm-sandbox, ~0.5 s each; 500 for jupyter)",
    )
    parser.add_argument("--only", choices=["llm-sandbox", "jupyter"])
    args = parser.parse_args()
    if args.opens < 1 or (args.round_trips is not None and args.round_trips < 1):
        parser.error("--opens and --round-trips must be at least 1")
    figures = []
    if args.only in (None, "llm-sandbox"):
        figures.append(measure_llm_sandbox(args.opens, args.round_trips or 30))
    if args.only in (None, "jupyter"):
        figures.append(measure_jupyter(args.opens, args.round_trips or 500))
    print_figures(figures)


if __name__ == "__main__":
    main()
