"""Forwarding: each SandboxService call goes, as the bytes it came in, to one petri node, and the
node's answer comes back as it left the node.

Requests and responses are never re-encoded: the handlers have no (de)serializers, the gateway
reads only the name (or parent) that routes a call (controller.gateway.wire), and streams are
pumped one message at a time, each write awaited, so that a big transfer moves at the pace of
the slower side and never sits here. The caller's deadline, cancellation and metadata go on to
the node; the node's initial metadata, status, details and trailing metadata (AIP-193 details in
grpc-status-details-bin) come back unchanged, but for a call whose node was lost mid-call
(killed, or frozen past node_keepalive's pings), which the gateway answers itself (_lost_answer).

Which node holds a sandbox is read from the registry, then remembered for a few seconds
(Locations) so that most calls make no round trip to the database: the node stays the authority,
refusing a sandbox it does not hold before doing anything, and such a call goes once more to the
node the registry names then. A client-streaming call (WriteFile, StreamExecuteCode) too: its
first message is written, and the next only once the node took the call, sending its initial
metadata (controller.api.servicer.TAKEN: it holds the sandbox and reads on), so that the gateway
still has the first message when a refusal comes, and never holds more than that one.
"""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import structlog
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError

from controller.api.auth import ANYONE, Principal, current_caller
from controller.api.interceptors import Context
from controller.errors import (
    ERROR_INFO_TYPE_URL,
    STATUS_DETAILS_KEY,
    InvalidArgument,
    OutcomeUnknown,
    PetriError,
    Unavailable,
    status_details,
)
from controller.gateway.directory import Directory, NodeInfo
from controller.gateway.wire import string_field
from controller.metrics import GatewayMetrics
from controller.names import parse_parent, parse_sandbox_name
from controller.records import Runtime
from petri.v1 import error_details_pb2, sandbox_pb2

log = structlog.get_logger()

SERVICE = sandbox_pb2.DESCRIPTOR.services_by_name["SandboxService"]
# The node holding a sandbox, by the sandbox's project and id; None when it is live nowhere.
Locate = Callable[[str, str], Awaitable[str | None]]


class _Held(Protocol):
    @property
    def node(self) -> str: ...

    @property
    def given_up(self) -> bool: ...


class SandboxDirectory(Protocol):
    """The part of the registry (controller.store.registry.Registry) that locates sandboxes."""

    async def get_live(self, project: str, sandbox_id: str) -> _Held | None: ...


def locate_in(registry: SandboxDirectory) -> Locate:
    """Locate by the shared registry: the node its live row names ("" is none); none for a
    sandbox its dead node's sweep terminated (any node answers for it: its node may never
    come back)."""

    async def locate(project: str, sandbox_id: str) -> str | None:
        record = await registry.get_live(project, sandbox_id)
        if record is None or not record.node or record.given_up:
            return None
        return record.node

    return locate


# How long the gateway goes by where it last found a sandbox, and for how many sandboxes.
LOCATION_TTL_SECONDS = 10.0
MAX_LOCATIONS = 10_000


