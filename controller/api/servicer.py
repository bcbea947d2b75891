"""The public gRPC service, petri.v1.SandboxService: validation and wire-format translation.

The logic lives in :class:`controller.sandboxes.manager.SandboxManager`; this layer turns
requests into its calls and its errors into status codes (through :mod:`controller.errors`, in
one decorator).
"""

import asyncio
import contextlib
import functools
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import empty_pb2

from controller.api import convert
from controller.api.auth import ANYONE, Principal, TokenTable, current_caller
from controller.api.file_inputs import (
    check_files,
    check_input_path,
    checked_chunks,
    file_chunks,
)
from controller.api.list_filter import parse_filter
from controller.api.page_tokens import decode_token, encode_token, request_digest
from controller.errors import (
    Cancelled,
    InvalidArgument,
    OutcomeUnknown,
    PetriError,
    ResourceExhausted,
    status_details,
)
from controller.listing import ListQuery, SortKey, position_of
from controller.names import parse_parent, parse_sandbox_name
from controller.quoting import quote
from controller.sandboxes.manager import CreateParams, ImageProfile, SandboxManager, UpdateParams
from controller.sandboxes.results import EventFilter, OutputLimits, ResponseCollector
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc

log = structlog.get_logger()

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
_SORT_KEYS = {key.value: key for key in SortKey}  # order_by's field names
_UPDATABLE = ("display_name", "labels", "expire_time", "ttl", "auto_pause_after")
MAX_REQUEST_ID = 128
# ListFiles pages (files.proto); a page token is the executor's, at most a path's size.
MAX_FILES_PAGE_SIZE = 10_000
MAX_FILES_PAGE_TOKEN = 32 * 1024
# The initial metadata of a WriteFile or StreamExecuteCode that the node takes: it holds the
# sandbox, has its turn, and reads on past the first message. Until then it may still refuse
# the call as held by another node (SANDBOX_ON_ANOTHER_NODE, having done nothing): a gateway
# writes the second message only once this came (controller.gateway.forward), so that it still
# has the first to send the call again. Not empty: a call refused at once has empty initial
# metadata too.
TAKEN = ("petri-taken", "1")

Request = TypeVar("Request")
Response = TypeVar("Response")
Context = grpc.aio.ServicerContext[Any, Any]


def _maps_errors(
    method: Callable[[Any, Request, Context], Awaitable[Response]],
) -> Callable[[Any, Request, Context], Awaitable[Response]]:
    """Turns PetriError into its status code and rich error details, anything else into
    INTERNAL without details."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except PetriError as exc:
            await context.abort(exc.status, str(exc), status_details(exc))
        except Exception:
            await context.abort(grpc.StatusCode.INTERNAL, _log_internal(method.__name__))
        raise AssertionError("unreachable: abort raises")

    return wrapper


def _maps_stream_errors(
    method: Callable[[Any, Request, Context], AsyncIterator[Response]],
) -> Callable[[Any, Request, Context], AsyncIterator[Response]]:
    """_maps_errors for server-streaming methods: errors may come after some responses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Request, context: Context) -> AsyncIterator[Response]:
        try:
            async for response in method(self, request, context):
                yield response
        except PetriError as exc:
            await context.abort(exc.status, str(exc), status_details(exc))
        except Exception:
            await context.abort(grpc.StatusCode.INTERNAL, _log_internal(method.__name__))

    return wrapper


def _log_internal(method_name: str) -> str:
    reference = secrets.token_hex(4)
    log.exception("internal error", method=method_name, reference=reference)
    return f"internal error (reference {reference}); the controller's log has the details"


def _parse_order_by(order_by: str) -> tuple[SortKey, bool]:
    words = order_by.split(maxsplit=2)  # a third word is already one too many
    if not words:
        return SortKey.CREATE_TIME, False
    field = words[0]
    descending = len(words) == 2 and words[1] == "desc"
    if field not in _SORT_KEYS or len(words) > 2 or (len(words) == 2 and not descending):
        raise InvalidArgument(
            f"invalid order_by {quote(order_by)}: use one of {', '.join(_SORT_KEYS)}, "
            "optionally followed by ' desc'"
        )
    return _SORT_KEYS[field], descending


