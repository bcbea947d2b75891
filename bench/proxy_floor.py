"""The floor under the gateway's hop: what one more process in the path of a unary gRPC call
costs on this machine, whatever that process does. An echo server answers a 20-byte call
straight, through a bare grpc.aio proxy (raw bytes, one channel, no routing, no auth: less than
any Python gateway does), and through nginx's grpc_pass (C, a kept-alive upstream, no routing)
when nginx is installed (Debian's nginx-light; not installed by scripts/bootstrap). Each in its
own process, as a gateway is; paths interleaved, round after round; p50 and p99 per path.

Issue 17's target is +0.5 ms for the gateway's hop: this shows how much of it the hop itself
takes before the gateway does anything.

Run as the service user (scripts/bench does): python -m bench.proxy_floor [--rounds N]
[--calls N] [--nginx PATH]
"""

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from bench.harness import free_port, median, percentile, print_table

METHOD = "/petri.bench.Echo/Call"
PAYLOAD = b"x" * 20
WARMUP = 200


def _echo_handler() -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    return grpc.method_handlers_generic_handler(
        "petri.bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}
    )


def _proxy_handler(target: str) -> grpc.GenericRpcHandler:
    channel = grpc.aio.insecure_channel(target)
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(METHOD)

    async def forward(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        answer: bytes = await call(request, timeout=context.time_remaining())
        return answer

    return grpc.method_handlers_generic_handler(
        "petri.bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(forward)}
    )


async def _serve(port: int, target: str | None) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_echo_handler() if target is None else _proxy_handler(target)])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _nginx_config(directory: Path, port: int, backend: int) -> Path:
    config = directory / "nginx.conf"
    temp = "\n".join(
        f"  {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    config.write_text(
        f"""daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"};
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temp}
  upstream echo {{ server 127.0.0.1:{backend}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://echo; }}
  }}
}}
"""
    )
    return config


@contextlib.contextmanager
def _processes(nginx: str | None) -> Iterator[dict[str, str]]:
    """The echo server, the Python proxy and (if given) nginx, running; their addresses by
    path name."""
    ports = {name: free_port() for name in ("direct", "grpc.aio proxy", "nginx grpc_pass")}
    backend = ports["direct"]
    commands = {
        "direct": [sys.executable, "-m", "bench.proxy_floor", "--serve", str(backend)],
        "grpc.aio proxy": [
            sys.executable,
            "-m",
            "bench.proxy_floor",
            "--serve",
            str(ports["grpc.aio proxy"]),
            "--to",
            f"127.0.0.1:{backend}",
        ],
    }
    with tempfile.TemporaryDirectory(prefix="petri-bench-nginx-") as scratch:
        if nginx is not None:
            config = _nginx_config(Path(scratch), ports["nginx grpc_pass"], backend)
            commands["nginx grpc_pass"] = [nginx, "-c", str(config)]
        running = [subprocess.Popen(command) for command in commands.values()]
        try:
            yield {name: f"127.0.0.1:{ports[name]}" for name in commands}
        finally:
            for process in running:
                process.terminate()
            for process in running:
                process.wait(timeout=10)


async def _measure(addresses: dict[str, str], rounds: int, calls: int) -> dict[str, list[float]]:
    channels = {name: grpc.aio.insecure_channel(address) for name, address in addresses.items()}
    try:
        stubs: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}
        for name, channel in channels.items():
            await asyncio.wait_for(channel.channel_ready(), 30)
            stubs[name] = channel.unary_unary(METHOD)
            for _ in range(WARMUP):  # connections up, windows grown, caches warm
                await stubs[name](PAYLOAD, timeout=10)
        samples: dict[str, list[float]] = {name: [] for name in stubs}
        for number in range(rounds):
            order = list(stubs) if number % 2 == 0 else list(stubs)[::-1]
            for name in order:
                for _ in range(calls):
                    started = time.perf_counter()
                    await stubs[name](PAYLOAD, timeout=10)
                    samples[name].append(time.perf_counter() - started)
        return samples
    finally:
        for channel in channels.values():
            await channel.close()


def _report(samples: dict[str, list[float]], rounds: int, calls: int) -> None:
    direct = median(samples["direct"])
    rows = [
        [
            name,
            f"{median(times) * 1e3:.3f}",
            f"{percentile(times, 0.99) * 1e3:.3f}",
            "" if name == "direct" else f"{(median(times) - direct) * 1e3:+.3f}",
        ]
        for name, times in samples.items()
    ]
    print_table(
        f"one more process in a unary call's path, ms ({rounds} interleaved rounds of {calls})",
        ["path", "p50", "p99", "p50 over direct"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=500, help="per round and path")
    parser.add_argument(
        "--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx", help="nginx to run"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # a child: serve a port
    parser.add_argument("--to", help=argparse.SUPPRESS)  # ... as a proxy to this address
    args = parser.parse_args()
    if args.serve is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(args.serve, args.to))
        return
    nginx = args.nginx if Path(args.nginx).exists() else None
    if nginx is None:
        print(f"no nginx at {args.nginx}: measuring without it (apt-get install nginx-light)")
    with _processes(nginx) as addresses:
        samples = asyncio.run(_measure(addresses, args.rounds, args.calls))
    _report(samples, args.rounds, args.calls)


if __name__ == "__main__":
    main()
