"""`petri mcp` (extra `petri-client[mcp]`): an MCP server whose tools run Python in petri
sandboxes. docs/mcp.md describes the tools, the transports and the client configuration."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence


def main(argv: Sequence[str]) -> int:
    """Runs the MCP server with `petri mcp`'s command line (without the `mcp`)."""
    if importlib.util.find_spec("mcp") is None:  # the extra: said before its dependencies fail
        raise ModuleNotFoundError("No module named 'mcp'", name="mcp")
    from petri.mcp.server import main as serve  # loads the mcp package only when used

    return serve(argv)


__all__ = ["main"]
