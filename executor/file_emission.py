"""The files an execution created or changed, streamed back as chunks within the request's
limits; those that do not fit or cannot be read are returned as omitted instead."""

from collections.abc import Awaitable, Callable
from pathlib import Path

from executor import workspace
from petri.paths import InvalidPath
from petri.v1 import execution_pb2, executor_pb2

Emit = Callable[[executor_pb2.ExecuteEvent], Awaitable[None]]


async def send_changed_files(
    root: Path,
    changes: list[workspace.ChangedFile],
    request: executor_pb2.ExecuteRequest,
    emit: Emit,
) -> list[execution_pb2.OmittedFile]:
    """Streams the changed files that fit the request's limits; returns the others."""
    omitted = []
    total = count = 0
    for change in changes:
        reason = change.problem or _over_limits(change.size, request, total, count)
        if reason:
            omitted.append(
                execution_pb2.OmittedFile(path=change.path, size=change.size, reason=reason)
            )
            continue
        problem = await _send_file(root, change, emit)
        if problem:  # changed under us (a background process)
            omitted.append(
                execution_pb2.OmittedFile(path=change.path, size=change.size, reason=problem)
            )
            continue
        total += change.size
        count += 1
    return omitted


async def _send_file(root: Path, change: workspace.ChangedFile, emit: Emit) -> str:
    """Streams one file; when it cannot be read (to its end), says why: a file begun ends
    with an empty final chunk, so the stream stays well formed."""
    # Look one chunk ahead so the last one carries `final`.
    pending: bytes | None = None
    first = True
    try:
        for data in workspace.read_chunks(root, change.path, change.size):
            if pending is not None:
                await emit(_file_event(change, pending, first=first, final=False))
                first = False
            pending = data
    except (OSError, InvalidPath) as exc:
        if not first:
            await emit(_file_event(change, b"", first=False, final=True))
        return f"could not be read{'' if first else ' to its end'}: {_why(exc)}"
    await emit(_file_event(change, pending or b"", first=first, final=True))
    return ""


def _over_limits(size: int, request: executor_pb2.ExecuteRequest, total: int, count: int) -> str:
    """Why a file of `size` cannot join `count` files of `total` bytes in the response, if so."""
    if request.max_output_files and count >= request.max_output_files:
        return f"more than {request.max_output_files} files were created or changed"
    if total + size > request.max_output_file_bytes:
        return (
            f"the files returned with it would exceed {request.max_output_file_bytes} "
            "bytes, the limit per response"
        )
    return ""


def _why(exc: OSError | InvalidPath) -> str:
    """The error without the path it may quote (the caller has the path already)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)[:200]


def _file_event(
    change: workspace.ChangedFile, data: bytes, first: bool, final: bool
) -> executor_pb2.ExecuteEvent:
    chunk = execution_pb2.FileChunk(path=change.path, data=data, final=final)
    if first:
        chunk.size = change.size
    return executor_pb2.ExecuteEvent(file_chunk=chunk)
