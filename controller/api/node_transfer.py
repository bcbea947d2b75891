"""The node-to-node transfer of a moved sandbox's checkpoint (a draining node's), on the nodes'
own gRPC port: one internal client-streaming method, raw bytes (no protobuf), never relayed by
gateways and never reachable with a sandbox user's token alone.

The source sends the checkpoint file's bytes, a chunk per message, with three metadata keys:
the sandbox's uid and name, and the move's one-time token, whose hash only the source wrote in
the registry (controller.store.moves). The target checks them (controller.sandboxes.moves) and
answers once it holds the sandbox; any error is the target's refusal, with its status.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
import structlog

from controller.api.interceptors import Context
from controller.api.transport import node_channel
from controller.config import Config
from controller.errors import PermissionDenied, Unavailable

log = structlog.get_logger()

SERVICE = "petri.internal.v1.NodeTransfer"
METHOD = f"/{SERVICE}/TakeOver"
UID_KEY = "petri-move-uid"
SANDBOX_KEY = "petri-move-sandbox"
TOKEN_KEY = "petri-move-token"
# The longest metadata value read (a sandbox name is far shorter).
MAX_VALUE = 300
# How long a transfer may take in all: a checkpoint is at most a few GiB.
TRANSFER_TIMEOUT_SECONDS = 30 * 60.0


class Receiver(Protocol):
    """controller.sandboxes.manager.SandboxManager.receive_move"""

    async def receive_move(
        self, uid: str, name: str, token: str, data: AsyncIterator[bytes]
    ) -> None: ...


def _value(metadata: dict[str, Any], key: str) -> str:
    value = metadata.get(key, "")
    if not isinstance(value, str) or len(value) > MAX_VALUE:
        raise PermissionDenied("a sandbox is taken over only with its move's token")
    return value


def transfer_handler(receiver: Receiver) -> grpc.GenericRpcHandler:
    """The method a node answers another node's transfer with."""

    async def take_over(chunks: AsyncIterator[bytes], context: Context) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        await receiver.receive_move(
            _value(metadata, UID_KEY),
            _value(metadata, SANDBOX_KEY),
            _value(metadata, TOKEN_KEY),
            chunks,
        )
        return b""

    return grpc.method_handlers_generic_handler(
        SERVICE, {"TakeOver": grpc.stream_unary_rpc_method_handler(take_over)}
    )


class GrpcTransfer:
    """controller.sandboxes.moves.Transfer over gRPC: a channel per node address, with the
    node TLS settings (node_tls_ca...) when configured."""

    def __init__(
        self, config: Config, channel_for: Callable[[str], grpc.aio.Channel] | None = None
    ) -> None:
        self._channel_for = channel_for or node_channel(config)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def __repr__(self) -> str:
        return f"<GrpcTransfer channels={len(self._channels)}>"

    async def send(
        self, address: str, uid: str, name: str, token: str, data: AsyncIterator[bytes]
    ) -> None:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self._channel_for(address)
        method: grpc.aio.StreamUnaryMultiCallable[bytes, bytes] = channel.stream_unary(METHOD)
        metadata = ((UID_KEY, uid), (SANDBOX_KEY, name), (TOKEN_KEY, token))
        unread: list[Exception] = []

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for piece in data:
                    yield piece
            except Exception as exc:
                unread.append(exc)
                raise

        try:
            await method(chunks(), metadata=metadata, timeout=TRANSFER_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            details = (exc.details() or "")[:MAX_VALUE]
            raise Unavailable(
                f"the node at {address} did not take it over ({exc.code().name}: {details})"
            ) from None
        except asyncio.CancelledError:
            # gRPC cancels the call, and raises that, when the messages fail: not a
            # cancellation of this task, but a checkpoint that could not be read.
            if not unread:
                raise
            raise Unavailable(
                f"the checkpoint could not be read to send it: {str(unread[0])[:MAX_VALUE]}"
            ) from None

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
