"""What metrics cost: `1+1` ExecuteCode round trips (p50, p99) and the executes/s of 10
sandboxes in parallel, on a controller with --metrics-listen (scraped every second, as
Prometheus would) and on one without, in one run.

Two controller processes run side by side, each with 10 sandboxes; the measurements alternate
between them round by round (and which goes first), so that drift in the machine's load falls
on both alike. Run as the service user (scripts/bench does):
python -m bench.metrics [--rounds N] [--round-trips N] [--seconds S] [--profile P]
"""

import argparse
import asyncio
import contextlib
import threading
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bench.harness import (
    channel_to,
    controller_process,
    free_port,
    median,
    percentile,
    print_table,
)
from bench.latency import create, round_trips, throughput
from petri.v1 import sandbox_pb2_grpc

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

SANDBOXES = 10
SCRAPE_SECONDS = 1.0
MODES = ("off", "on")


@dataclass
class Figures:
    round_trips: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)


@dataclass
class Side:
    stub: "Stub"
    names: list[str]
    figures: Figures = field(default_factory=Figures)


class Scraper:
    """Fetches /metrics every second on a thread, as a Prometheus server would."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.scrapes = 0
        self.last_size = 0

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_SECONDS):
            with urllib.request.urlopen(self._url, timeout=5) as answer:
                self.last_size = len(answer.read())
            self.scrapes += 1

    def __enter__(self) -> "Scraper":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.asynccontextmanager
async def side(profile: str, metrics_listen: str) -> AsyncIterator[Side]:
    settings = {
        "max_executes_per_minute": "10000000",
        "max_sandboxes_per_project": "1000",
        "default_image_profile": profile,
        "warm_pool": "",
        "checkpoint_idle_after": "0s",  # no background saves during the measurements
        "default_auto_pause_after": "0s",
    }
    if metrics_listen:
        settings["metrics_listen"] = metrics_listen
    async with (
        controller_process(**settings) as controller,
        channel_to(controller.address) as channel,
    ):
        stub: Stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        gate = asyncio.Semaphore(4)

        async def gated() -> str:
            async with gate:
                return (await create(stub, profile)).name

        names = list(await asyncio.gather(*(gated() for _ in range(SANDBOXES))))
        for name in names:  # the first execution waits for the preload; not measured
            await round_trips(stub, name, 3)
        yield Side(stub, names)


async def measure(rounds: int, count: int, seconds: float, profile: str) -> dict[str, Side]:
    port = free_port()
    async with (
        side(profile, "") as off,
        side(profile, f"127.0.0.1:{port}") as on,
    ):
        sides = {"off": off, "on": on}
        with Scraper(f"http://127.0.0.1:{port}/metrics") as scraper:
            for number in range(rounds):
                order = MODES if number % 2 == 0 else MODES[::-1]
                for mode in order:
                    current = sides[mode]
                    current.figures.round_trips += await round_trips(
                        current.stub, current.names[0], count
                    )
                    current.figures.rates.append(
                        await throughput(current.stub, current.names, seconds)
                    )
                print(f"metrics: round {number + 1}/{rounds} done", flush=True)
        print(
            f"(the metrics side was scraped {scraper.scrapes} times, "
            f"{scraper.last_size} bytes each)"
        )
    return sides


def report(sides: dict[str, Side], profile: str, seconds: float) -> None:
    rows = []
    for mode in MODES:
        figures = sides[mode].figures
        rows.append(
            [
                mode,
                str(len(figures.round_trips)),
                f"{median(figures.round_trips) * 1000:.2f}",
                f"{percentile(figures.round_trips, 0.99) * 1000:.2f}",
                f"{median(figures.rates):.0f}",
            ]
        )
    off, on = sides["off"].figures, sides["on"].figures
    rows.append(
        [
            "on / off",
            "",
            f"{median(on.round_trips) / median(off.round_trips):.3f}",
            f"{percentile(on.round_trips, 0.99) / percentile(off.round_trips, 0.99):.3f}",
            f"{median(on.rates) / median(off.rates):.3f}",
        ]
    )
    print_table(
        f"metrics on vs off ({profile} profile, runc): `1+1` round trips in ms, "
        f"executes/s of {SANDBOXES} sandboxes in parallel ({seconds:.0f} s per round, median "
        "of the rounds)",
        ["metrics", "round trips", "p50", "p99", "executes/s"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--round-trips", type=int, default=300, help="per round and side")
    parser.add_argument("--seconds", type=float, default=3.0, help="throughput, per round")
    parser.add_argument("--profile", default="test")
    args = parser.parse_args()
    sides = asyncio.run(measure(args.rounds, args.round_trips, args.seconds, args.profile))
    report(sides, args.profile, args.seconds)


if __name__ == "__main__":
    main()
