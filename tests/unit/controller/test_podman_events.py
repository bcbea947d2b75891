"""PodmanRuntime.events against a stand-in of podman's /events endpoint on a unix socket: the
request it sends (HTTP/1.0, our registry's label, the watched events), the events it reads,
and how it ends: EOF (the service stopped), a refusal, a socket nobody serves."""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.errors import Unavailable
from controller.runtime import podman
from controller.runtime.container import WATCHED_EVENTS, ContainerEvent
from controller.runtime.podman import PodmanRuntime
from tests.unit.controller.inprocess import short_runtime_dir

OK = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"


def event(name: str, action: str) -> bytes:
    attributes = {"name": name, "image": "localhost/petri-sandbox:test", "containerExitCode": "137"}
    body = {
        "status": action,
        "Type": "container",
        "Action": action,
        "Actor": {"ID": "abc", "Attributes": attributes},
    }
    return json.dumps(body).encode() + b"\n"


async def podman_at(
    socket_path: Path, answer: bytes, requests: list[bytes], done: asyncio.Event
) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        await done.wait()  # then the service stops: the stream ends
        writer.close()

    return await asyncio.start_unix_server(serve, str(socket_path))


@pytest.fixture
def socket_path() -> Iterator[Path]:
    with short_runtime_dir() as directory:
        yield directory / "podman.sock"


async def test_events_asks_for_our_registry_and_reads_each_event_until_the_end(
    socket_path: Path,
) -> None:
    requests: list[bytes] = []
    done = asyncio.Event()
    noise = b'{"Type": "container"}\n'  # not an event we can use: skipped
    answer = OK + event("petri-a", "died") + noise + event("petri-b", "remove")
    server = await podman_at(socket_path, answer, requests, done)
    runtime = PodmanRuntime(socket_path)
    try:
        stream = await runtime.events("reg-1")
        first = await anext(stream)
        assert first == ContainerEvent("petri-a", "died")
        assert await anext(stream) == ContainerEvent("petri-b", "remove")
        done.set()
        assert [e async for e in stream] == []  # EOF: the iteration ends
        await stream.aclose()
    finally:
        server.close()
        await runtime.close()
    (request,) = requests
    line = request.split(b"\r\n")[0].decode()
    method, target, version = line.split(" ")
    assert (method, version) == ("GET", "HTTP/1.0")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
    assert query["stream"] == ["true"]
    assert json.loads(query["filters"][0]) == {
        "type": ["container"],
        "event": list(WATCHED_EVENTS),
        "label": ["io.petri.registry=reg-1"],
    }


async def test_a_refused_subscription_is_unavailable(socket_path: Path) -> None:
    done = asyncio.Event()
    done.set()
    answer = b"HTTP/1.0 500 Internal Server Error\r\n\r\n{}"
    server = await podman_at(socket_path, answer, [], done)
    runtime = PodmanRuntime(socket_path)
    try:
        with pytest.raises(Unavailable, match="podman refused its event stream"):
            await runtime.events("reg-1")
    finally:
        server.close()
        await runtime.close()


async def test_no_podman_is_unavailable(socket_path: Path) -> None:
    runtime = PodmanRuntime(socket_path)
    try:
        with pytest.raises(Unavailable, match="event stream is not answering"):
            await runtime.events("reg-1")
    finally:
        await runtime.close()


async def test_a_line_over_the_limit_breaks_the_stream(
    socket_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(podman, "EVENT_LINE_LIMIT", 1024)
    done = asyncio.Event()
    server = await podman_at(socket_path, OK + b"x" * 4096 + b"\n", [], done)
    runtime = PodmanRuntime(socket_path)
    try:
        stream = await runtime.events("reg-1")
        with pytest.raises(Unavailable, match="event stream broke"):
            await anext(stream)
        await stream.aclose()
    finally:
        done.set()
        server.close()
        await runtime.close()
