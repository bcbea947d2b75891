"""From the executor's events to the caller's: caps, checks, and the unary response.

The executor is as hostile as the code it runs. Whatever it sends, stdout and stderr stay
within `max_output_bytes` each (cut with a marker), rich outputs within the same total, files
within the response's file limits and with valid paths; the caller is told what was cut.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field

from controller.sandboxes.mime_types import guess_mime_type
from petri.paths import InvalidPath, check_relative_path
from petri.v1 import execution_pb2, executor_pb2, sandbox_pb2

TRUNCATION_MARKER = "\n[petri: output truncated: {stream} exceeded {limit} bytes]\n"
# Omitted files from the executor are shown to the caller: at most this many entries (the rest
# are counted in one more, with no path), each path and reason cut to these sizes.
MAX_OMITTED_ENTRIES = 1000
# The count of entries not listed, the executor's own summary included, is capped at this
# (an honest executor's is bounded by its scan, about 200,000).
MAX_UNLISTED_COUNT = 1_000_000
MAX_OMITTED_PATH_BYTES = 4096
MAX_OMITTED_REASON_BYTES = 500


def _cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes, marked with "..." when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "..."


@dataclass(frozen=True)
class OutputLimits:
    max_output_bytes: int  # stdout, stderr, and rich outputs: each
    max_file_bytes: int  # all returned files together
    max_files: int


class _CappedText:
    def __init__(self, name: str, limit: int) -> None:
        self._name = name
        self._limit = limit
        self._size = 0
        self.truncated = False

    def take(self, text: str) -> str:
        """What of `text` may still be passed on (with the marker when the cap is reached)."""
        if self.truncated:
            return ""
        data = text.encode()
        room = self._limit - self._size
        if len(data) <= room:
            self._size += len(data)
            return text
        self._size = self._limit
        self.truncated = True
        kept = data[:room].decode(errors="ignore")
        return kept + TRUNCATION_MARKER.format(stream=self._name, limit=self._limit)


@dataclass
class _FileInProgress:
    path: str
    size: int
    dropped: bool = False
    started: bool = False  # its first chunk (with size and MIME type) was passed on
    final: bool = False


@dataclass
class EventFilter:
    """Turns executor events into StreamExecuteCode events, enforcing the limits."""

    limits: OutputLimits
    _stdout: _CappedText = field(init=False)
    _stderr: _CappedText = field(init=False)
    _outputs_bytes: int = 0
    _outputs_truncated: bool = False
    _file: _FileInProgress | None = None
    _file_paths: set[str] = field(default_factory=set)
    _file_bytes: int = 0
    _omitted: list[execution_pb2.OmittedFile] = field(default_factory=list)
    _unlisted: int = 0  # omitted files beyond MAX_OMITTED_ENTRIES
    _passed_on: set[str] = field(default_factory=set)  # files whose chunks were passed on
    # Files passed on, then omitted (cut short): listed or not, they are not whole.
    incomplete: set[str] = field(default_factory=set)
    finished: bool = False

    def __post_init__(self) -> None:
        self._stdout = _CappedText("stdout", self.limits.max_output_bytes)
        self._stderr = _CappedText("stderr", self.limits.max_output_bytes)

    def convert(
        self, event: executor_pb2.ExecuteEvent
    ) -> Iterator[sandbox_pb2.StreamExecuteCodeResponse]:
        which = event.WhichOneof("event")
        if which == "stdout":
            text = self._stdout.take(event.stdout)
            if text:
                yield sandbox_pb2.StreamExecuteCodeResponse(stdout=text)
        elif which == "stderr":
            text = self._stderr.take(event.stderr)
            if text:
                yield sandbox_pb2.StreamExecuteCodeResponse(stderr=text)
        elif which == "output":
            size = event.output.ByteSize()
            if self._outputs_bytes + size > self.limits.max_output_bytes:
                self._outputs_truncated = True
            else:
                self._outputs_bytes += size
                yield sandbox_pb2.StreamExecuteCodeResponse(output=event.output)
        elif which == "file_chunk":
            yield from self._file_chunk(event.file_chunk)
        elif which == "result":
            yield sandbox_pb2.StreamExecuteCodeResponse(result=self._result(event.result))

    def _file_chunk(
        self, chunk: execution_pb2.FileChunk
    ) -> Iterator[sandbox_pb2.StreamExecuteCodeResponse]:
        current = self._file
        if current is None or current.final or current.path != chunk.path:
            if current is not None and not current.final and not current.dropped:
                yield self._close_file(current, "the sandbox ended the file early")
            current = self._start_file(chunk)
        if current.dropped:
            current.final = chunk.final
            return
        if self._file_bytes + len(chunk.data) > self.limits.max_file_bytes:
            yield self._close_file(current, "the sandbox sent more than the response's file limit")
            current.final = chunk.final
            return
        self._file_bytes += len(chunk.data)
        out = execution_pb2.FileChunk(path=chunk.path, data=chunk.data, final=chunk.final)
        if not current.started:
            out.size = current.size
            out.mime_type = guess_mime_type(current.path)
            current.started = True
            self._passed_on.add(current.path)
        current.final = chunk.final
        yield sandbox_pb2.StreamExecuteCodeResponse(output_chunk=out)

    def _start_file(self, chunk: execution_pb2.FileChunk) -> _FileInProgress:
        current = _FileInProgress(chunk.path, max(0, chunk.size))
        self._file = current
        reason = ""
        try:
            check_relative_path(chunk.path)
        except InvalidPath:
            reason = "the sandbox sent an invalid path"
        if chunk.path in self._file_paths:
            reason = "the sandbox sent this file twice"
        elif len(self._file_paths) >= self.limits.max_files:
            reason = f"more than {self.limits.max_files} files"
        if reason:
            current.dropped = True
            self._omit(chunk.path, current.size, reason)
        self._file_paths.add(chunk.path)
        return current

    def _close_file(
        self, current: _FileInProgress, reason: str
    ) -> sandbox_pb2.StreamExecuteCodeResponse:
        """Ends a file that was cut short: an empty final chunk, and an omitted entry."""
        current.dropped = True
        self._omit(current.path, current.size, f"{reason}; the file is incomplete")
        chunk = execution_pb2.FileChunk(path=current.path, final=True)
        return sandbox_pb2.StreamExecuteCodeResponse(output_chunk=chunk)

    def _omit(self, path: str, size: int, reason: str) -> None:
        if path in self._passed_on:
            self.incomplete.add(path)
        if len(self._omitted) >= MAX_OMITTED_ENTRIES:
            self._unlisted += 1
            return
        self._omitted.append(
            execution_pb2.OmittedFile(
                path=_cut(path, MAX_OMITTED_PATH_BYTES),
                size=max(0, size),
                reason=_cut(reason, MAX_OMITTED_REASON_BYTES),
            )
        )

    def _result(self, result: executor_pb2.ExecuteResult) -> sandbox_pb2.ExecuteCodeResult:
        if self._file is not None and not self._file.final and not self._file.dropped:
            self._omit(self._file.path, self._file.size, "the sandbox ended the file early")
        for omitted in result.omitted_files:
            if not omitted.path and omitted.size > 0:  # the executor's summary: size counts
                self._unlisted += min(omitted.size, MAX_UNLISTED_COUNT)
            else:
                self._omit(omitted.path, omitted.size, omitted.reason)
        if self._unlisted:
            unlisted = min(self._unlisted, MAX_UNLISTED_COUNT)
            self._omitted.append(
                execution_pb2.OmittedFile(
                    size=unlisted, reason=f"{unlisted} more omitted entries are not listed"
                )
            )
        self.finished = True
        out = sandbox_pb2.ExecuteCodeResult(
            execution_count=result.execution_count,
            duration=result.duration,
            incarnation=result.incarnation,
            namespace_reset=result.namespace_reset,
            output_truncated=(
                self._stdout.truncated or self._stderr.truncated or self._outputs_truncated
            ),
            omitted_files=self._omitted,
            # Set by the controller (Executions), never by the executor.
            namespace_restored=result.namespace_restored,
            lost_names=result.lost_names,
        )
        if result.HasField("error"):
            out.error.CopyFrom(result.error)
        return out


class ResponseCollector:
    """Builds the unary ExecuteCodeResponse from the filtered stream of events."""

    def __init__(self, limits: OutputLimits) -> None:
        self._filter = EventFilter(limits)
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._files: dict[str, list[bytes]] = {}
        self._response = sandbox_pb2.ExecuteCodeResponse()

    @property
    def finished(self) -> bool:
        return self._filter.finished

    def add(self, event: executor_pb2.ExecuteEvent) -> None:
        for out in self._filter.convert(event):
            which = out.WhichOneof("event")
            if which == "stdout":
                self._stdout.append(out.stdout)
            elif which == "stderr":
                self._stderr.append(out.stderr)
            elif which == "output":
                self._response.outputs.append(out.output)
            elif which == "output_chunk":
                self._files.setdefault(out.output_chunk.path, []).append(out.output_chunk.data)
            elif which == "result":
                self._finish(out.result)

    def _finish(self, result: sandbox_pb2.ExecuteCodeResult) -> None:
        response = self._response
        if result.HasField("error"):
            response.error.CopyFrom(result.error)
        response.execution_count = result.execution_count
        response.duration.CopyFrom(result.duration)
        response.incarnation = result.incarnation
        response.namespace_reset = result.namespace_reset
        response.output_truncated = result.output_truncated
        response.omitted_files.extend(result.omitted_files)
        response.namespace_restored = result.namespace_restored
        response.lost_names.extend(result.lost_names)
        for path, chunks in self._files.items():
            if path in self._filter.incomplete:
                continue
            content = b"".join(chunks)
            chunks.clear()  # one copy of the bytes at a time
            response.files.append(
                execution_pb2.File(
                    path=path, content=content, size=len(content), mime_type=guess_mime_type(path)
                )
            )

    def response(self) -> sandbox_pb2.ExecuteCodeResponse:
        self._response.stdout = "".join(self._stdout)
        self._response.stderr = "".join(self._stderr)
        return self._response
