"""`petri mcp`: an MCP server (the official `mcp` package) whose tools run Python in petri
sandboxes, one per MCP session. Transports: stdio (default) and Streamable HTTP."""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from signal import Signals
from types import FrameType
from typing import Any

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette

from petri import AsyncClient
from petri.cli.errors import CliError
from petri.cli.values import parse_duration, parse_labels
from petri.mcp.sessions import SandboxOptions, Sessions
from petri.mcp.tools import INSTRUCTIONS, register

_CLOSE_TIMEOUT_SECONDS = 15.0  # the service may be unreachable at exit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petri mcp",
        description="An MCP server whose tools run Python in a petri sandbox (one per session).",
    )
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="http: address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="http: port (default 8000)")
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="http: allow a --host that is not loopback (put authentication in front of it)",
    )
    parser.add_argument("--profile", help="image profile of the sandboxes")
    parser.add_argument("--runtime", choices=["runc", "gvisor"])
    parser.add_argument("--ttl", default="1h", help="sandbox time to live, renewed by use (1h)")
    parser.add_argument("--label", "-l", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--on-exit",
        choices=["delete", "keep"],
        default="delete",
        help="what to do with the sessions' sandboxes when the server stops (delete)",
    )
    group = parser.add_argument_group("connection (default: the PETRI_* environment)")
    group.add_argument("--addr")
    group.add_argument("--token")
    group.add_argument("--project")
    group.add_argument("--tls-ca", metavar="FILE")
    group.add_argument("--tls-cert", metavar="FILE")
    group.add_argument("--tls-key", metavar="FILE")
    return parser


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def rebinding_protection(host: str) -> TransportSecuritySettings | None:
    """On a loopback address, only requests naming a loopback host (Host and Origin headers):
    a web page must not reach the server through DNS rebinding. mcp turns this on by itself
    for 127.0.0.1, localhost and ::1 only, not for e.g. 127.0.0.2. None elsewhere (behind
    --allow-remote, the proxy decides)."""
    if not _is_loopback(host):
        return None
    names = {"127.0.0.1", "localhost", "[::1]", f"[{host}]" if ":" in host else host}
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{name}:*" for name in sorted(names)],
        allowed_origins=[f"http://{name}:*" for name in sorted(names)],
    )


def http_app(server: MCPServer[Any], host: str) -> Starlette:
    return server.streamable_http_app(host=host, transport_security=rebinding_protection(host))


def main(argv: Sequence[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv))
    try:
        options = SandboxOptions(
            profile=args.profile,
            runtime=args.runtime,
            ttl_seconds=parse_duration(args.ttl),
            labels=parse_labels(args.label),
        )
    except CliError as error:
        parser.error(str(error))
    if args.transport == "http" and not _is_loopback(args.host) and not args.allow_remote:
        parser.error(
            f"--host {args.host} is not loopback: the server holds the petri token and has no "
            "authentication of its own; add --allow-remote only behind an authenticating proxy"
        )
    try:
        anyio.run(_serve, args, options)
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(args: argparse.Namespace, options: SandboxOptions) -> None:
    client = AsyncClient(
        addr=args.addr,
        token=args.token,
        project=args.project,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    sessions = Sessions(client, options)
    server: MCPServer[Any] = MCPServer(
        "petri", instructions=INSTRUCTIONS, log_level="WARNING", version="0.1.0"
    )
    register(server, sessions)
    keep = args.on_exit == "keep"
    if args.transport == "http":
        try:
            await _serve_http(server, args.host, args.port)
        finally:
            await _close(sessions, client, keep)
        return
    # Signals stay caught until the cleanup is over: a host's SIGTERM, which follows its
    # closing of stdin, must not cut the deletions short.
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        try:
            await _serve_stdio(server, signals)
        finally:
            await _close(sessions, client, keep)


async def _close(sessions: Sessions, client: AsyncClient, keep: bool) -> None:
    # Shielded: a cancellation must not skip the cleanup; bounded: nor hang the exit.
    with anyio.move_on_after(_CLOSE_TIMEOUT_SECONDS, shield=True):
        names = await sessions.close(keep=keep)
        if names and keep:
            print("petri mcp: kept " + ", ".join(names), file=sys.stderr, flush=True)
        await client.aclose()


async def _serve_stdio(server: MCPServer[Any], signals: AsyncIterator[Signals]) -> None:
    """Serves until stdin closes, SIGTERM or SIGINT."""
    async with anyio.create_task_group() as group:

        async def stop_on_signal() -> None:
            async for _ in signals:
                group.cancel_scope.cancel()
                return

        group.start_soon(stop_on_signal)
        await server.run_stdio_async()
        group.cancel_scope.cancel()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


async def _serve_http(server: MCPServer[Any], host: str, port: int) -> None:
    """Serves until SIGTERM or SIGINT. uvicorn shuts down gracefully on either and re-raises
    it afterwards: SIGTERM then raises KeyboardInterrupt here, so the cleanup runs."""
    import uvicorn  # a dependency of mcp's HTTP transport

    signal.signal(signal.SIGTERM, _interrupt)
    app = http_app(server, host)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on")
    await uvicorn.Server(config).serve()
