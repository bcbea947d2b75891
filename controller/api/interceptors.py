"""The gRPC server's interceptor: who calls is decided before any request message is read, and
the request data read or held at once is bounded, server-wide and per caller.

grpc.aio calls `intercept_service` when a call's headers arrive, before its request is read. A
unary handler would have gRPC read the whole request (up to the receive limit) before any code
of ours saw it, so every handler is swapped for a request-streaming one, the same on the wire,
that reads the request itself, and only when the caller may send it:

- Without a valid token (authentication on) the request is never read: the call is answered
  UNAUTHENTICATED, and what the client sent stays within HTTP/2 flow control and is dropped.
  The methods in `open_methods` (health's Check) are answered without reading it either.
- With one, each request message is read in a turn (so many at once, server-wide and per
  caller; waiting for one holds nothing), then its size counts against the caller's and the
  server's request bytes in flight until the handler is done with it: the end of a unary call,
  or the next read of a stream. Over either limit the call is refused RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import inspect
import traceback
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError

from controller.api.auth import ANYONE, Principal, TokenTable, set_current_caller
from controller.errors import InvalidArgument, PetriError, ResourceExhausted, Unauthenticated

Context = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # generic in the stubs only
OpenAnswer = Callable[[Context], Awaitable[Any]]
# The method's counter of request messages read (controller.api.grpc_metrics), if any.
RequestCounter = Callable[[str], Callable[[], None] | None]
# What grpc.aio calls: (request or request iterator, context) -> awaitable or async iterator;
# the stubs type handlers as synchronous, hence Any.
Behaviour = Callable[[Any, Context], Any]

MiB = 1 << 20
# The caller of an internal method: no project's (a token of its own is checked by the method).
A_NODE = Principal("a petri node", frozenset())
# Freeing a request at least this big gives memory back to the OS (see _trim_memory), as
# does refusing a request unread (the transport buffered some of it); at most once a second.
TRIM_AFTER_BYTES = 1 * MiB
TRIM_DELAY_SECONDS = 1.0
# How many (method, caller) handlers RequestGuard keeps made.
MAX_GUARDED_HANDLERS = 4096


@dataclass(frozen=True)
class BudgetLimits:
    receives: int
    receives_per_caller: int
    bytes_in_flight: int
    bytes_in_flight_per_caller: int


def _mib(size: int) -> str:
    return f"{size / MiB:.1f} MiB"


class RequestBudget:
    """How much request data callers may have the controller read or hold at once."""

    def __init__(self, limits: BudgetLimits) -> None:
        self.limits = limits
        self._receives = asyncio.Semaphore(limits.receives)
        # One per principal: as many as the tokens file has entries.
        self._caller_receives: dict[str, asyncio.Semaphore] = {}
        self._held = 0
        self._caller_held: Counter[str] = Counter()
        self._trim_scheduled = False
        self._trimmer: asyncio.Task[None] | None = None  # referenced, so that it runs to its end

    def __repr__(self) -> str:
        return f"<RequestBudget held={self._held} callers={len(self._caller_held)}>"

    @property
    def held(self) -> int:
        return self._held

    def turns_to_read(self, caller: str) -> tuple[asyncio.Semaphore, asyncio.Semaphore]:
        """The caller's and the server's turns to read one request message (whose size is
        unknown until read): a read holds one of each."""
        mine = self._caller_receives.get(caller)
        if mine is None:
            mine = self._caller_receives[caller] = asyncio.Semaphore(
                self.limits.receives_per_caller
            )
        return mine, self._receives

    def hold(self, caller: str, size: int) -> None:
        """Counts a request just read; ResourceExhausted if it would exceed a limit."""
        limits = self.limits
        refusal = None
        if self._caller_held[caller] + size > limits.bytes_in_flight_per_caller:
            refusal = (
                f"too much request data in flight for {caller}: its calls in progress hold "
                f"{_mib(self._caller_held[caller])} and this request is {_mib(size)}, over the "
                f"limit of {_mib(limits.bytes_in_flight_per_caller)} per caller "
                "(max_request_bytes_in_flight_per_caller). Nothing ran: retrying once other "
                "calls have finished is safe"
            )
        elif self._held + size > limits.bytes_in_flight:
            refusal = (
                f"too much request data in flight: calls in progress hold {_mib(self._held)} "
                f"and this request is {_mib(size)}, over the server's limit of "
                f"{_mib(limits.bytes_in_flight)} (max_request_bytes_in_flight). Nothing ran: "
                "retrying later is safe"
            )
        if refusal is not None:
            self._let_go(size)
            raise ResourceExhausted(refusal)
        self._held += size
        self._caller_held[caller] += size

    def release(self, caller: str, size: int) -> None:
        if not size:
            return
        self._held -= size
        self._caller_held[caller] -= size
        if not self._caller_held[caller]:
            del self._caller_held[caller]
        self._let_go(size)

    def _let_go(self, size: int) -> None:
        """A request is being freed: after a big one, hand the memory back to the OS."""
        if size >= TRIM_AFTER_BYTES:
            self.trim_soon()

    def trim_soon(self) -> None:
        """Hands freed memory back to the OS in a second, once for all the calls meanwhile."""
        if not self._trim_scheduled:
            self._trim_scheduled = True
            asyncio.get_running_loop().call_later(TRIM_DELAY_SECONDS, self._start_trim)

    def _start_trim(self) -> None:
        self._trim_scheduled = False  # what is freed from now on wants another trim
        self._trimmer = asyncio.get_running_loop().create_task(asyncio.to_thread(_trim_memory))


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)  # glibc only
    return trim


_MALLOC_TRIM = _load_trim()


def _trim_memory() -> None:
    """Hands freed heap pages back to the OS: glibc keeps what gRPC's threads freed in their
    arenas, so a burst of big requests would otherwise stay in the RSS."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class RequestGuard(grpc.aio.ServerInterceptor):
    """Authenticates each call before its request is read; reads requests within the budget."""

    def __init__(
        self,
        tokens: TokenTable | None,
        budget: RequestBudget,
        open_methods: Mapping[str, OpenAnswer],
        count_requests: RequestCounter | None = None,
        internal_methods: frozenset[str] = frozenset(),
    ) -> None:
        """`internal_methods` (nodes calling nodes) authenticate their callers themselves
        (controller.api.node_transfer): they are read, within the budget, as a caller with
        no project."""
        self._tokens = tokens
        self._budget = budget
        self._open_methods = dict(open_methods)
        self._count_requests = count_requests
        self._internal_methods = internal_methods
        # The handler of each method for each caller, made once (it keeps nothing of a call).
        self._guarded: dict[tuple[Handler, Principal], Handler] = {}

    def __repr__(self) -> str:
        return f"<RequestGuard tokens={self._tokens!r} {self._budget!r}>"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return None
        if handler_call_details.method in self._internal_methods:
            caller = A_NODE
        elif self._tokens is None:
            caller = ANYONE
        else:
            try:
                caller = self._tokens.authenticate(handler_call_details.invocation_metadata or ())
            except Unauthenticated as exc:
                answer = self._open_methods.get(handler_call_details.method) or _refusal(exc)
                return _unread(handler, answer, self._budget)
        guarded = self._guarded.get((handler, caller))
        if guarded is None:
            if len(self._guarded) >= MAX_GUARDED_HANDLERS:  # tokens reloaded many times over
                self._guarded.clear()
            method = handler_call_details.method
            counted = None if self._count_requests is None else self._count_requests(method)
            guarded = _guarded(handler, caller, self._budget, counted)
            self._guarded[(handler, caller)] = guarded
        return guarded


