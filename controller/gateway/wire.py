"""Reads one string field of a serialized protobuf message without parsing the rest: the
gateway routes by a request's name and forwards its bytes as they came."""

import functools
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from controller.errors import InvalidArgument

_FieldProto = descriptor_pb2.FieldDescriptorProto
# The readers' own pool: their names are nobody else's.
_POOL = descriptor_pool.DescriptorPool()


def _malformed() -> InvalidArgument:
    # The same words as the node's interceptor says of a request it cannot parse.
    return InvalidArgument("the request message does not parse as its type")


@functools.cache
def _reader(path: tuple[int, ...]) -> type[Message]:
    """A message type of only the fields on `path` (embedded messages, then a string): protobuf's
    own parser (C, as fast as the node's) reads it, every other field left as unknown. A parser
    written here took seconds of the event loop for a request of millions of tiny fields."""
    package = "petri.gateway.route" + "".join(f"_{number}" for number in path)
    file = descriptor_pb2.FileDescriptorProto(
        name=f"{package}.proto", package=package, syntax="proto3"
    )
    for depth, number in enumerate(path):
        message = file.message_type.add(name=f"M{depth}")
        field = message.field.add(name="f", number=number, label=_FieldProto.LABEL_OPTIONAL)
        if depth == len(path) - 1:
            field.type = _FieldProto.TYPE_STRING
        else:
            field.type = _FieldProto.TYPE_MESSAGE
            field.type_name = f".{package}.M{depth + 1}"
    _POOL.Add(file)
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{package}.M0"))


def string_field(message: bytes | memoryview, path: Sequence[int]) -> str:
    """The string at `path` (field numbers: embedded messages, then the string), "" when unset.
    As protobuf parses: the last occurrence of a string wins, occurrences of a message merge."""
    try:
        parsed: Any = _reader(tuple(path)).FromString(bytes(message))
    except DecodeError:
        raise _malformed() from None
    for _ in path:
        parsed = parsed.f
    assert isinstance(parsed, str)
    return parsed
