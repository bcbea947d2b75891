import os
from pathlib import Path

import pytest

from executor.paths import InvalidPath, check_relative_path
from executor.workspace import (
    InputStager,
    InputTooLarge,
    changed_files,
    read_chunks,
    snapshot,
)
from petri.v1 import execution_pb2


def chunk(path: str, data: bytes, final: bool = True) -> execution_pb2.FileChunk:
    return execution_pb2.FileChunk(path=path, data=data, final=final)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "empty"),
        ("/etc/passwd", "absolute"),
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("a//b", "empty or '.'"),
        ("./a", "empty or '.'"),
        ("a/", "empty or '.'"),
        ("a\0b", "NUL"),
        ("a" * 5000, "longer than"),
    ],
)
def test_bad_paths(path: str, message: str) -> None:
    with pytest.raises(InvalidPath, match=message):
        check_relative_path(path)


def test_good_paths() -> None:
    assert check_relative_path("data/in.csv") == ("data", "in.csv")
    assert check_relative_path(".hidden") == (".hidden",)


def test_chunks_are_staged_then_committed(tmp_path: Path) -> None:
    stager = InputStager(tmp_path, max_bytes=100)
    stager.add(chunk("dir/a.txt", b"hel", final=False))
    stager.add(chunk("dir/a.txt", b"lo"))
    stager.add(chunk("b.bin", b""))
    stager.finish()
    assert not (tmp_path / "dir").exists()  # nothing in place before the commit
    stager.commit()
    assert (tmp_path / "dir/a.txt").read_bytes() == b"hello"
    assert (tmp_path / "b.bin").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "dir"]  # staging is gone


def test_too_much_input_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    stager = InputStager(tmp_path, max_bytes=10)
    stager.add(chunk("a", b"12345"))
    with pytest.raises(InputTooLarge, match="exceed 10 bytes"):
        stager.add(chunk("b", b"123456"))
    stager.discard()
    assert list(tmp_path.iterdir()) == []


def test_one_bad_target_means_no_file_is_written(tmp_path: Path) -> None:
    os.symlink("/tmp", tmp_path / "link")
    stager = InputStager(tmp_path, max_bytes=100)
    stager.add(chunk("ok.txt", b"fine"))
    stager.add(chunk("link/evil.txt", b"escape"))
    stager.finish()
    with pytest.raises(InvalidPath, match="goes through a symlink"):
        stager.commit()
    stager.discard()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_unfinished_or_repeated_files_are_invalid(tmp_path: Path) -> None:
    stager = InputStager(tmp_path, max_bytes=100)
    stager.add(chunk("a", b"x", final=False))
    with pytest.raises(InvalidPath, match="without a chunk marked final"):
        stager.add(chunk("b", b"y"))
    stager.discard()
    stager = InputStager(tmp_path, max_bytes=100)
    stager.add(chunk("a", b"x"))
    with pytest.raises(InvalidPath, match="sent twice"):
        stager.add(chunk("a", b"y"))
    stager.discard()


def test_snapshots_find_created_and_changed_files_but_not_symlinks(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("same")
    (tmp_path / "change.txt").write_text("old")
    before = snapshot(tmp_path)
    (tmp_path / "change.txt").write_text("new!")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/new.txt").write_text("n")
    os.symlink("/etc/passwd", tmp_path / "passwd")
    os.mkfifo(tmp_path / "fifo")
    changes = changed_files(before, snapshot(tmp_path))
    assert [(c.path, c.size) for c in changes] == [("change.txt", 4), ("sub/new.txt", 1)]


def test_read_chunks_refuses_a_symlink_at_the_name(tmp_path: Path) -> None:
    os.symlink("/etc/passwd", tmp_path / "passwd")
    with pytest.raises(OSError):
        list(read_chunks(tmp_path, "passwd", 100))
    (tmp_path / "big").write_bytes(b"x" * (3 << 20))
    assert [len(c) for c in read_chunks(tmp_path, "big", 3 << 20)] == [1 << 20] * 3


def test_a_staging_directory_swapped_for_a_symlink_redirects_nothing(tmp_path: Path) -> None:
    workspace, elsewhere = tmp_path / "workspace", tmp_path / "elsewhere"
    workspace.mkdir()
    elsewhere.mkdir()
    stager = InputStager(workspace, max_bytes=100)
    stager.add(chunk("a.txt", b"first"))
    (staging,) = [p for p in workspace.iterdir() if p.name.startswith(".petri-incoming-")]
    # What a racing process of the sandbox could do in a /workspace it owns:
    staging.rename(workspace / "moved")
    os.symlink(elsewhere, staging)
    stager.add(chunk("b.txt", b"second"))
    stager.finish()
    stager.commit()
    assert list(elsewhere.iterdir()) == []
    assert (workspace / "a.txt").read_bytes() == b"first"
    assert (workspace / "b.txt").read_bytes() == b"second"
