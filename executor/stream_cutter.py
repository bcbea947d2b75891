"""Finds where one execution's stdout or stderr ends in a byte stream read in arbitrary chunks.

The worker writes a per-execution end marker to its stdout and stderr after the code finished;
everything before the marker belongs to that execution, everything after it to the next one.
"""


class StreamCutter:
    """Splits a stream at an end marker without ever holding back more than the marker's length."""

    def __init__(self) -> None:
        self._held = b""

    def feed(self, data: bytes, marker: bytes) -> tuple[bytes, bytes | None]:
        """Returns the bytes that are certainly before the marker, and what follows the marker
        when it was found (None while it was not)."""
        buffer = self._held + data
        index = buffer.find(marker)
        if index >= 0:
            self._held = b""
            return buffer[:index], buffer[index + len(marker) :]
        keep = _longest_suffix_that_starts(buffer, marker)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], None

    def flush(self) -> bytes:
        """Gives up on the marker: returns what was held back for it."""
        held, self._held = self._held, b""
        return held


def _longest_suffix_that_starts(buffer: bytes, marker: bytes) -> int:
    for size in range(min(len(buffer), len(marker) - 1), 0, -1):
        if marker.startswith(buffer[-size:]):
            return size
    return 0
