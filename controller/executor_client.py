"""Channels to the executors inside sandboxes: one per sandbox, opened once and reused."""

import asyncio
import contextlib
from pathlib import Path

import grpc

from controller.errors import Unavailable
from petri.v1 import executor_pb2, executor_pb2_grpc

ExecuteCall = grpc.aio.StreamStreamCall[executor_pb2.ExecuteInput, executor_pb2.ExecuteEvent]
# How often to look for the executor's socket while a sandbox starts.
READY_POLL_INTERVAL = 0.01
STATUS_DEADLINE = 2.0


def _visible(path: Path) -> bool:
    # The directory belongs to the sandbox's root, which opens it to us once it listens.
    try:
        return path.exists()
    except PermissionError:
        return False


class ExecutorClient:
    def __init__(self, socket_path: Path, sandbox_uid: str, max_message_bytes: int) -> None:
        self.socket_path = socket_path
        # Sent with every call: the executor refuses calls for another sandbox, so a socket
        # path that user code turned into a symlink to a neighbour's socket leads nowhere.
        self._metadata = (("petri-sandbox-uid", sandbox_uid),)
        self._channel = grpc.aio.insecure_channel(
            f"unix:{socket_path}",
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # The socket appears a moment before the executor listens: retry quickly.
                ("grpc.initial_reconnect_backoff_ms", 20),
                ("grpc.min_reconnect_backoff_ms", 20),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self._stub = executor_pb2_grpc.ExecutorStub(self._channel)

    def __repr__(self) -> str:
        return f"<ExecutorClient {self.socket_path}>"

    async def status(self, timeout: float = STATUS_DEADLINE) -> executor_pb2.ExecutorStatus:
        return await self._stub.GetStatus(
            executor_pb2.GetStatusRequest(), timeout=timeout, metadata=self._metadata
        )

    async def wait_ready(self, timeout: float) -> executor_pb2.ExecutorStatus:
        """Waits until the executor answers; Unavailable after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last_error = "its socket never appeared"
        while loop.time() < deadline:
            if _visible(self.socket_path):
                remaining = max(0.1, min(STATUS_DEADLINE, deadline - loop.time()))
                try:
                    return await self.status(timeout=remaining)
                except grpc.aio.AioRpcError as exc:
                    last_error = f"{exc.code().name}: {exc.details()}"
            await asyncio.sleep(READY_POLL_INTERVAL)
        raise Unavailable(
            f"the sandbox's executor did not become ready in {timeout:g} s ({last_error})"
        )

    def execute(self) -> ExecuteCall:
        """Starts an execution: write the request, then input chunks, then done_writing; read
        the events. Cancelling the call interrupts the code."""
        return self._stub.Execute(metadata=self._metadata)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._channel.close()
