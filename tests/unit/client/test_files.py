"""FileInfo from the server's messages."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from petri.sdk.files import FileInfo
from petri.v1 import execution_pb2, files_pb2


@pytest.fixture
def local_zone_not_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("local_zone_not_utc")
def test_file_info_from_proto_is_aware_utc() -> None:
    proto = files_pb2.FileInfo(
        path="d/a.csv", type=files_pb2.FileInfo.REGULAR, size=3, mode=0o644, mime_type="text/csv"
    )
    proto.modify_time.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    info = FileInfo.from_proto(proto)
    assert info == FileInfo(
        "d/a.csv", "file", 3, 0o644, datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "text/csv"
    )


def test_types_and_a_missing_time() -> None:
    kinds = {
        files_pb2.FileInfo.DIRECTORY: "directory",
        files_pb2.FileInfo.SYMLINK: "symlink",
        files_pb2.FileInfo.OTHER: "other",
        files_pb2.FileInfo.TYPE_UNSPECIFIED: "other",
    }
    for proto_type, name in kinds.items():
        info = FileInfo.from_proto(files_pb2.FileInfo(path="x", type=proto_type))
        assert (info.type, info.modify_time) == (name, None)


def test_file_info_of_a_download() -> None:
    chunk = execution_pb2.FileChunk(path="a.png", size=10, mime_type="image/png")
    assert FileInfo.from_chunk("a.png", chunk, 10) == FileInfo(
        "a.png", "file", 10, mime_type="image/png"
    )
    assert FileInfo.from_chunk("e", None, 0).mime_type == ""
