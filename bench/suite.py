"""The benchmark suite in one run: petri's latency, throughput, file transfer and density,
then the same workloads through llm-sandbox (Podman backend, a stateful session) and a local
Jupyter kernel, and a summary against the targets with each peer as a ratio to petri.

Run as the service user (scripts/bench does): python -m bench.suite [--quick]
--quick makes every sample count small: a smoke run of the whole suite, not figures to quote.
"""

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from bench import density, files, latency, peers
from bench.harness import controller_process, median, percentile, print_table

MS = 1000.0


@dataclass(frozen=True)
class Sizes:
    creates: int
    round_trips: int
    file_repeats: int
    density_count: int
    peer_opens: int
    llm_round_trips: int
    jupyter_round_trips: int


FULL = Sizes(
    creates=30,
    round_trips=1000,
    file_repeats=3,
    density_count=200,
    peer_opens=5,
    llm_round_trips=30,
    jupyter_round_trips=500,
)
QUICK = Sizes(
    creates=3,
    round_trips=50,
    file_repeats=1,
    density_count=10,
    peer_opens=1,
    llm_round_trips=3,
    jupyter_round_trips=20,
)


def _ms(value: float) -> str:
    return f"{value * MS:.1f} ms"


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _ratio(petri: float, peer: float) -> str:
    """petri's time over the peer's: below 1, petri is faster (1/ratio times)."""
    if petri >= peer:
        return f"{petri / peer:.2f}"
    faster = peer / petri
    return f"{petri / peer:.4f} ({faster:.{0 if faster >= 10 else 1}f}x faster)"


def summary_rows(
    lat: latency.LatencyFigures,
    dens: density.DensityFigures,
    llm: peers.PeerFigures,
    jupyter: peers.PeerFigures,
) -> list[list[str]]:
    pool = lat.samples["create from pool"]
    cold = lat.samples["create cold"]
    pandas_pool = lat.samples["create + pandas from pool"]
    trips = lat.samples["1+1 round trip"]
    create_exec_ratio = median(pandas_pool) / median(llm.create_first_exec_seconds)
    trip_ratio_llm = median(trips) / median(llm.round_trip_seconds)
    trip_ratio_jupyter = median(trips) / median(jupyter.round_trip_seconds)
    return [
        [
            "create → RUNNING from pool, p50 / p99",
            f"{_ms(median(pool))} / {_ms(percentile(pool, 0.99))}",
            "≤ 30 ms / ≤ 100 ms",
            _met(median(pool) <= 0.030 and percentile(pool, 0.99) <= 0.100),
        ],
        [
            "create → RUNNING cold (runc), p50",
            _ms(median(cold)),
            "≤ 500 ms",
            _met(median(cold) <= 0.5),
        ],
        [
            "create + first pandas execution (pool), p99",
            _ms(percentile(pandas_pool, 0.99)),
            "≤ 1 s",
            _met(percentile(pandas_pool, 0.99) <= 1.0),
        ],
        [
            "ExecuteCode `1+1` round trip, p50 / p99",
            f"{_ms(median(trips))} / {_ms(percentile(trips, 0.99))}",
            "≤ 3 ms / ≤ 10 ms",
            _met(median(trips) <= 0.003 and percentile(trips, 0.99) <= 0.010),
        ],
        [
            "aggregate executes/s over 10 sandboxes",
            f"{lat.throughput[10]:.0f}",
            "≥ 500",
            _met(lat.throughput[10] >= 500),
        ],
        [
            "idle sandboxes held, all answering",
            f"{dens.answering} of {dens.sandboxes_held}",
            "≥ 200",
            _met(dens.answering >= 200),
        ],
        [
            "vs llm-sandbox, create + first execute (petri ÷ peer, p50)",
            _ratio(median(pandas_pool), median(llm.create_first_exec_seconds)),
            "≥ 20x faster",
            _met(create_exec_ratio <= 1 / 20),
        ],
        [
            "vs llm-sandbox, stateful round trip (p50)",
            _ratio(median(trips), median(llm.round_trip_seconds)),
            "≥ 100x faster",
            _met(trip_ratio_llm <= 1 / 100),
        ],
        [
            "vs local Jupyter kernel, round trip (p50)",
            _ratio(median(trips), median(jupyter.round_trip_seconds)),
            "ratio < 1",
            _met(trip_ratio_jupyter < 1),
        ],
    ]


def peer_rows(lat: latency.LatencyFigures, figures: Sequence[peers.PeerFigures]) -> list[list[str]]:
    petri = {
        "open (create → ready)": lat.samples["create from pool"],
        "create + first exec (pandas, CSV)": lat.samples["create + pandas from pool"],
        "round trip `1+1`": lat.samples["1+1 round trip"],
    }
    rows = []
    for what, mine in petri.items():
        row = [what, _ms(median(mine))]
        for peer in figures:
            theirs = {
                "open (create → ready)": peer.open_seconds,
                "create + first exec (pandas, CSV)": peer.create_first_exec_seconds,
                "round trip `1+1`": peer.round_trip_seconds,
            }[what]
            row += [_ms(median(theirs)), _ratio(median(mine), median(theirs))]
        rows.append(row)
    return rows


async def run(sizes: Sizes, profile: str) -> None:
    started = time.monotonic()
    lat = await latency.measure(sizes.creates, sizes.round_trips, profile)
    latency.print_figures(lat, profile)

    print("\nfiles: StreamExecuteCode transfer", flush=True)
    await files.run(sizes.file_repeats)

    print(f"\ndensity: {sizes.density_count} idle sandboxes", flush=True)
    settings = {
        "max_sandboxes_per_project": str(sizes.density_count + 10),
        "max_executes_per_minute": "10000000",
        "warm_pool": "",
        "default_image_profile": profile,
    }
    async with controller_process(**settings) as controller:
        dens = await density.measure_density(
            controller.address, sizes.density_count, profile, controller_pid=controller.process.pid
        )
    density.print_figures(dens, sizes.density_count)

    print("\npeers: llm-sandbox (podman, stateful session) and a local Jupyter kernel", flush=True)
    llm = await asyncio.to_thread(
        peers.measure_llm_sandbox, sizes.peer_opens, sizes.llm_round_trips
    )
    jupyter = await asyncio.to_thread(
        peers.measure_jupyter, sizes.peer_opens, sizes.jupyter_round_trips
    )
    peers.print_figures([llm, jupyter])

    header = ["workload (p50)", "petri"]
    for peer in (llm, jupyter):
        header += [peer.name, "petri ÷ peer"]
    print_table("petri and its peers, same workloads", header, peer_rows(lat, [llm, jupyter]))
    print_table(
        f"summary against the targets ({profile} profile; suite took "
        f"{(time.monotonic() - started) / 60:.0f} min)",
        ["what", "petri", "target", ""],
        summary_rows(lat, dens, llm, jupyter),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny samples: a smoke run")
    parser.add_argument("--profile", default="full")
    args = parser.parse_args()
    asyncio.run(run(QUICK if args.quick else FULL, args.profile))


if __name__ == "__main__":
    main()
