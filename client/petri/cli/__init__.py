"""The `petri` command line (extra `petri-client[cli]`): `petri --help`, docs/cli.md."""

from petri.cli.app import main

__all__ = ["main"]
