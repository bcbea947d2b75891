"""Executions assembled from stream events, rich results, and output files saved safely."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from petri.sdk.errors import OutcomeUnknown
from petri.sdk.execution import ExecutionAssembler, OutputFile, Result
from petri.v1 import execution_pb2, sandbox_pb2

Event = sandbox_pb2.StreamExecuteCodeResponse


def output(kind: int, text: dict[str, str], binary: dict[str, bytes] | None = None) -> Event:
    return Event(output=execution_pb2.Output(kind=kind, text=text, binary=binary or {}))  # type: ignore[arg-type]


def test_the_assembler_calls_back_live_and_builds_the_execution() -> None:
    seen: list[str] = []
    assembler = ExecutionAssembler(
        on_stdout=lambda s: seen.append(f"out:{s}"),
        on_stderr=lambda s: seen.append(f"err:{s}"),
        on_output=lambda r: seen.append(f"{r.kind}:{r.text}"),
    )
    assembler.add(Event(stdout="a\n"))
    assert seen == ["out:a\n"]  # before anything else arrives
    assembler.add(Event(stderr="warn\n"))
    assembler.add(Event(stdout="b\n"))
    assembler.add(
        output(execution_pb2.Output.DISPLAY, {"text/plain": "<Figure>"}, {"image/png": b"\x89PNG"})
    )
    assembler.add(
        output(execution_pb2.Output.RESULT, {"text/plain": "42", "application/json": "42"})
    )
    for data, final in ((b"he", False), (b"llo", True)):
        assembler.add(
            Event(
                output_chunk=execution_pb2.FileChunk(
                    path="o.txt",
                    data=data,
                    final=final,
                    mime_type="text/plain" if not final else "",
                )
            )
        )
    assembler.add(Event(output_chunk=execution_pb2.FileChunk(path="empty", final=True)))
    result = sandbox_pb2.ExecuteCodeResult(
        execution_count=3, incarnation="i1", namespace_restored=True
    )
    result.lost_names.add(name="gen", reason="TypeError: cannot pickle")
    result.omitted_files.add(path="big", size=10, reason="too big")
    result.duration.FromMilliseconds(1500)
    with pytest.raises(OutcomeUnknown):
        assembler.result()  # no result event yet: the code may have run
    assembler.add(Event(result=result))

    ex = assembler.result()
    assert seen == ["out:a\n", "err:warn\n", "out:b\n", "display:<Figure>", "result:42"]
    assert (ex.stdout, ex.stderr) == ("a\nb\n", "warn\n")
    assert ex.ok and ex.error is None
    assert ex.text == "42" and ex.result is ex.results[1]
    assert ex.result is not None and ex.result.json == 42
    assert ex.results[0].png == b"\x89PNG" and ex.results[0].kind == "display"
    assert [(f.path, f.content, f.size, f.mime_type) for f in ex.files] == [
        ("o.txt", b"hello", 5, "text/plain"),
        ("empty", b"", 0, "application/octet-stream"),
    ]
    assert ex.file("o.txt") is ex.files[0] and ex.file("nope") is None
    assert ex.execution_count == 3 and ex.duration.total_seconds() == 1.5
    assert ex.namespace_restored and ex.lost_names == [("gen", "TypeError: cannot pickle")]
    assert [(o.path, o.size, o.reason) for o in ex.omitted_files] == [("big", 10, "too big")]


def test_an_error_is_a_result_with_its_traceback() -> None:
    assembler = ExecutionAssembler()
    error = execution_pb2.ExecutionError(
        kind=execution_pb2.ExecutionError.EXCEPTION,
        ename="ZeroDivisionError",
        evalue="division by zero",
        traceback=["Traceback (most recent call last):", '  File "<cell>", line 1', "    1/0"],
    )
    assembler.add(Event(result=sandbox_pb2.ExecuteCodeResult(error=error)))
    ex = assembler.result()
    assert not ex.ok and ex.error is not None
    assert ex.error.kind == "exception" and str(ex.error) == "ZeroDivisionError: division by zero"
    assert ex.error.rendered.splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert "line 1" in ex.error.rendered and ex.text is None


def test_a_timeout_error_kind() -> None:
    assembler = ExecutionAssembler()
    error = execution_pb2.ExecutionError(kind=execution_pb2.ExecutionError.TIMEOUT)
    assembler.add(Event(result=sandbox_pb2.ExecuteCodeResult(error=error)))
    ex = assembler.result()
    assert ex.error is not None and ex.error.kind == "timeout" and str(ex.error) == "timeout"


def test_result_mime_accessors() -> None:
    result = Result.from_proto(
        execution_pb2.Output(
            kind=execution_pb2.Output.RESULT,
            text={
                "text/plain": "df",
                "text/html": "<table/>",
                "text/markdown": "# x",
                "image/svg+xml": "<svg/>",
                "text/latex": "$x$",
                "application/json": "{not json",
            },
            binary={"image/jpeg": b"\xff\xd8"},
        )
    )
    assert (result.text, result.html, result.markdown, result.svg, result.latex) == (
        "df",
        "<table/>",
        "# x",
        "<svg/>",
        "$x$",
    )
    assert result.json is None  # not valid JSON: no exception
    assert result.jpeg == b"\xff\xd8" and result.png is None
    assert result.mime("image/jpeg") == b"\xff\xd8" and result.mime("text/csv") is None
    assert set(result.mime_types) == {
        "text/plain",
        "text/html",
        "text/markdown",
        "image/svg+xml",
        "text/latex",
        "application/json",
        "image/jpeg",
    }


def test_save_writes_under_the_directory(tmp_path: Path) -> None:
    saved = OutputFile("a/b/c.txt", b"data", "text/plain").save(tmp_path)
    assert saved == tmp_path / "a" / "b" / "c.txt" and saved.read_bytes() == b"data"
    OutputFile("a/b/c.txt", b"new", "text/plain").save(tmp_path)  # replaces
    assert saved.read_bytes() == b"new"


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../escape", "a/../../escape", "a\0b", "", "a//b", "./a"]
)
def test_save_refuses_hostile_paths(tmp_path: Path, path: str) -> None:
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ValueError):
        OutputFile(path, b"x", "").save(target)
    assert list(tmp_path.rglob("*")) == [target]


def test_save_never_follows_a_symlink_out_of_the_directory(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "out"
    target.mkdir()
    (target / "link").symlink_to(outside)
    (target / "file").symlink_to(outside / "victim")
    with pytest.raises(OSError):
        OutputFile("link/x", b"x", "").save(target)  # a directory on the way is a symlink
    with pytest.raises(OSError):
        OutputFile("file", b"x", "").save(target)  # the file itself is a symlink
    assert list(outside.iterdir()) == []
    assert os.path.islink(target / "file")
