"""The requests the SDK sends, built once for the blocking and the asyncio sandboxes."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta

from google.protobuf import duration_pb2, field_mask_pb2

from petri.sdk.connection import RUN_MARGIN
from petri.sdk.inputs import CHUNK_SIZE, FileSource, file_chunks, files_chunks
from petri.sdk.resources import Resources
from petri.v1 import files_pb2, sandbox_pb2

Seconds = float | int | timedelta
ProgressCallback = Callable[[int], object]

_RUNTIMES = {
    "runc": sandbox_pb2.SandboxSpec.RUNC,
    "gvisor": sandbox_pb2.SandboxSpec.GVISOR,
}


def sandbox_name(project: str, name_or_id: str) -> str:
    """The full name for an id (in ``project``), or the full name itself."""
    if "/" in name_or_id:
        return name_or_id
    return f"projects/{project}/sandboxes/{name_or_id}"


def duration(value: Seconds) -> duration_pb2.Duration:
    proto = duration_pb2.Duration()
    proto.FromTimedelta(value if isinstance(value, timedelta) else timedelta(seconds=finite(value)))
    return proto


def finite(value: float | int) -> float:
    """`value` in seconds; ValueError for NaN or infinity, which no duration can hold."""
    if not math.isfinite(value):
        raise ValueError(f"a duration must be a finite number of seconds, not {value!r}")
    return float(value)


def seconds(value: Seconds | None) -> float | None:
    if value is None:
        return None
    return value.total_seconds() if isinstance(value, timedelta) else finite(value)


def create_request(
    project: str,
    *,
    profile: str | None = None,
    runtime: str | None = None,
    ttl: Seconds | None = None,
    labels: Mapping[str, str] | None = None,
    resources: Resources | None = None,
    sandbox_id: str | None = None,
    display_name: str | None = None,
    auto_pause_after: Seconds | None = None,
) -> sandbox_pb2.CreateSandboxRequest:
    """A CreateSandboxRequest with a fresh request_id (keep it for retries)."""
    spec = sandbox_pb2.SandboxSpec(image_profile=profile or "")
    if runtime is not None:
        if runtime not in _RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(_RUNTIMES)} or None")
        spec.runtime = _RUNTIMES[runtime]
    if resources is not None:
        spec.resources.CopyFrom(resources.to_proto())
    sandbox = sandbox_pb2.Sandbox(
        display_name=display_name or "", labels=dict(labels or {}), spec=spec
    )
    if ttl is not None:
        sandbox.ttl.CopyFrom(duration(ttl))
    if auto_pause_after is not None:
        sandbox.auto_pause_after.CopyFrom(duration(auto_pause_after))
    return sandbox_pb2.CreateSandboxRequest(
        parent=f"projects/{project}",
        sandbox_id=sandbox_id or "",
        sandbox=sandbox,
        request_id=str(uuid.uuid4()),
    )


def update_request(
    name: str,
    *,
    labels: Mapping[str, str] | None = None,
    ttl: Seconds | None = None,
    display_name: str | None = None,
    auto_pause_after: Seconds | None = None,
) -> sandbox_pb2.UpdateSandboxRequest:
    """An UpdateSandboxRequest that changes exactly the fields given (labels replace all)."""
    sandbox = sandbox_pb2.Sandbox(name=name)
    paths: list[str] = []
    if labels is not None:
        sandbox.labels.update(labels)
        paths.append("labels")
    if ttl is not None:
        sandbox.ttl.CopyFrom(duration(ttl))
        paths.append("ttl")
    if display_name is not None:
        sandbox.display_name = display_name
        paths.append("display_name")
    if auto_pause_after is not None:
        sandbox.auto_pause_after.CopyFrom(duration(auto_pause_after))
        paths.append("auto_pause_after")
    if not paths:
        raise ValueError("update needs at least one of labels, ttl, display_name, auto_pause_after")
    return sandbox_pb2.UpdateSandboxRequest(
        sandbox=sandbox, update_mask=field_mask_pb2.FieldMask(paths=paths)
    )


def run_requests(
    name: str,
    code: str,
    timeout: Seconds | None,
    files: Mapping[str, FileSource] | None,
) -> Iterator[sandbox_pb2.StreamExecuteCodeRequest]:
    """StreamExecuteCode's request stream: `start`, then the input files' chunks, read lazily."""
    start = sandbox_pb2.ExecuteCodeStart(name=name, code=code)
    if timeout is not None:
        start.timeout.CopyFrom(duration(timeout))
    yield sandbox_pb2.StreamExecuteCodeRequest(start=start)
    for chunk in files_chunks(files or {}):
        yield sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk)


def run_deadline(timeout: Seconds | None) -> float | None:
    """A run's gRPC deadline: its timeout plus a margin; none without a timeout (the server
    ends the code at its default timeout)."""
    value = seconds(timeout)
    return None if value is None else value + RUN_MARGIN


def write_requests(
    name: str,
    path: str,
    data: FileSource,
    on_progress: ProgressCallback | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> Iterator[files_pb2.WriteFileRequest]:
    """WriteFile's request stream; ``on_progress`` gets the bytes sent so far after each chunk."""
    sent = 0
    first = True
    for chunk in file_chunks(path, data, chunk_size):
        yield files_pb2.WriteFileRequest(name=name if first else "", chunk=chunk)
        first = False
        sent += len(chunk.data)
        if on_progress is not None:
            on_progress(sent)
