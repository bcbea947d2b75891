"""Input files on their way into a sandbox: checked here, before any byte reaches it.

Paths must be plain relative paths (petri.paths: at most 4084 bytes) of at most
MAX_PATH_DEPTH components and MAX_COMPONENT_BYTES bytes per component; each file's chunks
consecutive and ended by a chunk marked final, each path sent once and none inside another
(petri.paths.RequestPaths), and the total within the server's limit. A refused request
writes nothing: the executor stages inputs and only puts them in place once the whole request
was accepted.
"""

from collections.abc import AsyncIterator, Sequence

from controller.errors import InvalidArgument, ResourceExhausted
from controller.quoting import quote
from petri.paths import InvalidPath, PathConflict, RequestPaths, check_relative_path
from petri.v1 import execution_pb2

# Unary requests are cut into chunks of this size on their way to the executor.
CHUNK_BYTES = 1 << 20
# A file name's limit on Linux (NAME_MAX).
MAX_COMPONENT_BYTES = 255
# Directories an input file may be nested in, plus one for its name.
MAX_PATH_DEPTH = 64


def check_input_path(path: str) -> tuple[str, ...]:
    """The path's components; InvalidArgument, quoting a bounded prefix of the path, unless
    `path` is a plain relative path within every limit."""
    try:
        parts = check_relative_path(path)
    except InvalidPath as exc:  # its message quotes the whole path: quote a prefix instead
        raise InvalidArgument(str(exc).replace(repr(path), quote(path))) from None
    if len(parts) > MAX_PATH_DEPTH:
        raise InvalidArgument(
            f"file path {quote(path)} has {len(parts)} components, more than the maximum of "
            f"{MAX_PATH_DEPTH}"
        )
    for part in parts:
        size = len(part.encode())
        if size > MAX_COMPONENT_BYTES:
            raise InvalidArgument(
                f"file path {quote(path)} has a component of {size} bytes ({quote(part)}), "
                f"more than the maximum of {MAX_COMPONENT_BYTES}"
            )
    return parts


class InputChecker:
    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._total = 0
        self._paths = RequestPaths()
        self._open_path: str | None = None

    def check(self, chunk: execution_pb2.FileChunk) -> execution_pb2.FileChunk:
        """Returns the chunk as passed on (input-only fields only); raises on a violation."""
        if chunk.path != self._open_path:
            if self._open_path is not None:
                raise InvalidArgument(
                    f"file {quote(self._open_path)} ended without a chunk marked final "
                    f"before chunks of {quote(chunk.path)}"
                )
            parts = check_input_path(chunk.path)
            try:
                self._paths.add(chunk.path, parts)
            except PathConflict as conflict:
                raise InvalidArgument(_conflict_message(conflict)) from None
            self._open_path = chunk.path
        self.add_bytes(len(chunk.data))
        if chunk.final:
            self._open_path = None
        return execution_pb2.FileChunk(path=chunk.path, data=chunk.data, final=chunk.final)

    def add_bytes(self, size: int) -> None:
        self._total += size
        if self._total > self._max_bytes:
            raise ResourceExhausted(
                f"input files exceed this server's limit of {self._max_bytes} bytes per request; "
                "nothing was written: send fewer or smaller files"
            )

    def finish(self) -> None:
        if self._open_path is not None:
            raise InvalidArgument(
                f"file {quote(self._open_path)} ended without a chunk marked final"
            )


def _conflict_message(conflict: PathConflict) -> str:
    if conflict.path == conflict.other:
        return f"file {quote(conflict.path)} is sent twice"
    return (
        f"files {quote(conflict.other)} and {quote(conflict.path)} cannot both be written: the "
        "first would have to be a directory of the second; nothing was written"
    )


def check_files(files: Sequence[execution_pb2.File], max_bytes: int) -> None:
    """Checks whole files (paths, duplicates, total size) before anything is sent."""
    checker = InputChecker(max_bytes)
    checker.add_bytes(sum(len(f.content) for f in files))
    for file in files:  # paths only: the chunks carry no data, the total is counted above
        checker.check(execution_pb2.FileChunk(path=file.path, final=True))


async def file_chunks(
    files: Sequence[execution_pb2.File],
) -> AsyncIterator[execution_pb2.FileChunk]:
    """The chunks of checked files, cut as they are sent (not all at once)."""
    for file in files:
        content = file.content
        if not content:
            yield execution_pb2.FileChunk(path=file.path, final=True)
            continue
        for start in range(0, len(content), CHUNK_BYTES):
            end = start + CHUNK_BYTES
            yield execution_pb2.FileChunk(
                path=file.path, data=content[start:end], final=end >= len(content)
            )


async def checked_chunks(
    chunks: AsyncIterator[execution_pb2.FileChunk], max_bytes: int
) -> AsyncIterator[execution_pb2.FileChunk]:
    """Checks a stream of chunks as they come; raises at the first violation."""
    checker = InputChecker(max_bytes)
    async for chunk in chunks:
        yield checker.check(chunk)
    checker.finish()
