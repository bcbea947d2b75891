"""Reads one string field of a serialized protobuf message without parsing the rest: the
gateway routes by a request's name and forwards its bytes as they came."""

from collections.abc import Sequence

from controller.errors import InvalidArgument

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _malformed() -> InvalidArgument:
    # The same words as the node's interceptor says of a request it cannot parse.
    return InvalidArgument("the request message does not parse as its type")


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise _malformed()
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview, number: int) -> list[memoryview]:
    """The length-delimited occurrences of field `number`, in order; the others are skipped."""
    found: list[memoryview] = []
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        wire_type = key & 7
        if wire_type == _VARINT:
            _, at = _varint(data, at)
        elif wire_type == _FIXED64:
            at += 8
        elif wire_type == _FIXED32:
            at += 4
        elif wire_type == _LENGTH:
            size, at = _varint(data, at)
            if at + size > len(data):
                raise _malformed()
            if key >> 3 == number:
                found.append(data[at : at + size])
            at += size
        else:  # groups, long deprecated, are in none of petri's messages
            raise _malformed()
        if at > len(data):
            raise _malformed()
    return found


def string_field(message: bytes | memoryview, path: Sequence[int]) -> str:
    """The string at `path` (field numbers: embedded messages, then the string), "" when unset.
    As protobuf parses: the last occurrence of a string wins, occurrences of a message merge."""
    data = memoryview(message)
    *outer, last = path
    candidates = [data]
    for number in outer:
        candidates = [inner for candidate in candidates for inner in _fields(candidate, number)]
    value = b""
    for candidate in candidates:
        occurrences = _fields(candidate, last)
        if occurrences:
            value = bytes(occurrences[-1])
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise _malformed() from None
