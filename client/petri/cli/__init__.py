"""The `petri` command line (extra `petri-client[cli]`): `petri --help`, docs/cli.md."""

from __future__ import annotations

import sys
from collections.abc import Sequence

# The top-level modules of the extras, by extra: `pip install petri-client` installs the
# `petri` command without them, and it should say what to install, not show a traceback.
_EXTRAS = {"rich": "cli", "mcp": "mcp"}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # `petri mcp ...` hands everything after it to the MCP server, which has its own
        # options; it needs the mcp extra, not the cli one.
        if args[:1] == ["mcp"]:
            from petri import mcp

            return mcp.main(args[1:])
        from petri.cli.app import main as run  # rich: the cli extra

        return run(args)
    except ModuleNotFoundError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        print(
            f"petri: this command needs the {extra!r} extra, which is not installed: "
            f"pip install 'petri-client[{extra}]'",
            file=sys.stderr,
        )
        return 2


__all__ = ["main"]