class Locations:
    """Which node held each sandbox when last looked up, for a few seconds and a bounded number
    of sandboxes: it spares most calls a round trip to the database. Trusted because the node
    is the authority: one that does not hold a sandbox refuses the call without doing anything,
    and the call then goes again where the registry says (Forwarder._relocated)."""

    def __init__(
        self,
        ttl: float = LOCATION_TTL_SECONDS,
        size: int = MAX_LOCATIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl
        self._size = size
        self._clock = clock
        # (project, sandbox id) -> (node, when it was looked up), oldest first.
        self._held: dict[tuple[str, str], tuple[str, float]] = {}

    def __repr__(self) -> str:
        return f"<Locations {len(self._held)}>"

    def get(self, sandbox: tuple[str, str]) -> str | None:
        entry = self._held.get(sandbox)
        if entry is None:
            return None
        if self._clock() - entry[1] > self._ttl:
            del self._held[sandbox]
            return None
        return entry[0]

    def put(self, sandbox: tuple[str, str], node: str) -> None:
        self._held.pop(sandbox, None)  # to the end: the oldest go first
        self._held[sandbox] = (node, self._clock())
        while len(self._held) > self._size:
            del self._held[next(iter(self._held))]

    def forget(self, sandbox: tuple[str, str]) -> None:
        self._held.pop(sandbox, None)


# How long a call waits for a connection to its node before answering UNAVAILABLE.
DEFAULT_CONNECT_TIMEOUT_SECONDS = 3.0
# How many nodes a call that any node may answer (or a create) tries before giving up.
MAX_ATTEMPTS = 3
NO_NODE = "no petri node is available; retry"
# Request metadata that belongs to this hop's transport, not to the call.
_HOP_KEYS = frozenset({"content-type", "te", "user-agent", "host", "authority"})
_DETAILS_KEY = STATUS_DETAILS_KEY
# A node's refusals of a sandbox that is not (or no longer) its own: nothing was done.
_NOT_HELD = "SANDBOX_ON_ANOTHER_NODE"
_GONE = frozenset({"SANDBOX_NOT_FOUND", "SANDBOX_DELETED", "SANDBOX_EXPIRED"})


@dataclass(frozen=True)
class Route:
    """How a method's first request message picks its node."""

    kind: str  # "sandbox" (its holder), "parent" or "any" (any live node), "create" (placement)
    path: tuple[int, ...] = ()  # field numbers of the name or parent
    # The node's first check is parsing that name: the gateway refuses a bad one itself, with
    # the node's words. Otherwise (streams) a call without one goes to any node, which says why.
    strict: bool = True
    # Whether a call may go by where the gateway remembers the sandbox: not one whose node may
    # answer NOT_FOUND after doing its work (it reads the sandbox again, deleted meanwhile),
    # which the gateway could not tell from a refusal and would send again.
    recall: bool = True
    # Whether it changes nothing: one whose node was lost mid-call may be made again.
    reads: bool = False


def _path(message: Descriptor, *names: str) -> tuple[int, ...]:
    numbers = []
    current: Descriptor | None = message
    for name in names:
        assert current is not None, f"{name} is a field of a message"
        field = current.fields_by_name[name]
        numbers.append(field.number)
        current = field.message_type
    return tuple(numbers)


def _routes() -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for method in SERVICE.methods:
        request = method.input_type
        if method.name == "CreateSandbox":
            routes[method.name] = Route("create", _path(request, "parent"))
        elif method.name == "ListSandboxes":
            routes[method.name] = Route("parent", _path(request, "parent"), reads=True)
        elif method.name == "ListImageProfiles":
            routes[method.name] = Route("any", reads=True)
        elif method.name == "UpdateSandbox":
            routes[method.name] = Route("sandbox", _path(request, "sandbox", "name"), recall=False)
        elif method.name in ("PauseSandbox", "ResumeSandbox"):
            routes[method.name] = Route("sandbox", _path(request, "name"), recall=False)
        elif method.name == "StreamExecuteCode":
            routes[method.name] = Route("sandbox", _path(request, "start", "name"), strict=False)
        elif method.client_streaming:
            routes[method.name] = Route("sandbox", _path(request, "name"), strict=False)
        else:
            reads = method.name in ("GetSandbox", "ListFiles", "ReadFile")
            routes[method.name] = Route("sandbox", _path(request, "name"), reads=reads)
    return routes


ROUTES = _routes()


@dataclass(frozen=True)
class _Plan:
    candidates: Sequence[NodeInfo]  # first choice first
    unreachable: str  # what to answer when none can be reached (nothing was forwarded)
    retry_unavailable: bool = False  # a create with a request_id: safe to make again elsewhere
    sandbox: tuple[str, str] | None = None  # (project, id) of the sandbox it goes to the node of
    remembered: bool = False  # that node is from the gateway's Locations, not the registry now


def _reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a node's error ("" if it has none)."""
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                status = error_details_pb2.Status.FromString(value)
                for detail in status.details:
                    if detail.type_url == ERROR_INFO_TYPE_URL:
                        return error_details_pb2.ErrorInfo.FromString(detail.value).reason
            except DecodeError:
                return ""
    return ""


def _not_held(error: grpc.aio.AioRpcError, plan: _Plan) -> bool:
    """Whether a node refused the call because the sandbox is not its own, having done nothing:
    it is on another node (moved, or deleted and made again there), or, where the gateway went
    by what it remembered, gone from the registry (maybe made again since)."""
    if plan.sandbox is None:
        return False
    code = error.code()
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return _reason(error) == _NOT_HELD
    return plan.remembered and code is grpc.StatusCode.NOT_FOUND and _reason(error) in _GONE


# The reason of the gateway's answer to a call whose node was lost mid-call.
NODE_LOST = "NODE_LOST"


def _lost(error: grpc.aio.AioRpcError) -> bool:
    """Whether a call ended because its connection to the node did (the node killed, gone
    away, or frozen past node_keepalive's pings), not with the node's answer: gRPC's own
    UNAVAILABLE, without the details every error of a node carries."""
    if error.code() is not grpc.StatusCode.UNAVAILABLE:
        return False
    return all(key != _DETAILS_KEY for key, _ in error.trailing_metadata() or ())


def _lost_answer(node: str, route: Route, plan: _Plan, error: grpc.aio.AioRpcError) -> PetriError:
    """What the caller is told when its call's node was lost mid-call: the node may have done
    the work or not, so "retry" only where doing it again is safe."""
    why = f"node {node} stopped answering during the call ({(error.details() or '')[:200]})"
    metadata = {"node": node}
    if route.reads:
        return Unavailable(f"{why}; retry", reason=NODE_LOST, metadata=metadata)
    if plan.retry_unavailable:
        return Unavailable(
            f"{why}; retry with the same request_id: the sandbox is made once",
            reason=NODE_LOST,
            metadata=metadata,
        )
    return OutcomeUnknown(
        f"{why}: it may have done its work or not (run the code, made the change); look at the "
        "sandbox before calling again",
        reason=NODE_LOST,
        metadata=metadata,
    )


def _unreachable(holder: str) -> str:
    return f"node {holder} holding the sandbox is not answering; retry"


def _caller() -> Principal:
    return current_caller() or ANYONE


def _outgoing(context: Context) -> tuple[tuple[str, str | bytes], ...]:
    """The caller's metadata for the node: authorization and the rest, not this hop's."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith((":", "grpc-")) and key not in _HOP_KEYS
    )


def _trailing(metadata: Any) -> tuple[tuple[str, str | bytes], ...]:
    """A node's trailing metadata for the caller: all of it but the transport's own keys."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if key == _DETAILS_KEY or not key.startswith((":", "grpc-"))
    )


