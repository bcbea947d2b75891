"""Entry point: `python -m controller [flags]`; every flag has a PETRI_* variable.

`python -m controller drain NODE [--undo]` marks a node draining in the shared registry.
"""

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from controller.config import load_config, parse_database_url
from controller.errors import PetriError
from controller.log_setup import configure

DRAIN_HELP = (
    "Marks a node (role node) draining in the registry that nodes share: gateways place no "
    "new sandbox on it. Its sandboxes are not moved (checkpoints are on its own disk): they "
    "stay, and are served there, until they end (deleted or expired); the node is empty once "
    "no sandbox is left on it. --undo lets gateways place sandboxes on it again. The "
    "registry is PETRI_DATABASE_URL's unless --database-url is given."
)


def drain(argv: Sequence[str], environ: dict[str, str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller drain", description=DRAIN_HELP)
    parser.add_argument("node", help="the node's name (its --node-name)")
    parser.add_argument("--undo", action="store_true", help="stop draining it")
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

    async def run() -> bool:
        registry = PostgresRegistry(url, max_connections=1)
        await registry.open()
        try:
            return await PostgresNodes(registry).set_draining(args.node, not args.undo)
        finally:
            await registry.close()

    if not asyncio.run(run()):
        print(
            f"no node named {args.node[:100]!r} has heartbeated in this registry", file=sys.stderr
        )
        return 1
    print(f"node {args.node}: {'no longer draining' if args.undo else 'draining'}")
    return 0


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
