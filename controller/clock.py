"""The wall clock the controller stamps records with; tests pass their own."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