def _refusal(error: PetriError) -> OpenAnswer:
    async def refuse(context: Context) -> None:
        await context.abort(error.status, str(error))

    return refuse


def _request_streaming(handler: Handler, behaviour: Callable[..., Any]) -> Handler:
    """A handler that reads the request itself (raw bytes), answering as `handler` does."""
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            behaviour, response_serializer=handler.response_serializer
        )
    return grpc.stream_unary_rpc_method_handler(
        behaviour, response_serializer=handler.response_serializer
    )


def _unread(handler: Handler, answer: OpenAnswer, budget: RequestBudget) -> Handler:
    """Answers the call without reading its request."""

    async def unread(requests: AsyncIterator[bytes], context: Context) -> Any:
        try:
            return await answer(context)
        finally:
            budget.trim_soon()

    return _request_streaming(handler, unread)


class _Reader:
    """Reads one call's request messages within the budget and parses them."""

    def __init__(
        self,
        caller: str,
        budget: RequestBudget,
        handler: Handler,
        counted: Callable[[], None] | None = None,
    ) -> None:
        self._caller = caller
        self._budget = budget
        self._counted = counted
        self._parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)

    def _parsed(self, raw: bytes) -> Any:
        try:
            return self._parse(raw)
        except DecodeError as exc:
            raise InvalidArgument("the request message does not parse as its type") from exc

    async def _read(self, context: Context) -> bytes | None:
        # context.read(), not the request iterator: a suspended iterator would keep the last
        # message it yielded alive, past the call.
        mine, everyone = self._budget.turns_to_read(self._caller)
        async with mine, everyone:
            message = await context.read()
        if message is grpc.aio.EOF:
            return None
        if self._counted is not None:
            self._counted()
        return cast(bytes, message)

    async def take(self, context: Context) -> tuple[Any, int]:
        """A unary call's request and its size, counted: `release` it when the call ends."""
        raw = await self._read(context)
        if raw is None:  # gRPC refused it (too big), or the caller went away
            self._budget.trim_soon()
            raise InvalidArgument("the call carried no request message")
        size = len(raw)
        self._budget.hold(self._caller, size)
        try:
            return self._parsed(raw), size
        except BaseException:
            self.release(size)
            raise

    def release(self, size: int) -> None:
        self._budget.release(self._caller, size)

    @contextlib.asynccontextmanager
    async def one(self, context: Context) -> AsyncIterator[Any]:
        """A unary call's request, counted until the call ends."""
        request, size = await self.take(context)
        try:
            yield request
        finally:
            self.release(size)

    async def stream(self, context: Context) -> AsyncGenerator[Any, None]:
        """A stream's messages, each counted until the next is asked for."""
        held = 0
        try:
            while True:
                self._budget.release(self._caller, held)
                held = 0
                raw = await self._read(context)
                if raw is None:
                    return
                self._budget.hold(self._caller, len(raw))
                held = len(raw)
                message = self._parsed(raw)
                del raw
                yield message
        finally:
            self._budget.release(self._caller, held)

    @contextlib.asynccontextmanager
    async def argument(self, context: Context, streaming: bool) -> AsyncIterator[Any]:
        """What the handler takes: the request, or an iterator of them (closed at the end)."""
        if not streaming:
            async with self.one(context) as request:
                yield request
            return
        async with contextlib.aclosing(self.stream(context)) as messages:
            yield messages


