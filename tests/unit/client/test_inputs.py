"""Input files as chunk streams: lazy, bounded, and the same whatever their source."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from petri.sdk.inputs import CHUNK_SIZE, async_iterate, file_chunks, files_chunks
from petri.sdk.requests import run_requests, write_requests


def test_bytes_split_into_chunks_final_on_the_last() -> None:
    chunks = list(file_chunks("a", b"0123456789", chunk_size=4))
    assert [(c.path, c.data, c.final) for c in chunks] == [
        ("a", b"0123", False),
        ("a", b"4567", False),
        ("a", b"89", True),
    ]


def test_an_empty_file_is_one_final_chunk() -> None:
    assert [(c.data, c.final) for c in file_chunks("e", b"")] == [(b"", True)]


def test_a_str_is_utf8() -> None:
    assert b"".join(c.data for c in file_chunks("t", "héllo")) == "héllo".encode()


def test_a_path_is_opened_only_when_read(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    stream = file_chunks("d", path, chunk_size=3)  # not there yet: nothing opened
    path.write_bytes(b"abcdefg")
    assert [c.data for c in stream] == [b"abc", b"def", b"g"]


def test_a_missing_path_fails_when_sent(tmp_path: Path) -> None:
    stream = file_chunks("d", tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        next(stream)


def test_a_file_object_is_read_from_where_it_stands() -> None:
    buffer = io.BytesIO(b"skipABCDE")
    buffer.seek(4)
    assert [c.data for c in file_chunks("f", buffer, chunk_size=2)] == [b"AB", b"CD", b"E"]


def test_a_text_file_object_is_refused() -> None:
    with pytest.raises(TypeError):
        list(file_chunks("f", io.StringIO("text")))  # type: ignore[arg-type]


def test_a_big_path_is_read_a_chunk_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * (3 * CHUNK_SIZE + 1))
    sizes = [len(c.data) for c in file_chunks("big", path)]
    assert sizes == [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE, 1]


def test_files_one_after_the_other() -> None:
    chunks = files_chunks({"a": b"12", "b": b"3"}, chunk_size=1)
    assert [(c.path, c.data, c.final) for c in chunks] == [
        ("a", b"1", False),
        ("a", b"2", True),
        ("b", b"3", True),
    ]


def test_run_requests_start_then_chunks() -> None:
    requests = list(run_requests("projects/p/sandboxes/s", "1", 5, {"in": b"x"}))
    assert requests[0].start.name == "projects/p/sandboxes/s"
    assert requests[0].start.timeout.seconds == 5
    assert [r.WhichOneof("request") for r in requests] == ["start", "input_chunk"]


def test_write_requests_name_the_sandbox_first_and_report_progress() -> None:
    progress: list[int] = []
    requests = list(write_requests("sb", "p", b"abcde", progress.append, chunk_size=2))
    assert [r.name for r in requests] == ["sb", "", ""]
    assert [r.chunk.data for r in requests] == [b"ab", b"cd", b"e"]
    assert progress == [2, 4, 5]


async def test_async_iterate() -> None:
    assert [c.data async for c in async_iterate(file_chunks("a", b"abc", chunk_size=2))] == [
        b"ab",
        b"c",
    ]