async def _pass_initial(context: Context, call: Any) -> bool:
    """Sends the caller the node's initial metadata, once per call, when it has any (True)."""
    metadata = _trailing(await call.initial_metadata())
    if metadata:
        await context.send_initial_metadata(metadata)
    return bool(metadata)


async def _pass_status(context: Context, error: grpc.aio.AioRpcError) -> NoReturn:
    """Ends the call with the node's status, message and trailing metadata, as they came."""
    await context.abort(error.code(), error.details() or "", _trailing(error.trailing_metadata()))
    raise AssertionError("unreachable: abort raises")


async def _refuse(context: Context, error: PetriError) -> NoReturn:
    """Ends the call as a node would with this error: status, message and details."""
    await context.abort(error.status, str(error), status_details(error))
    raise AssertionError("unreachable: abort raises")


def _kind(request: sandbox_pb2.CreateSandboxRequest, profile: str, runtime: str) -> str:
    """The warm pool kind ("profile/runtime") a create asks for, the node's defaults filled in;
    an unknown runtime is the node's to refuse."""
    spec = request.sandbox.spec
    with contextlib.suppress(ValueError):
        runtime = Runtime(spec.runtime).name.lower()
    return f"{spec.image_profile or profile}/{runtime}"


# A client-streaming call to a node, of either kind.
_StreamCall = TypeVar(
    "_StreamCall", grpc.aio.StreamUnaryCall[bytes, bytes], grpc.aio.StreamStreamCall[bytes, bytes]
)