def _behaviour_of(handler: Handler) -> Behaviour:
    behaviour = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    assert behaviour is not None, "a method handler has one behaviour"
    return cast(Behaviour, behaviour)


def _forget_frames(error: BaseException) -> None:
    """Clears the locals of the finished frames an error (and those it chains) passed through:
    gRPC keeps an aborted call's error past the call, and with it whatever those frames held,
    such as the request."""
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # skips frames still running
        pending += (current.__context__, current.__cause__)


async def _answer(reader: _Reader, inner: Behaviour, streaming: bool, context: Context) -> Any:
    if streaming:
        async with contextlib.aclosing(reader.stream(context)) as messages:
            return await inner(messages, context)
    # Not reader.one: a unary call is most calls, and this is its every step.
    request, size = await reader.take(context)
    try:
        return await inner(request, context)
    finally:
        reader.release(size)


def _guarded(
    handler: Handler,
    caller: Principal,
    budget: RequestBudget,
    counted: Callable[[], None] | None = None,
) -> Handler:
    reader = _Reader(caller.name, budget, handler, counted)
    streaming = handler.request_streaming
    inner = _behaviour_of(handler)
    if handler.response_streaming:

        async def stream_out(requests: AsyncIterator[bytes], context: Context) -> Any:
            set_current_caller(caller)
            try:
                async with reader.argument(context, streaming) as argument:
                    responses = inner(argument, context)
                    del argument  # this frame outlives the call in an error's traceback
                    if inspect.isawaitable(responses):  # it writes with context.write
                        await responses
                    else:
                        async for response in responses:
                            yield response
                            del response
            except PetriError as exc:
                refusal = (exc.status, str(exc))
                _forget_frames(exc)
            except BaseException as exc:
                _forget_frames(exc)
                raise
            else:
                return
            # Out of the except block, so that the abort does not chain the error.
            await context.abort(*refusal)

        return _request_streaming(handler, stream_out)

    async def unary_out(requests: AsyncIterator[bytes], context: Context) -> Any:
        set_current_caller(caller)
        try:
            return await _answer(reader, inner, streaming, context)
        except PetriError as exc:
            refusal = (exc.status, str(exc))
            _forget_frames(exc)
        except BaseException as exc:
            _forget_frames(exc)
            raise
        # Out of the except block, so that the abort does not chain the error.
        await context.abort(*refusal)

    return _request_streaming(handler, unary_out)
