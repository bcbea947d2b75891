"""Request fields quoted in error messages: always a bounded prefix, never the whole input.

A message echoing a hostile field whole could be megabytes long: gRPC then refuses the
status itself (RESOURCE_EXHAUSTED, "metadata exceeds limit") and the caller never learns what
was wrong. Every message built from a request field quotes it through `quote`.
"""

# Characters of a field shown in a message; enough to recognise it.
MAX_QUOTED_CHARS = 64


def quote(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """`value` as repr() quotes it, cut to its first `limit` characters with a note of its
    full length when it is longer."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
