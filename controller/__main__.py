"""Entry point: `python -m controller [flags]`; every flag has a PETRI_* variable.

`python -m controller drain NODE [--undo] [--no-wait]` drains a node of the shared registry:
its sandboxes move to other nodes.
"""

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from controller.config import load_config, parse_database_url
from controller.errors import PetriError
from controller.log_setup import configure
from controller.records import State

if TYPE_CHECKING:
    from controller.store.nodes import PostgresNodes

DRAIN_HELP = (
    "Drains a node (role node) of the registry that nodes share: gateways place no new sandbox "
    "on it, it empties its warm pool, and it moves its sandboxes to other live nodes that are "
    "not draining and have room, one at a time: each is paused (after the executions queued "
    "before), its checkpoint streamed to the other node, which takes it over and resumes it if "
    "it was running (a paused one resumes on its next call). This command then waits, saying "
    "how many are left, moved and why any could not be moved yet (they are tried again), until "
    "the node holds none to move (TERMINATED ones stay until deleted: nothing of them is left "
    "to move). --no-wait returns at once; --undo stops the drain (a move under way finishes). "
    "The registry is PETRI_DATABASE_URL's unless --database-url is given."
)
# How often the waiting drain reads the node's progress.
POLL_SECONDS = 1.0
# The states of a node's sandboxes that the drain moves, or waits for (a create or a delete
# under way).
_WAITED_FOR = (State.RUNNING, State.PAUSED, State.PROVISIONING, State.DEPROVISIONING)


def drain(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller drain", description=DRAIN_HELP)
    parser.add_argument("node", help="the node's name (its --node-name)")
    parser.add_argument("--undo", action="store_true", help="stop draining it")
    parser.add_argument("--no-wait", action="store_true", help="return once it is marked draining")
    parser.add_argument(
        "--database-url", help="the shared registry (env PETRI_DATABASE_URL); postgresql://..."
    )
    args = parser.parse_args(argv)
    url = args.database_url or environ.get("PETRI_DATABASE_URL", "")
    try:
        url = parse_database_url(url)
    except ValueError as exc:
        parser.error(f"--database-url: {exc}")
    if not url:
        parser.error("no registry: set PETRI_DATABASE_URL or --database-url (postgresql://...)")

    from controller.store.nodes import PostgresNodes
    from controller.store.postgres import PostgresRegistry

    async def run() -> int:
        registry = PostgresRegistry(url, max_connections=1)
        await registry.open()
        try:
            nodes = PostgresNodes(registry)
            if not await nodes.set_draining(args.node, not args.undo):
                print(
                    f"no node named {args.node[:100]!r} has heartbeated in this registry",
                    file=sys.stderr,
                )
                return 1
            print(f"node {args.node}: {'no longer draining' if args.undo else 'draining'}")
            if args.undo or args.no_wait:
                return 0
            return await wait_for_drain(nodes, args.node)
        finally:
            await registry.close()

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        print("stopped waiting: the node goes on draining (--undo stops it)", file=sys.stderr)
        return 130


async def wait_for_drain(nodes: "PostgresNodes", name: str) -> int:
    """Prints the drain's progress as it changes until the node holds no sandbox to move;
    1 when the drain is undone first."""
    said = None
    while True:
        progress = await nodes.drain_progress(name)
        if progress is None or not progress.draining:
            print(f"node {name}: the drain was undone before it was empty", file=sys.stderr)
            return 1
        left = sum(progress.held.get(state, 0) for state in _WAITED_FOR)
        moved = progress.report.get("moved", 0)
        failed = progress.report.get("failed", {})
        line = f"node {name}: {left} left to move, {moved} moved"
        lines = [line] + [
            f"  not moved yet: {_printable(sandbox)}: {_printable(why)}"
            for sandbox, why in sorted(dict(failed).items())
        ]
        if lines != said:
            print("\n".join(lines), flush=True)
            said = lines
        if left == 0:
            terminated = progress.held.get(State.TERMINATED, 0)
            if terminated:
                print(f"node {name}: {terminated} TERMINATED sandboxes stay until deleted")
            print(f"node {name}: drained")
            return 0
        await asyncio.sleep(POLL_SECONDS)


def _printable(text: object, limit: int = 300) -> str:
    """A node's words for the operator's terminal: a reason may quote a sandbox's own (its
    executor's), so no control character reaches the terminal as one."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text)[:limit])


def main() -> None:
    if sys.argv[1:2] == ["drain"]:
        try:
            sys.exit(drain(sys.argv[2:], dict(os.environ)))
        except (PetriError, RuntimeError) as exc:
            print(f"petri controller drain: {exc}", file=sys.stderr)
            sys.exit(1)
    config = load_config()
    configure(config.log_format, config.log_level)
    from controller.app import serve
    from controller.store.pg_schema import DatabaseUnusable

    try:
        asyncio.run(serve(config))
    except (PetriError, ValueError, OSError, DatabaseUnusable) as exc:
        print(f"petri controller: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