class Forwarder:
    """The gateway's SandboxService: a generic handler per method, forwarding raw bytes."""

    def __init__(
        self,
        directory: Directory,
        locate: Locate,
        default_profile: str,
        default_runtime: str,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._directory = directory
        self._metrics = metrics
        self._locate = locate
        self._default_profile = default_profile
        self._default_runtime = default_runtime
        self._connect_timeout = connect_timeout
        self._locations = Locations()

    def __repr__(self) -> str:
        return f"<Forwarder {self._directory!r}>"

    def handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{method.name}"
            route = ROUTES[method.name]
            streams = (method.client_streaming, method.server_streaming)
            if streams == (False, False):
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary_unary(path, route)
                )
            elif streams == (False, True):
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self._unary_stream(path, route)
                )
            elif streams == (True, False):
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    self._stream_unary(path, route)
                )
            else:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self._stream_stream(path, route)
                )
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    # --- routing -----------------------------------------------------------------------------

    def _unavailable(self, message: str) -> Unavailable:
        """The gateway's own UNAVAILABLE (nothing was forwarded), counted."""
        if self._metrics is not None:
            self._metrics.unreachable.inc()
        return Unavailable(message)

    def _anywhere(self) -> _Plan:
        nodes = self._directory.any_order()
        if not nodes:
            raise self._unavailable(NO_NODE)
        return _Plan(nodes, NO_NODE)

    async def _plan(self, route: Route, first: bytes | None, recall: bool = False) -> _Plan:
        """Where a call goes; `recall`: by where the sandbox was lately, if the gateway knows
        (only for a call that goes again where the registry says when its node refuses it)."""
        if route.kind == "any" or first is None:  # no message: any node says what is missing
            return self._anywhere()
        if route.kind == "create":
            return self._placement(first)
        text = string_field(first, route.path)
        if route.kind == "parent":
            _caller().check_project(parse_parent(text))
            return self._anywhere()
        if not text and not route.strict:
            return self._anywhere()
        name = parse_sandbox_name(text)
        _caller().check_project(name.project)
        sandbox = (name.project, name.sandbox_id)
        holder = self._locations.get(sandbox) if recall else None
        node = None if holder is None else self._directory.live(holder)
        if holder is not None and node is not None:
            return _Plan([node], _unreachable(holder), sandbox=sandbox, remembered=True)
        try:
            holder = await self._locate(*sandbox)
        except Exception as exc:  # the database's errors; nothing was forwarded
            log.warning("cannot locate a sandbox", name=str(name), error=str(exc)[:500])
            raise self._unavailable("the registry is not answering; retry") from None
        if holder is None:  # never existed, or deleted: any node answers from the registry
            self._locations.forget(sandbox)
            return self._anywhere()
        node = self._directory.live(holder)
        if node is None:
            self._locations.forget(sandbox)
            raise self._unavailable(_unreachable(holder))
        self._locations.put(sandbox, holder)
        return _Plan([node], _unreachable(holder), sandbox=sandbox)

    async def _relocated(
        self, route: Route, first: bytes, plan: _Plan, error: grpc.aio.AioRpcError
    ) -> _Plan | None:
        """Where a call goes again, once, after its node refused it as not holding the sandbox
        (having done nothing): the node the registry names now. None, when it names none or the
        same one: the node's answer stands."""
        if not _not_held(error, plan):
            return None
        assert plan.sandbox is not None
        self._locations.forget(plan.sandbox)
        again = await self._plan(route, first)
        if again.sandbox is None or again.candidates[0].name == plan.candidates[0].name:
            return None
        log.info("sandbox not on its node: sent again", refused_by=plan.candidates[0].name)
        return again

    def _placement(self, first: bytes) -> _Plan:
        try:
            request = sandbox_pb2.CreateSandboxRequest.FromString(first)
        except DecodeError:
            raise InvalidArgument("the request message does not parse as its type") from None
        _caller().check_project(parse_parent(request.parent))
        kind = _kind(request, self._default_profile, self._default_runtime)
        nodes = self._directory.placement(kind)
        if not nodes:
            raise self._unavailable(NO_NODE)
        return _Plan(nodes, NO_NODE, retry_unavailable=bool(request.request_id))

    async def _ready(self, channel: grpc.aio.Channel, context: Context) -> bool:
        """Whether the node's channel connects in time (nothing is sent before it does)."""
        if channel.get_state(try_to_connect=True) is grpc.ChannelConnectivity.READY:
            return True
        timeout = self._connect_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = max(0.0, min(timeout, remaining))
        try:
            await asyncio.wait_for(channel.channel_ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def _connect(
        self, plan: _Plan, untried: list[NodeInfo], context: Context
    ) -> tuple[str, grpc.aio.Channel]:
        """The first node of `untried` that answers (taken off it), by name, and a connected
        channel to it; UNAVAILABLE, safe to retry, when none does."""
        while untried and len(plan.candidates) - len(untried) < MAX_ATTEMPTS:
            node = untried.pop(0)
            channel = self._directory.channel(node.address)
            if await self._ready(channel, context):
                if self._metrics is not None:
                    self._metrics.reached.inc()
                return node.name, channel
            log.warning("node not answering", node=node.name, address=node.address)
        if plan.sandbox is not None:  # the next call looks the sandbox up again
            self._locations.forget(plan.sandbox)
        raise self._unavailable(plan.unreachable)

    async def _fail(
        self,
        context: Context,
        error: grpc.aio.AioRpcError,
        node: str,
        route: Route,
        plan: _Plan,
    ) -> NoReturn:
        """Ends the call with its node's answer, or, when the node was lost mid-call, with
        the gateway's own (_lost_answer)."""
        if not _lost(error):
            await _pass_status(context, error)
        log.warning("node lost during a call", node=node, error=(error.details() or "")[:200])
        await _refuse(context, _lost_answer(node, route, plan, error))

    # --- the four kinds of calls ---------------------------------------------------------------

    def _unary_unary(self, path: str, route: Route) -> Callable[[bytes, Context], Any]:
        async def forward(request: bytes, context: Context) -> bytes:
            try:
                plan = await self._plan(route, request, recall=route.recall)
                untried = list(plan.candidates)
                relocated = False
                while True:
                    node, channel = await self._connect(plan, untried, context)
                    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                        path
                    )
                    call = method(
                        request, timeout=context.time_remaining(), metadata=_outgoing(context)
                    )
                    try:
                        response: bytes = await call
                    except grpc.aio.AioRpcError as error:
                        retry = plan.retry_unavailable and untried
                        if retry and error.code() is grpc.StatusCode.UNAVAILABLE:
                            log.warning("create unavailable: retrying on another node")
                            if self._metrics is not None:
                                self._metrics.retried.inc()
                            continue
                        again = (
                            None
                            if relocated
                            else await self._relocated(route, request, plan, error)
                        )
                        if again is None:
                            await self._fail(context, error, node, route, plan)
                        plan, untried, relocated = again, list(again.candidates), True
                        continue
                    await _pass_initial(context, call)
                    context.set_trailing_metadata(_trailing(await call.trailing_metadata()))
                    return response
            except PetriError as error:
                await _refuse(context, error)

        return forward

    def _unary_stream(self, path: str, route: Route) -> Callable[[bytes, Context], Any]:
        async def forward(request: bytes, context: Context) -> AsyncIterator[bytes]:
            relocated = False
            try:
                plan: _Plan | None = await self._plan(route, request, recall=route.recall)
            except PetriError as error:
                await _refuse(context, error)
            while plan is not None:
                try:
                    node, channel = await self._connect(plan, list(plan.candidates), context)
                except PetriError as error:
                    await _refuse(context, error)
                method: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(path)
                call = method(
                    request, timeout=context.time_remaining(), metadata=_outgoing(context)
                )
                answered = False  # once the caller has had anything, the call cannot go again
                try:
                    answered = await _pass_initial(context, call)
                    async for response in call:  # the next is read once this one is sent on
                        answered = True
                        yield response
                        del response
                    context.set_trailing_metadata(_trailing(await call.trailing_metadata()))
                    return
                except grpc.aio.AioRpcError as error:
                    if answered or relocated:
                        await self._fail(context, error, node, route, plan)
                    try:
                        again = await self._relocated(route, request, plan, error)
                    except PetriError as refusal:
                        await _refuse(context, refusal)
                    if again is None:
                        await self._fail(context, error, node, route, plan)
                    plan = again
                    relocated = True
                finally:
                    call.cancel()  # the caller went away: so does the node's call

        return forward

    async def _taken(
        self,
        route: Route,
        first: bytes | None,
        context: Context,
        start: Callable[[grpc.aio.Channel], _StreamCall],
    ) -> tuple[_StreamCall, str, _Plan]:
        """A client-streaming call (`start` opens it on a channel) with the caller's first
        message written, once its node took it or ended it; with that node's name and the plan
        that chose it. A node takes such a call by sending
        its initial metadata, once it holds the sandbox and before it reads past the first
        message (controller.api.servicer.TAKEN): a node that ended it without, refusing it as
        not holding the sandbox, had only the first, which is still here, and the call goes
        once more, from its first message, to the node the registry names now. A node's other
        answers, and a second refusal, are the caller's to read from the call."""
        plan = await self._plan(route, first, recall=route.recall)
        relocated = False
        while True:
            node, channel = await self._connect(plan, list(plan.candidates), context)
            call = start(channel)
            try:
                if first is None:  # no message: any node says what is missing
                    await _quietly(call.done_writing())
                    return call, node, plan
                await _quietly(call.write(first))
                # A node that takes the call sends initial metadata (TAKEN), never before a
                # refusal; a call it ended at once has empty initial metadata, and its status
                # follows.
                if await call.initial_metadata():
                    return call, node, plan
                code = await call.code()
            except BaseException:  # the caller went away while the node decided
                call.cancel()
                raise
            if relocated:
                return call, node, plan
            ended = grpc.aio.AioRpcError(
                code, grpc.aio.Metadata(), await call.trailing_metadata(), await call.details()
            )
            again = await self._relocated(route, first, plan, ended)
            if again is None:
                return call, node, plan
            plan, relocated = again, True

    def _stream_unary(
        self, path: str, route: Route
    ) -> Callable[[AsyncIterator[bytes], Context], Any]:
        async def forward(requests: AsyncIterator[bytes], context: Context) -> bytes:
            def start(channel: grpc.aio.Channel) -> grpc.aio.StreamUnaryCall[bytes, bytes]:
                method: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(path)
                return method(timeout=context.time_remaining(), metadata=_outgoing(context))

            try:
                first = await anext(requests, None)
                more = first is not None
                call, node, plan = await self._taken(route, first, context, start)
            except PetriError as error:
                await _refuse(context, error)
            del first  # the node took the chunk, or answered without it
            try:
                if more and not call.done():
                    await _send_rest(call, requests)
                response: bytes = await call
                await _pass_initial(context, call)
                context.set_trailing_metadata(_trailing(await call.trailing_metadata()))
                return response
            except grpc.aio.AioRpcError as error:
                await self._fail(context, error, node, route, plan)
            except PetriError as error:  # reading the caller's stream (its budget)
                call.cancel()
                await _refuse(context, error)
            finally:
                call.cancel()

        return forward

    def _stream_stream(
        self, path: str, route: Route
    ) -> Callable[[AsyncIterator[bytes], Context], Any]:
        async def forward(requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
            def start(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall[bytes, bytes]:
                method: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
                    path
                )
                return method(timeout=context.time_remaining(), metadata=_outgoing(context))

            try:
                first = await anext(requests, None)
                more = first is not None
                call, node, plan = await self._taken(route, first, context, start)
            except PetriError as error:
                await _refuse(context, error)
            del first
            # The caller's messages go on in their own task while the node's come back here.
            rest = _send_rest(call, requests) if more and not call.done() else _nothing()
            sending = asyncio.get_running_loop().create_task(rest)
            try:
                await _pass_initial(context, call)
                async for response in call:
                    yield response
                    del response
                context.set_trailing_metadata(_trailing(await call.trailing_metadata()))
            except grpc.aio.AioRpcError as error:
                await self._fail(context, error, node, route, plan)
            except asyncio.CancelledError:
                failure = _failure_of(sending)
                if failure is None:
                    raise
                await _refuse(context, failure)
            finally:
                call.cancel()
                sending.cancel()
                # Reading the caller's stream ends before the stream is closed after us.
                await asyncio.gather(sending, return_exceptions=True)

        return forward


async def _quietly(writing: Awaitable[None]) -> None:
    """A write, or the half-close, to a node's call; one the node ended already (a write after
    its end is InvalidStateError) is let be: its status is the answer."""
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await writing


async def _nothing() -> None:
    return None


async def _send_rest(
    call: grpc.aio.StreamUnaryCall[Any, Any] | grpc.aio.StreamStreamCall[Any, Any],
    rest: AsyncIterator[bytes],
) -> None:
    """Writes the caller's messages after the first to the node, each once the node's side took
    the one before; then half-closes. A node that ended the call first has its status read by
    the caller of this; a failure to read the caller's stream cancels the node's call and is
    raised."""
    try:
        async for message in rest:
            await call.write(message)
            del message
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        # The node ended the call (a write after its end is InvalidStateError): its status
        # is the answer.
        return
    except PetriError:
        call.cancel()
        raise


def _failure_of(task: asyncio.Task[None]) -> PetriError | None:
    """The error that stopped sending the caller's messages, if that is what cancelled the node's
    call."""
    if not task.done() or task.cancelled():
        return None
    error = task.exception()
    return error if isinstance(error, PetriError) else None
