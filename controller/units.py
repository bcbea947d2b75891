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
    """A duration as a person reads it: "14d", "5m" when it is a whole number of one unit,
    else every unit from the largest down to seconds: "14d 0h 0m 1s", "1m 30.5s"."""
    micros = value // timedelta(microseconds=1)
    sign, micros = ("-", -micros) if micros < 0 else ("", micros)
    units = (("d", 86400 * 10**6), ("h", 3600 * 10**6), ("m", 60 * 10**6))
    for unit, size in units:
        if micros >= size and micros % size == 0:
            return f"{sign}{micros // size}{unit}"
    parts: list[str] = []
    for unit, size in units:
        count, micros = divmod(micros, size)
        if count or parts:
            parts.append(f"{count}{unit}")
    whole, fraction = divmod(micros, 10**6)
    seconds = f"{whole}.{fraction:06d}".rstrip("0").rstrip(".")
    parts.append(f"{seconds}s")
    return sign + " ".join(parts)


def format_size(size: int) -> str:
    """A size as a person reads it: "512 B", "1.5 KiB", "100 MiB", "2 GiB"."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            text = f"{value:.1f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
