"""Parsing of human-friendly durations ("90s", "1h", "14d") and sizes ("512MiB", "1GB")."""

import re
from datetime import timedelta

_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_duration(text: str) -> timedelta:
    """Parses "300", "300s", "5m", "1h", "14d", "250ms"; a bare number is seconds."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return timedelta(seconds=float(text))
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 5m, 1h, 14d")
    return timedelta(seconds=float(match["value"]) * _DURATION_UNITS[match["unit"]])


def parse_size(text: str) -> int:
    """Parses "1048576", "512MiB", "1GB" into bytes."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: use e.g. 1048576, 512MiB, 2GiB")
    unit = (match["unit"] or "B").lower()
    return int(float(match["value"]) * _SIZE_UNITS[unit])


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
