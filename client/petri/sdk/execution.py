"""What one run of code produced: :class:`Execution`, with its :class:`Result` values, its
:class:`ExecutionError` and its :class:`OutputFile` files, assembled from StreamExecuteCode's
events by :class:`ExecutionAssembler` (shared by the blocking and the asyncio sandboxes)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

from petri.paths import check_relative_path
from petri.sdk.errors import OutcomeUnknown
from petri.v1 import execution_pb2, sandbox_pb2

__all__ = [
    "Execution",
    "ExecutionAssembler",
    "ExecutionError",
    "OmittedFile",
    "OutputCallback",
    "OutputFile",
    "Result",
    "TextCallback",
]

TextCallback = Callable[[str], object]
OutputCallback = Callable[["Result"], object]

_ERROR_KINDS: dict[int, str] = {
    execution_pb2.ExecutionError.EXCEPTION: "exception",
    execution_pb2.ExecutionError.TIMEOUT: "timeout",
    execution_pb2.ExecutionError.INTERPRETER_EXITED: "interpreter_exited",
    execution_pb2.ExecutionError.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class Result:
    """A rich output: one object rendered in one or more MIME types, as a notebook shows it.

    ``kind`` is ``"result"`` for the value of the code's last expression and ``"display"`` for
    a display() call or a figure left open."""

    kind: Literal["result", "display"]
    data: dict[str, str | bytes]

    @classmethod
    def from_proto(cls, output: execution_pb2.Output) -> Result:
        data: dict[str, str | bytes] = dict(output.text)
        data.update(output.binary)
        kind: Literal["result", "display"] = (
            "result" if output.kind == execution_pb2.Output.RESULT else "display"
        )
        return cls(kind=kind, data=data)

    @property
    def mime_types(self) -> list[str]:
        """Every MIME type this output is rendered in ("text/plain" always among them)."""
        return list(self.data)

    def mime(self, mime_type: str) -> str | bytes | None:
        """The rendering in ``mime_type``: text for textual types, bytes for images; else None."""
        return self.data.get(mime_type)

    def _text(self, mime_type: str) -> str | None:
        value = self.data.get(mime_type)
        return value if isinstance(value, str) else None

    def _binary(self, mime_type: str) -> bytes | None:
        value = self.data.get(mime_type)
        return value if isinstance(value, bytes) else None

    @property
    def text(self) -> str | None:
        """text/plain: the repr a notebook shows."""
        return self._text("text/plain")

    @property
    def html(self) -> str | None:
        return self._text("text/html")

    @property
    def markdown(self) -> str | None:
        return self._text("text/markdown")

    @property
    def svg(self) -> str | None:
        return self._text("image/svg+xml")

    @property
    def latex(self) -> str | None:
        return self._text("text/latex")

    @property
    def json(self) -> object | None:
        """application/json, parsed; None when absent or not valid JSON."""
        raw = self._text("application/json")
        if raw is None:
            return None
        try:
            parsed: object = json.loads(raw)
        except ValueError:
            return None
        return parsed

    @property
    def png(self) -> bytes | None:
        """image/png bytes, e.g. a matplotlib figure."""
        return self._binary("image/png")

    @property
    def jpeg(self) -> bytes | None:
        return self._binary("image/jpeg")

    def __repr__(self) -> str:
        return f"<Result {self.kind} {', '.join(self.data)}>"


@dataclass(frozen=True)
class ExecutionError:
    """Why the code did not complete: ``kind`` is "exception", "timeout", "interpreter_exited"
    (its variables are gone) or "cancelled"; ``ename``, ``evalue``, ``traceback`` as Python
    reports them (user frames only)."""

    kind: str
    ename: str
    evalue: str
    traceback: list[str]

    @classmethod
    def from_proto(cls, error: execution_pb2.ExecutionError) -> ExecutionError:
        return cls(
            kind=_ERROR_KINDS.get(error.kind, "unknown"),
            ename=error.ename,
            evalue=error.evalue,
            traceback=list(error.traceback),
        )

    @property
    def rendered(self) -> str:
        """The traceback as Python prints it (ending with "ename: evalue")."""
        lines = "\n".join(line.rstrip("\n") for line in self.traceback)
        last = f"{self.ename}: {self.evalue}" if self.evalue else self.ename
        if lines.rstrip().endswith(last) or not last:
            return lines
        return f"{lines}\n{last}" if lines else last

    def __str__(self) -> str:
        if self.ename:
            return f"{self.ename}: {self.evalue}" if self.evalue else self.ename
        return self.kind


@dataclass(frozen=True)
class OmittedFile:
    """A created or changed file the server did not return, and why (see the proto's
    OmittedFile: an empty path counts entries not listed)."""

    path: str
    size: int
    reason: str


@dataclass(frozen=True)
class OutputFile:
    """A file under /workspace that the code created or changed. Its path comes from the
    sandbox: treat it as hostile (:meth:`save` does)."""

    path: str
    content: bytes
    mime_type: str

    @property
    def size(self) -> int:
        return len(self.content)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes the file under ``directory`` at its relative path, creating directories, and
        returns where. Refuses (ValueError) an absolute path, '..', an empty component or NUL,
        and never follows a symlink (an existing symlink on the way is OSError)."""
        parts = check_relative_path(self.path)  # InvalidPath is a ValueError
        base = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        fds = [base]
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o755, dir_fd=fds[-1])
                except FileExistsError:
                    pass
                fds.append(
                    os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1])
                )
            fd = os.open(
                parts[-1],
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                0o644,
                dir_fd=fds[-1],
            )
            with os.fdopen(fd, "wb") as out:
                out.write(self.content)
        finally:
            for fd_ in fds:
                os.close(fd_)
        return Path(directory).joinpath(*parts)

    def __repr__(self) -> str:
        return f"<OutputFile {self.path!r} {self.size} bytes {self.mime_type}>"


