"""Connections to a petri service: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Settings come from the arguments, else from the environment:

    PETRI_ADDR      host:port of the service (default "127.0.0.1:50051")
    PETRI_TOKEN     bearer token, sent as `authorization: Bearer <token>` (optional)
    PETRI_PROJECT   the project sandboxes belong to (default "default")
    PETRI_TLS_CA    PEM file: the CA that signed the server's certificate
    PETRI_TLS_CERT  PEM file: a client certificate (mutual TLS), with PETRI_TLS_KEY
    PETRI_TLS_KEY   PEM file: the client certificate's private key

Any of the three TLS settings turns TLS on (without PETRI_TLS_CA the system's roots are used).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc

from petri.sdk.errors import Unavailable, error_from_rpc
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_PROJECT = "default"

# Deadlines of calls without a timeout of their own. A create may start a container cold.
CALL_TIMEOUT = 60.0
CREATE_TIMEOUT = 180.0
# An execution's deadline is its timeout plus this: input upload, queueing, output files.
RUN_MARGIN = 60.0
# Waits between retries of UNAVAILABLE for the calls where a retry is safe (nothing ran).
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0)
# Output file chunks are a few MiB; the server's files may be 100 MiB in unary answers.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 128 << 20),
    ("grpc.max_send_message_length", 128 << 20),
]

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...]

__all__ = ["AsyncClient", "Client", "Settings", "default_async_client", "default_client"]


@dataclass(frozen=True)
class Settings:
    """Where and how to connect: the arguments given, else the environment's PETRI_* values."""

    addr: str
    project: str
    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def resolve(
        cls,
        addr: str | None = None,
        token: str | None = None,
        project: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> Settings:
        env = os.environ

        def path(value: str | os.PathLike[str] | None, var: str) -> Path | None:
            chosen = value if value is not None else env.get(var) or None
            return Path(chosen) if chosen is not None else None

        settings = cls(
            addr=addr or env.get("PETRI_ADDR") or DEFAULT_ADDR,
            project=project or env.get("PETRI_PROJECT") or DEFAULT_PROJECT,
            token=token if token is not None else env.get("PETRI_TOKEN") or None,
            tls_ca=path(tls_ca, "PETRI_TLS_CA"),
            tls_cert=path(tls_cert, "PETRI_TLS_CERT"),
            tls_key=path(tls_key, "PETRI_TLS_KEY"),
        )
        if (settings.tls_cert is None) != (settings.tls_key is None):
            raise ValueError(
                "a TLS client certificate needs its key: set both tls_cert and tls_key"
            )
        return settings

    @property
    def tls(self) -> bool:
        return any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for a plaintext channel."""
        if not self.tls:
            return None

        def read(p: Path | None) -> bytes | None:
            return p.read_bytes() if p is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca),
            private_key=read(self.tls_key),
            certificate_chain=read(self.tls_cert),
        )

    def metadata(self) -> Metadata:
        """The metadata every call sends: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def _delays(retry: bool) -> Sequence[float]:
    return RETRY_DELAYS if retry else ()


class Client:
    """A blocking connection to a petri service (one gRPC channel). Thread-safe; close it, or use
    it as a context manager, when done. Sandboxes made with it use it for every call."""

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        project: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = Settings.resolve(addr, token, project, tls_ca, tls_cert, tls_key)
        credentials = self.settings.credentials()
        if credentials is None:
            self._channel = grpc.insecure_channel(self.settings.addr, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                self.settings.addr, credentials, options=_CHANNEL_OPTIONS
            )
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self.metadata = self.settings.metadata()

    @property
    def project(self) -> str:
        return self.settings.project

    def __repr__(self) -> str:
        return f"<Client {self.settings.addr} project={self.project!r}>"

    def call(
        self,
        method: Callable[..., T],
        request: object,
        *,
        timeout: float | None = CALL_TIMEOUT,
        retry: bool = False,
    ) -> T:
        """Calls a unary method of :attr:`stub`; a failure raises a :class:`PetriError`. With
        ``retry`` (only where repeating the call is safe), UNAVAILABLE is retried with backoff."""
        for delay in (*_delays(retry), None):
            try:
                return method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            if not isinstance(error, Unavailable) or delay is None:
                raise error
            time.sleep(delay)
        raise AssertionError("unreachable")

    def profiles(self) -> list[sandbox_pb2.ImageProfile]:
        """The image profiles the service offers (ListImageProfiles): each one's ``name``
        ("imageProfiles/full"), ``python_version``, ``os``, ``packages``, ``is_default``..."""
        response = self.call(
            self.stub.ListImageProfiles, sandbox_pb2.ListImageProfilesRequest(), retry=True
        )
        return list(response.image_profiles)

    def close(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncClient:
    """An asyncio connection to a petri service: one grpc.aio channel, which belongs to the
    event loop it is made in, so make it inside a coroutine. Close it with ``await aclose()``
    or ``async with``."""

    def __init__(
        self,
        addr: str | None = None,
        token: str | None = None,
        project: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = Settings.resolve(addr, token, project, tls_ca, tls_cert, tls_key)
        credentials = self.settings.credentials()
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(self.settings.addr, options=_CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(
                self.settings.addr, credentials, options=_CHANNEL_OPTIONS
            )
        self.stub = sandbox_pb2_grpc.SandboxServiceStub(self._channel)
        self.metadata = self.settings.metadata()

    @property
    def project(self) -> str:
        return self.settings.project

    def __repr__(self) -> str:
        return f"<AsyncClient {self.settings.addr} project={self.project!r}>"

    async def call(
        self,
        method: Callable[..., Awaitable[T]],
        request: object,
        *,
        timeout: float | None = CALL_TIMEOUT,
        retry: bool = False,
    ) -> T:
        """As :meth:`Client.call`, awaited."""
        for delay in (*_delays(retry), None):
            try:
                return await method(request, timeout=timeout, metadata=self.metadata)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            if not isinstance(error, Unavailable) or delay is None:
                raise error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def profiles(self) -> list[sandbox_pb2.ImageProfile]:
        """As :meth:`Client.profiles`, awaited."""
        response = await self.call(
            self.stub.ListImageProfiles, sandbox_pb2.ListImageProfilesRequest(), retry=True
        )
        return list(response.image_profiles)

    async def aclose(self) -> None:
        """Closes the channel; calls in progress are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_default_lock = threading.Lock()
_default: Client | None = None
# Not weak: a grpc.aio channel refers to its loop, so a weak key would never go. The entries of
# closed loops are dropped at the next lookup (their channels, and connections, with them).
_default_async: dict[asyncio.AbstractEventLoop, AsyncClient] = {}


def default_client() -> Client:
    """The process-wide Client from the environment, made on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def default_async_client() -> AsyncClient:
    """The AsyncClient from the environment for the running event loop (a grpc.aio channel
    belongs to one loop), made on first use."""
    loop = asyncio.get_running_loop()
    with _default_lock:
        for closed in [other for other in _default_async if other.is_closed()]:
            del _default_async[closed]
        client = _default_async.get(loop)
        if client is None:
            client = _default_async[loop] = AsyncClient()
        return client
