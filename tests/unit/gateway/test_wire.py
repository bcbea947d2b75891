"""Reading the routing name out of a serialized request, as protobuf would parse it."""

import time

import pytest

from controller.errors import InvalidArgument
from controller.gateway.wire import string_field
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2


def test_a_top_level_string_among_other_fields() -> None:
    request = files_pb2.ReadFileRequest(name="projects/p/sandboxes/s", path="a.txt")
    assert string_field(request.SerializeToString(), (1,)) == "projects/p/sandboxes/s"
    assert string_field(request.SerializeToString(), (2,)) == "a.txt"
    assert string_field(files_pb2.ReadFileRequest().SerializeToString(), (1,)) == ""


def test_a_nested_string_skips_every_other_wire_type() -> None:
    start = sandbox_pb2.ExecuteCodeStart(name="projects/p/sandboxes/s", code="x = 1" * 1000)
    start.timeout.seconds = 5  # an embedded message, varints inside
    request = sandbox_pb2.StreamExecuteCodeRequest(start=start)
    assert string_field(request.SerializeToString(), (1, 1)) == "projects/p/sandboxes/s"
    update = sandbox_pb2.UpdateSandboxRequest(
        sandbox=sandbox_pb2.Sandbox(name="projects/p/sandboxes/u", labels={"k": "v"})
    )
    update.update_mask.paths.append("labels")
    assert string_field(update.SerializeToString(), (1, 1)) == "projects/p/sandboxes/u"


def test_the_last_occurrence_wins_as_when_parsed() -> None:
    one = files_pb2.WriteFileRequest(name="projects/p/sandboxes/first").SerializeToString()
    chunk = files_pb2.WriteFileRequest(chunk=execution_pb2.FileChunk(path="f", data=b"\x00" * 300))
    two = files_pb2.WriteFileRequest(name="projects/p/sandboxes/second").SerializeToString()
    raw = one + chunk.SerializeToString() + two
    assert files_pb2.WriteFileRequest.FromString(raw).name == "projects/p/sandboxes/second"
    assert string_field(raw, (1,)) == "projects/p/sandboxes/second"
    # Embedded messages merge: a later `start` without a name keeps the earlier one's.
    first = sandbox_pb2.StreamExecuteCodeRequest(start=sandbox_pb2.ExecuteCodeStart(name="n1"))
    later = sandbox_pb2.StreamExecuteCodeRequest(start=sandbox_pb2.ExecuteCodeStart(code="c"))
    raw = first.SerializeToString() + later.SerializeToString()
    assert sandbox_pb2.StreamExecuteCodeRequest.FromString(raw).start.name == "n1"
    assert string_field(raw, (1, 1)) == "n1"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x0a\x05abc",  # a string longer than the message
        b"\x0a",  # a length missing
        b"\x08" + b"\xff" * 11,  # a varint of more than 64 bits
        b"\x0b",  # a group (wire type 3)
        b"\x0a\x02\xff\xfe",  # not UTF-8
        b"\x11\x00",  # a fixed64 cut short
    ],
)
def test_a_malformed_message_is_invalid_argument(raw: bytes) -> None:
    with pytest.raises(InvalidArgument, match="does not parse as its type"):
        string_field(raw, (1,))


def test_a_request_of_millions_of_tiny_fields_is_read_as_fast_as_the_node_parses_it() -> None:
    # 16 MiB of one unknown varint field, 8M times: a parser written in Python held the
    # gateway's event loop for seconds (a request may be 100 MiB), the node's takes ~0.05 s.
    raw = b"\x78\x00" * (8 << 20)
    started = time.perf_counter()
    sandbox_pb2.ExecuteCodeRequest.FromString(raw)
    node = time.perf_counter() - started
    started = time.perf_counter()
    assert string_field(raw, (1,)) == ""
    assert string_field(b"\x0a\x00" * (8 << 20), (1, 1)) == ""  # 8M empty `start`s
    assert time.perf_counter() - started < 10 * node + 0.5
