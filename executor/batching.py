"""Groups an execution's events into messages, a wire concern of the daemon: a short
execution's output and result then cost one write instead of several."""

import asyncio
from collections.abc import AsyncIterator

from executor.execution import EventStream
from petri.v1 import executor_pb2

# Events that come within this long of the first one waiting go out together, in one message.
# Output of a longer execution reaches the caller this much later, which nobody watching it
# will notice.
BATCH_WINDOW = 0.005
# A group stops short of this size, so that messages stay within gRPC's limits (an event
# bigger than this, a large figure say, goes alone, as it would ungrouped).
BATCH_BYTES = 1 << 20


async def batches(events: EventStream) -> AsyncIterator[list[executor_pb2.ExecuteEvent]]:
    """The events, grouped: those that come within BATCH_WINDOW of the first of a group go
    with it, up to BATCH_BYTES; a file chunk or a result ends its group."""
    loop = asyncio.get_running_loop()
    carried: executor_pb2.ExecuteEvent | None = None
    while True:
        first = carried if carried is not None else await events.get()
        carried = None
        if first is None:
            return
        batch, size, last = [first], first.ByteSize(), first
        send_at = loop.time() + BATCH_WINDOW
        while not (last.HasField("file_chunk") or last.HasField("result") or size >= BATCH_BYTES):
            following: executor_pb2.ExecuteEvent | None
            try:
                following = events.get_nowait()
            except asyncio.QueueEmpty:
                remaining = send_at - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        following = await events.get()
                except TimeoutError:
                    break
            if following is None:
                yield batch
                return
            following_size = following.ByteSize()
            if size + following_size > BATCH_BYTES:
                carried = following  # it starts the next group
                break
            batch.append(following)
            size += following_size
            last = following
        yield batch