class SandboxService(sandbox_pb2_grpc.SandboxServiceServicer):
    def __init__(
        self,
        manager: SandboxManager,
        limits: OutputLimits,
        max_input_bytes: int,
        tokens: TokenTable | None,
    ) -> None:
        self._manager = manager
        self._limits = limits
        self._max_input_bytes = max_input_bytes
        self._tokens = tokens

    def _caller(self, context: Context) -> Principal:
        """Who calls: the interceptor authenticated the call before reading its request (else
        UNAUTHENTICATED without a known token, when authentication is on)."""
        principal = current_caller()
        if principal is not None:
            return principal
        if self._tokens is None:
            return ANYONE
        return self._tokens.authenticate(context.invocation_metadata() or ())

    @_maps_errors
    async def CreateSandbox(
        self, request: sandbox_pb2.CreateSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        project = parse_parent(request.parent)
        self._caller(context).check_project(project)
        if len(request.request_id) > MAX_REQUEST_ID:
            raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters")
        sandbox = request.sandbox
        if sandbox.spec.language not in (
            sandbox_pb2.SandboxSpec.LANGUAGE_UNSPECIFIED,
            sandbox_pb2.SandboxSpec.PYTHON,
        ):
            raise InvalidArgument("spec.language: only PYTHON is supported")
        expire_time, ttl = convert.expiration_from_proto(sandbox)
        record = await self._manager.create(
            CreateParams(
                project=project,
                sandbox_id=request.sandbox_id,
                display_name=sandbox.display_name,
                labels=dict(sandbox.labels),
                image_profile=sandbox.spec.image_profile,
                runtime=convert.runtime_from_proto(sandbox.spec.runtime),
                resources=convert.resources_from_proto(sandbox.spec.resources),
                expire_time=expire_time,
                ttl=ttl,
                request_id=request.request_id,
                auto_pause_after=convert.auto_pause_after_from_proto(sandbox),
                deadline=_deadline_of(context),
            )
        )
        return convert.sandbox_to_proto(record)

    @_maps_errors
    async def GetSandbox(
        self, request: sandbox_pb2.GetSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        record = await self._manager.get(name)
        return convert.sandbox_to_proto(record)

    @_maps_errors
    async def ListSandboxes(
        self, request: sandbox_pb2.ListSandboxesRequest, context: Context
    ) -> sandbox_pb2.ListSandboxesResponse:
        project = parse_parent(request.parent)
        self._caller(context).check_project(project)
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative (got {request.page_size})")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        sort_key, descending = _parse_order_by(request.order_by)
        conditions = parse_filter(request.filter)
        digest = request_digest(request.parent, request.filter, request.order_by)
        after = decode_token(request.page_token, digest) if request.page_token else None
        records = await self._manager.list_page(
            ListQuery(
                project=project,
                conditions=conditions,
                sort_key=sort_key,
                descending=descending,
                limit=page_size + 1,
                after=after,
            )
        )
        response = sandbox_pb2.ListSandboxesResponse(
            sandboxes=[convert.sandbox_to_proto(r) for r in records[:page_size]]
        )
        if len(records) > page_size:
            last = records[page_size - 1]
            response.next_page_token = encode_token(digest, position_of(last, sort_key))
        return response

    @_maps_errors
    async def UpdateSandbox(
        self, request: sandbox_pb2.UpdateSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        sandbox = request.sandbox
        name = parse_sandbox_name(sandbox.name)
        self._caller(context).check_project(name.project)
        paths = list(request.update_mask.paths)
        unknown = [p for p in paths if p not in (*_UPDATABLE, "*")]
        if unknown:
            raise InvalidArgument(
                f"update_mask: cannot update {', '.join(quote(p) for p in unknown[:5])}"
                f"{', ...' if len(unknown) > 5 else ''}; updatable fields are "
                f"{', '.join(_UPDATABLE)}"
            )
        everything = "*" in paths
        expiration = sandbox.WhichOneof("expiration")
        if not paths:  # AIP-134: an absent mask updates the fields that are set
            paths = [p for p in ("display_name", "labels") if _is_set(sandbox, p)]
            if sandbox.HasField("auto_pause_after"):
                paths.append("auto_pause_after")
            if expiration:
                paths.append(expiration)
        for path in ("ttl", "expire_time"):
            if path in paths and expiration != path:
                raise InvalidArgument(
                    f"update_mask names {path} but the sandbox sets "
                    f"{expiration or 'neither ttl nor expire_time'}"
                )
        expire_time, ttl = convert.expiration_from_proto(sandbox)
        params = UpdateParams(
            display_name=sandbox.display_name if everything or "display_name" in paths else None,
            labels=dict(sandbox.labels) if everything or "labels" in paths else None,
            expire_time=expire_time if everything or "expire_time" in paths else None,
            ttl=ttl if everything or "ttl" in paths else None,
            auto_pause_after=self._auto_pause_update(
                sandbox, everything or "auto_pause_after" in paths
            ),
        )
        record = await self._manager.update(name, params)
        return convert.sandbox_to_proto(record)

    def _auto_pause_update(self, sandbox: sandbox_pb2.Sandbox, updated: bool) -> timedelta | None:
        """The new auto_pause_after, None to keep it; named in the mask but unset, it goes back
        to the server's default."""
        if not updated:
            return None
        requested = convert.auto_pause_after_from_proto(sandbox)
        return self._manager.auto_pause_after(requested)

    @_maps_errors
    async def DeleteSandbox(
        self, request: sandbox_pb2.DeleteSandboxRequest, context: Context
    ) -> empty_pb2.Empty:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        await self._manager.delete(name, request.allow_missing)
        return empty_pb2.Empty()

    @_maps_errors
    async def PauseSandbox(
        self, request: sandbox_pb2.PauseSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        return convert.sandbox_to_proto(await self._manager.pause(name))

    @_maps_errors
    async def ResumeSandbox(
        self, request: sandbox_pb2.ResumeSandboxRequest, context: Context
    ) -> sandbox_pb2.Sandbox:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        return convert.sandbox_to_proto(await self._manager.resume(name))

    @_maps_errors
    async def ExecuteCode(
        self, request: sandbox_pb2.ExecuteCodeRequest, context: Context
    ) -> sandbox_pb2.ExecuteCodeResponse:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        timeout = _timeout_of(request)
        check_files(request.files, self._max_input_bytes)
        inputs = file_chunks(request.files) if request.files else None
        collector = ResponseCollector(self._limits)
        async with contextlib.aclosing(
            self._manager.execute(name, request.code, timeout, inputs)
        ) as events:
            async for event in events:
                collector.add(event)
        if not collector.finished:
            raise OutcomeUnknown(
                "the executor ended the execution without a result: the code may have run; "
                "check the sandbox before running it again"
            )
        return collector.response()

    @_maps_errors
    async def ListImageProfiles(
        self, request: sandbox_pb2.ListImageProfilesRequest, context: Context
    ) -> sandbox_pb2.ListImageProfilesResponse:
        self._caller(context)  # any known caller may see what the images carry
        profiles = await self._manager.image_profiles()
        return sandbox_pb2.ListImageProfilesResponse(
            image_profiles=[_image_profile_to_proto(p) for p in profiles]
        )

    @_maps_stream_errors
    async def StreamExecuteCode(
        self,
        request_iterator: AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest],
        context: Context,
    ) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeResponse]:
        first = await anext(request_iterator, None)
        if first is None or not first.HasField("start"):
            raise InvalidArgument(
                "the first message of StreamExecuteCode must be `start` (name, code, timeout)"
            )
        start = first.start
        name = parse_sandbox_name(start.name)
        self._caller(context).check_project(name.project)
        inputs = checked_chunks(_input_chunks(request_iterator, context), self._max_input_bytes)
        event_filter = EventFilter(self._limits)
        async with contextlib.aclosing(
            self._manager.execute(name, start.code, _timeout_of(start), inputs)
        ) as events:
            async for event in events:
                for out in event_filter.convert(event):
                    yield out
        if not event_filter.finished:
            raise OutcomeUnknown(
                "the executor ended the execution without a result: the code may have run; "
                "check the sandbox before running it again"
            )

    # --- files outside executions ----------------------------------------------------------

    @_maps_errors
    async def ListFiles(
        self, request: files_pb2.ListFilesRequest, context: Context
    ) -> files_pb2.ListFilesResponse:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        if request.path:  # empty: /workspace itself
            check_input_path(request.path)
        if not 0 <= request.page_size <= MAX_FILES_PAGE_SIZE:
            raise InvalidArgument(
                f"page_size must be 0 (the default, 1000) to {MAX_FILES_PAGE_SIZE}, not "
                f"{request.page_size}"
            )
        if len(request.page_token) > MAX_FILES_PAGE_TOKEN:
            raise InvalidArgument("page_token is not one a ListFiles call returned")
        return await self._manager.list_files(
            name,
            files_pb2.ListFilesRequest(
                path=request.path,
                recursive=request.recursive,
                page_size=request.page_size,
                page_token=request.page_token,
            ),
        )

    # Written with context.write: each chunk goes on as it comes (the file is never held
    # here), and a caller that stops taking them is waited for no longer than a timeout.
    @_maps_errors
    async def ReadFile(  # type: ignore[override]
        self, request: files_pb2.ReadFileRequest, context: Context
    ) -> None:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        check_input_path(request.path)
        await self._manager.read_file(name, request.path, context.write)

    @_maps_errors
    async def WriteFile(
        self, request_iterator: AsyncIterator[files_pb2.WriteFileRequest], context: Context
    ) -> files_pb2.FileInfo:
        first = await anext(request_iterator, None)
        if first is None or not first.name or not first.HasField("chunk"):
            raise InvalidArgument(
                "the first message of WriteFile must carry `name` and the file's first chunk"
            )
        name = parse_sandbox_name(first.name)
        self._caller(context).check_project(name.project)
        path = first.chunk.path
        check_input_path(path)
        chunks = _write_chunks(first, request_iterator, self._max_input_bytes, context)
        return await self._manager.write_file(name, path, chunks)

    @_maps_errors
    async def DeleteFile(
        self, request: files_pb2.DeleteFileRequest, context: Context
    ) -> empty_pb2.Empty:
        name = parse_sandbox_name(request.name)
        self._caller(context).check_project(name.project)
        check_input_path(request.path)
        await self._manager.delete_file(
            name,
            files_pb2.DeleteFileRequest(
                path=request.path,
                recursive=request.recursive,
                allow_missing=request.allow_missing,
            ),
        )
        return empty_pb2.Empty()


async def _write_chunks(
    first: files_pb2.WriteFileRequest,
    requests: AsyncIterator[files_pb2.WriteFileRequest],
    max_bytes: int,
    context: Context,
) -> AsyncIterator[execution_pb2.FileChunk]:
    """A WriteFile call's chunks, checked as they come (one path, at most `max_bytes`, a
    final chunk, then a half-close, before the final chunk goes on): a violation raised here
    cancels the executor's call, which then writes nothing. The manager takes them once it
    holds the sandbox and has its turn: the call is taken (TAKEN) then."""
    await context.send_initial_metadata((TAKEN,))
    path = first.chunk.path
    total = 0
    message: files_pb2.WriteFileRequest | None = first
    while message is not None:
        if not message.HasField("chunk"):
            raise InvalidArgument("every message of WriteFile carries a chunk")
        chunk = message.chunk
        if chunk.path != path:
            raise InvalidArgument(
                f"every chunk of a WriteFile call has the first one's path {quote(path)}, not "
                f"{quote(chunk.path)}; nothing was written"
            )
        total += len(chunk.data)
        if total > max_bytes:
            raise ResourceExhausted(
                f"the file exceeds this server's limit of {max_bytes} bytes; nothing was written"
            )
        if chunk.final:
            # The executor puts the file in place on its final chunk: it goes only once the
            # caller is known to have half-closed (not cancelled) after it.
            if await anext(requests, None) is not None:
                raise InvalidArgument(
                    "nothing may follow the chunk marked final; nothing was written"
                )
            await _check_half_closed(context)
        yield execution_pb2.FileChunk(path=path, data=chunk.data, final=chunk.final)
        if chunk.final:
            return
        message = await anext(requests, None)
    await _check_half_closed(context)
    raise InvalidArgument(
        f"the chunks of {quote(path)} ended without one marked final; nothing was written"
    )


# grpc.aio ends a request stream alike for a half-close and for a call the client cancelled
# or let pass its deadline; the cancellation reaches the handler a moment later (measured: a
# tenth of a millisecond). Input files are put in place only after a half-close, so an upload
# waits this long before it counts as complete.
HALF_CLOSE_SETTLE_SECONDS = 0.02


async def _input_chunks(
    requests: AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest], context: Context
) -> AsyncIterator[execution_pb2.FileChunk]:
    """A StreamExecuteCode call's input chunks. The manager takes them once it holds the
    sandbox and has its turn (even when there is none): the call is taken (TAKEN) then."""
    await context.send_initial_metadata((TAKEN,))
    sent_any = False
    async for message in requests:
        if not message.HasField("input_chunk"):
            raise InvalidArgument(
                "after `start`, StreamExecuteCode takes only input_chunk messages"
            )
        sent_any = True
        yield message.input_chunk
    if sent_any:  # without files there is nothing to put in place, and a cancel interrupts
        await _check_half_closed(context)


async def _check_half_closed(context: Context) -> None:
    """Cancelled (or the call's cancellation itself) unless the client really half-closed."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 0:
        await asyncio.sleep(HALF_CLOSE_SETTLE_SECONDS)
        remaining = context.time_remaining()
    if context.cancelled() or context.done() or (remaining is not None and remaining <= 0):
        raise Cancelled(
            "the request stream ended with the call cancelled or past its deadline, not "
            "half-closed: no input file was written and nothing ran"
        )


def _deadline_of(context: Context) -> float | None:
    """The call's deadline on the event loop's clock; None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else asyncio.get_running_loop().time() + remaining


def _timeout_of(
    request: sandbox_pb2.ExecuteCodeRequest | sandbox_pb2.ExecuteCodeStart,
) -> timedelta | None:
    if not request.HasField("timeout"):
        return None
    return convert.to_timedelta(request.timeout, "timeout")


def _image_profile_to_proto(profile: ImageProfile) -> sandbox_pb2.ImageProfile:
    return sandbox_pb2.ImageProfile(
        name=f"imageProfiles/{profile.profile}",
        python_version=profile.python_version,
        os=profile.os,
        packages=profile.packages,
        size_bytes=profile.size_bytes,
        create_time=convert.timestamp(profile.create_time),
        is_default=profile.is_default,
    )


def _is_set(sandbox: sandbox_pb2.Sandbox, field: str) -> bool:
    if field == "labels":
        return bool(sandbox.labels)
    return bool(getattr(sandbox, field))