@dataclass
class Execution:
    """Everything one run of code produced. A failure of the code is :attr:`error`, never an
    exception."""

    stdout: str = ""
    stderr: str = ""
    results: list[Result] = field(default_factory=list)
    error: ExecutionError | None = None
    files: list[OutputFile] = field(default_factory=list)
    omitted_files: list[OmittedFile] = field(default_factory=list)
    execution_count: int = 0
    duration: timedelta = timedelta(0)
    incarnation: str = ""
    namespace_reset: bool = False
    namespace_restored: bool = False
    lost_names: list[tuple[str, str]] = field(default_factory=list)
    output_truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the code completed without an error."""
        return self.error is None

    @property
    def result(self) -> Result | None:
        """The value of the code's last expression, if it had one."""
        return next((r for r in reversed(self.results) if r.kind == "result"), None)

    @property
    def text(self) -> str | None:
        """The text/plain of :attr:`result`."""
        return self.result.text if self.result is not None else None

    def file(self, path: str) -> OutputFile | None:
        """The output file at ``path``, if the code created or changed it."""
        return next((f for f in self.files if f.path == path), None)

    def __repr__(self) -> str:
        status = "ok" if self.error is None else f"error={self.error}"
        return (
            f"<Execution #{self.execution_count} {status} results={len(self.results)} "
            f"files={len(self.files)}>"
        )


class ExecutionAssembler:
    """Builds an :class:`Execution` from StreamExecuteCode's events, calling the callbacks as
    each event arrives."""

    def __init__(
        self,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        on_output: OutputCallback | None = None,
    ) -> None:
        self.execution = Execution()
        self.finished = False
        self._on_stdout, self._on_stderr, self._on_output = on_stdout, on_stderr, on_output
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._file_path: str | None = None
        self._file_mime = ""
        self._file_parts: list[bytes] = []

    def add(self, event: sandbox_pb2.StreamExecuteCodeResponse) -> None:
        which = event.WhichOneof("event")
        if which == "stdout":
            self._stdout.append(event.stdout)
            if self._on_stdout is not None:
                self._on_stdout(event.stdout)
        elif which == "stderr":
            self._stderr.append(event.stderr)
            if self._on_stderr is not None:
                self._on_stderr(event.stderr)
        elif which == "output":
            result = Result.from_proto(event.output)
            self.execution.results.append(result)
            if self._on_output is not None:
                self._on_output(result)
        elif which == "output_chunk":
            self._add_chunk(event.output_chunk)
        elif which == "result":
            self._finish(event.result)

    def result(self) -> Execution:
        """The execution, once its result event has arrived; OutcomeUnknown if the stream ended
        without one (the code may have run)."""
        if not self.finished:
            raise OutcomeUnknown(
                "the execution's stream ended without its result: the code may have run; "
                "check the sandbox before running it again"
            )
        return self.execution

    def _add_chunk(self, chunk: execution_pb2.FileChunk) -> None:
        if chunk.path != self._file_path:
            self._flush_file()
            self._file_path, self._file_mime = chunk.path, chunk.mime_type
        self._file_parts.append(chunk.data)
        if chunk.final:
            self._flush_file()

    def _flush_file(self) -> None:
        if self._file_path is not None:
            self.execution.files.append(
                OutputFile(
                    path=self._file_path,
                    content=b"".join(self._file_parts),
                    mime_type=self._file_mime or "application/octet-stream",
                )
            )
        self._file_path, self._file_mime, self._file_parts = None, "", []

    def _finish(self, result: sandbox_pb2.ExecuteCodeResult) -> None:
        self._flush_file()
        ex = self.execution
        ex.stdout, ex.stderr = "".join(self._stdout), "".join(self._stderr)
        ex.error = ExecutionError.from_proto(result.error) if result.HasField("error") else None
        ex.execution_count = result.execution_count
        ex.duration = result.duration.ToTimedelta()
        ex.incarnation = result.incarnation
        ex.namespace_reset = result.namespace_reset
        ex.namespace_restored = result.namespace_restored
        ex.output_truncated = result.output_truncated
        ex.lost_names = [(lost.name, lost.reason) for lost in result.lost_names]
        ex.omitted_files = [
            OmittedFile(path=o.path, size=o.size, reason=o.reason) for o in result.omitted_files
        ]
        self.finished = True
