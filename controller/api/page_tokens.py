"""Opaque page tokens for ListSandboxes (AIP-158).

A token carries the position after the last sandbox of a page, and a digest of the request it
belongs to: a token reused with another parent, filter or order_by is INVALID_ARGUMENT rather
than a silently wrong page.
"""

import base64
import binascii
import hashlib
import json
from typing import Any

from controller.errors import InvalidArgument

_VERSION = 1
# Ours are under 200 characters; a longer one is not ours, and is not decoded.
MAX_TOKEN_CHARS = 1024


def request_digest(parent: str, filter_text: str, order_by: str) -> str:
    material = json.dumps([parent, filter_text, order_by]).encode()
    return hashlib.sha256(material).hexdigest()[:16]


def encode_token(digest: str, after: tuple[Any, str]) -> str:
    payload = json.dumps({"v": _VERSION, "d": digest, "a": list(after)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_token(token: str, digest: str) -> tuple[Any, str]:
    """Returns the position a token points after; InvalidArgument when it is not ours."""
    invalid = InvalidArgument(
        "invalid page_token: pass the next_page_token of the previous ListSandboxes call, "
        "with the same parent, filter and order_by"
    )
    if len(token) > MAX_TOKEN_CHARS:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise invalid from None
    if not isinstance(data, dict) or data.get("v") != _VERSION or data.get("d") != digest:
        raise invalid
    after = data.get("a")
    if (
        not isinstance(after, list)
        or len(after) != 2
        or not isinstance(after[1], str)
        or not isinstance(after[0], int | str)
    ):
        raise invalid
    return after[0], after[1]
