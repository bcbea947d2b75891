import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from executor.workspace import (
    MAX_SCAN_DEPTH,
    MAX_SCAN_PROBLEMS,
    InputStager,
    InputTooLarge,
    NotAFile,
    Unscanned,
    changed_files,
    read_chunks,
    scan_problems,
    snapshot,
)
from petri.paths import InvalidPath, check_relative_path
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


def make_chain(root: Path, depth: int, file_name: str = "") -> None:
    """A directory chain `depth` levels deep, made relative to descriptors as user code can
    (its full path would be far beyond PATH_MAX); a file at its bottom when named."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        next_fd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = next_fd
    if file_name:
        os.close(os.open(file_name, os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)


@pytest.fixture
def chain_root(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied of the deep chain afterwards by rm, which (unlike pytest's cleanup)
    walks any depth."""
    yield tmp_path
    subprocess.run(["rm", "-rf", "--", str(tmp_path / "d")], check=True)


def test_a_chain_deeper_than_the_limit_is_reported_not_fatal(chain_root: Path) -> None:
    tmp_path = chain_root
    before = snapshot(tmp_path)
    make_chain(tmp_path, 1500, file_name="deep.txt")
    (tmp_path / "d/d/shallow.txt").write_text("s")
    after = snapshot(tmp_path)
    assert [c.path for c in changed_files(before, after)] == ["d/d/shallow.txt"]
    (problem,) = scan_problems(before, after)
    assert problem.path == "/".join(["d"] * MAX_SCAN_DEPTH)
    assert problem.reason == f"deeper than {MAX_SCAN_DEPTH} levels: not scanned"


def test_files_at_the_depth_limit_are_seen(tmp_path: Path) -> None:
    make_chain(tmp_path, MAX_SCAN_DEPTH - 1, file_name="f")
    after = snapshot(tmp_path)
    assert list(after.files) == ["/".join(["d"] * (MAX_SCAN_DEPTH - 1) + ["f"])]
    assert not after.unscanned


def test_past_the_entry_budget_nothing_after_the_stop_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for index in range(5):
        (tmp_path / f"b/{index}").write_text("x")
    (tmp_path / "c.txt").write_text("x")
    before = snapshot(tmp_path, max_entries=4)  # a, b, c.txt, then b's five are too many
    (tmp_path / "a/new.txt").write_text("n")
    (tmp_path / "z.txt").write_text("z")
    after = snapshot(tmp_path)
    assert before.stopped_at == ("b", "") and after.stopped_at is None
    # a/new.txt comes before the stop (by name); b's files and z.txt after it: not known to
    # be new, so not returned.
    assert [c.path for c in changed_files(before, after)] == ["a/new.txt"]
    (problem,) = scan_problems(before, after)
    assert problem.path == "b" and "stopped after 4 entries" in problem.reason


def test_past_the_time_budget_the_scan_stops_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    before = snapshot(tmp_path)
    (tmp_path / "b.txt").write_text("b")
    after = snapshot(tmp_path, seconds=0)
    assert after.stopped_at == ("a.txt",)
    assert changed_files(before, after) == []
    (problem,) = scan_problems(before, after)
    assert problem.path == "a.txt" and "took more than 0 s" in problem.reason


def test_the_earlier_stop_of_the_two_scans_counts(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a")
    before = snapshot(tmp_path, seconds=0)  # saw nothing
    (tmp_path / "b.txt").write_text("b")
    after = snapshot(tmp_path)
    assert changed_files(before, after) == []  # a.txt may be old: not claimed as new
    assert [p.path for p in scan_problems(before, after)] == ["a.txt"]


def test_names_that_are_not_utf8_are_omitted_with_a_reason(tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    root = os.fsencode(tmp_path)
    with open(root + b"/caf\xe9.txt", "wb") as handle:
        handle.write(b"x")
    os.mkdir(root + b"/dir\xff")
    with open(root + b"/dir\xff/inner.txt", "wb") as handle:
        handle.write(b"yy")
    (tmp_path / "line\nbreak.txt").write_text("ok")  # odd but valid UTF-8: returned
    after = snapshot(tmp_path)
    changes = changed_files(before, after)
    bad = "its name is not valid UTF-8: not returned (rename it to return it)"
    assert [(c.path, c.size, c.problem) for c in changes] == [
        ("caf\\xe9.txt", 1, bad),
        ("dir\\xff/inner.txt", 2, bad),
        ("line\nbreak.txt", 2, ""),
    ]
    for change in changes:
        execution_pb2.OmittedFile(path=change.path, reason=change.problem).SerializeToString()
    assert changed_files(after, snapshot(tmp_path)) == []  # unchanged: not reported again


def test_a_directory_that_cannot_be_opened_is_reported(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root opens any directory")
    (tmp_path / "locked").mkdir(mode=0)
    try:
        after = snapshot(tmp_path)
    finally:
        (tmp_path / "locked").chmod(0o755)
    (problem,) = after.unscanned
    assert problem.path == "locked" and "Permission denied" in problem.reason


def test_problems_beyond_the_cap_are_counted_not_listed(tmp_path: Path) -> None:
    for index in range(MAX_SCAN_PROBLEMS + 5):
        (tmp_path / f"{index:03}/d").mkdir(parents=True)
    after = snapshot(tmp_path, max_depth=1)
    problems = scan_problems(snapshot(tmp_path, max_depth=1), after)
    assert len(problems) == MAX_SCAN_PROBLEMS + 1
    assert problems[-1] == Unscanned("", "5 more paths could not be scanned", 5)


def test_a_file_replaced_by_a_fifo_or_a_directory_is_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name in ("fifo", "dir"):
        with pytest.raises(NotAFile):
            list(read_chunks(tmp_path, name, 10))
