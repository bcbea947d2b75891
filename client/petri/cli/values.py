"""The command line's values: durations, sizes, labels (no rich here: `petri mcp` uses them
without the cli extra)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from petri.cli.errors import CliError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_LABEL = re.compile(r"^([^=]+)=(.*)$")


def parse_duration(text: str) -> float:
    """Seconds from '90', '90s', '30m', '2h', '1d' or '500ms'."""
    match = _DURATION.match(text)
    if match is None:
        raise CliError(f"not a duration: {text[:40]!r} (e.g. 90s, 30m, 2h)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def parse_size(text: str) -> int:
    """Bytes from '512M', '1G', '1.5GiB' or '4096' (K, M, G, T are powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise CliError(f"not a size: {text[:40]!r} (e.g. 512M, 2G)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_labels(items: Iterable[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        match = _LABEL.match(item)
        if match is None:
            raise CliError(f"a label is KEY=VALUE, not {item[:40]!r}")
        labels[match.group(1)] = match.group(2)
    return labels
