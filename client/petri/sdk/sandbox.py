""":class:`Sandbox`: a handle on one sandbox, with blocking calls."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from types import TracebackType

import grpc

from petri.sdk.connection import CREATE_TIMEOUT, Client, default_client
from petri.sdk.errors import error_from_rpc
from petri.sdk.execution import Execution, ExecutionAssembler, OutputCallback, TextCallback
from petri.sdk.files import Files
from petri.sdk.inputs import FileSource
from petri.sdk.requests import (
    Seconds,
    create_request,
    run_deadline,
    run_requests,
    sandbox_name,
    update_request,
)
from petri.sdk.resources import Resources
from petri.v1 import sandbox_pb2

__all__ = ["Sandbox", "state_name"]


def state_name(info: sandbox_pb2.Sandbox) -> str:
    """The name of a sandbox's state, e.g. "RUNNING"."""
    return sandbox_pb2.Sandbox.State.Name(info.state)


class Sandbox:
    """A sandbox: an isolated, stateful Python interpreter with its own files.

    Make one with :meth:`create`, :meth:`connect` or :meth:`list`. As a context manager it is
    deleted on exit unless :attr:`keep` is True::

        with Sandbox.create() as sb:
            print(sb.run("1 + 1").text)
    """

    def __init__(self, info: sandbox_pb2.Sandbox, client: Client, keep: bool = False) -> None:
        self.info = info
        self.client = client
        self.keep = keep
        self.files = Files(client, info.name)

    @property
    def name(self) -> str:
        """The full name, e.g. "projects/default/sandboxes/x"."""
        return self.info.name

    @property
    def sandbox_id(self) -> str:
        """The last part of the name, e.g. "x"."""
        return self.info.name.rsplit("/", 1)[-1]

    @property
    def state(self) -> str:
        """The state's name as of :attr:`info`: "RUNNING", "PAUSED"... (see :meth:`refresh`)."""
        return state_name(self.info)

    def __repr__(self) -> str:
        return f"<Sandbox {self.name} {self.state}>"

    @classmethod
    def create(
        cls,
        profile: str | None = None,
        runtime: str | None = None,
        ttl: Seconds | None = None,
        labels: Mapping[str, str] | None = None,
        resources: Resources | None = None,
        sandbox_id: str | None = None,
        display_name: str | None = None,
        auto_pause_after: Seconds | None = None,
        keep: bool = False,
        client: Client | None = None,
    ) -> Sandbox:
        """Creates a sandbox and returns it once it is RUNNING.

        Args:
            profile: the image profile (e.g. "full"); the server's default when None.
            runtime: "runc" or "gvisor"; the server's default when None.
            ttl: time to live, in seconds or a timedelta; the server's default when None.
            labels: labels to filter :meth:`list` by.
            resources: limits; the server's defaults when None.
            sandbox_id: the id (``[a-z][a-z0-9-]{0,62}``); the server picks one when None.
            display_name: a human-readable name.
            auto_pause_after: pause after this long without executions (0: never).
            keep: leaving a ``with`` block does not delete the sandbox.
            client: the connection; the environment's when None.

        A request_id makes the call safe to retry: UNAVAILABLE is retried with the same one.
        """
        client = client or default_client()
        request = create_request(
            client.project,
            profile=profile,
            runtime=runtime,
            ttl=ttl,
            labels=labels,
            resources=resources,
            sandbox_id=sandbox_id,
            display_name=display_name,
            auto_pause_after=auto_pause_after,
        )
        info = client.call(client.stub.CreateSandbox, request, timeout=CREATE_TIMEOUT, retry=True)
        return cls(info, client, keep=keep)

    @classmethod
    def connect(cls, name: str, client: Client | None = None) -> Sandbox:
        """The existing sandbox ``name`` (an id in the client's project, or a full name)."""
        client = client or default_client()
        request = sandbox_pb2.GetSandboxRequest(name=sandbox_name(client.project, name))
        return cls(client.call(client.stub.GetSandbox, request, retry=True), client, keep=True)

    @classmethod
    def list(cls, filter: str = "", client: Client | None = None) -> Iterator[Sandbox]:
        """The project's sandboxes matching ``filter`` (e.g. ``state = RUNNING AND
        labels.team = "ml"``), oldest first, pages fetched as the iteration goes."""
        client = client or default_client()
        token = ""
        while True:
            response = client.call(
                client.stub.ListSandboxes,
                sandbox_pb2.ListSandboxesRequest(
                    parent=f"projects/{client.project}", filter=filter, page_token=token
                ),
                retry=True,
            )
            for info in response.sandboxes:
                yield cls(info, client, keep=True)
            token = response.next_page_token
            if not token:
                return

    def refresh(self) -> Sandbox:
        """Re-reads :attr:`info` from the server; returns self."""
        self.info = self.client.call(
            self.client.stub.GetSandbox, sandbox_pb2.GetSandboxRequest(name=self.name), retry=True
        )
        return self

    def update(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: Seconds | None = None,
        display_name: str | None = None,
        auto_pause_after: Seconds | None = None,
    ) -> Sandbox:
        """Changes the fields given (``labels`` replaces them all; ``ttl`` counts from now)."""
        request = update_request(
            self.name,
            labels=labels,
            ttl=ttl,
            display_name=display_name,
            auto_pause_after=auto_pause_after,
        )
        self.info = self.client.call(self.client.stub.UpdateSandbox, request)
        return self

    def delete(self, missing_ok: bool = False) -> None:
        """Deletes the sandbox and everything in it. NotFound if it is gone, unless
        ``missing_ok``."""
        request = sandbox_pb2.DeleteSandboxRequest(name=self.name, allow_missing=missing_ok)
        self.client.call(self.client.stub.DeleteSandbox, request)

    def pause(self) -> Sandbox:
        """Saves the sandbox to disk and stops it (see PauseSandbox); the next run resumes it."""
        request = sandbox_pb2.PauseSandboxRequest(name=self.name)
        self.info = self.client.call(self.client.stub.PauseSandbox, request, timeout=None)
        return self

    def resume(self) -> Sandbox:
        """Brings a PAUSED sandbox back to RUNNING (a run does it by itself)."""
        request = sandbox_pb2.ResumeSandboxRequest(name=self.name)
        self.info = self.client.call(
            self.client.stub.ResumeSandbox, request, timeout=CREATE_TIMEOUT
        )
        return self

    def run(
        self,
        code: str,
        files: Mapping[str, FileSource] | None = None,
        timeout: Seconds | None = None,
        on_stdout: TextCallback | None = None,
        on_stderr: TextCallback | None = None,
        on_output: OutputCallback | None = None,
    ) -> Execution:
        """Runs ``code`` like a notebook cell and returns what it produced.

        Args:
            code: Python source; the last expression's value is :attr:`Execution.result`.
            files: input files written to /workspace first: sandbox path -> bytes, str (UTF-8
                text), a local path (read in 1 MiB chunks as it is sent) or a binary file.
            timeout: seconds or a timedelta; the server's default when None.
            on_stdout, on_stderr: called with each piece of output as it arrives.
            on_output: called with each rich output (a :class:`Result`) as it arrives.

        A failure of the code is ``Execution.error``, not an exception. Interrupting this call
        (Ctrl-C) cancels the call, which interrupts the code.
        """
        assembler = ExecutionAssembler(on_stdout, on_stderr, on_output)
        call = self.client.stub.StreamExecuteCode(
            run_requests(self.name, code, timeout, files),
            timeout=run_deadline(timeout),
            metadata=self.client.metadata,
        )
        try:
            for event in call:
                assembler.add(event)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            call.cancel()  # a no-op once the call ended; else (an exception) it interrupts
        return assembler.result()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.keep:
            self.delete(missing_ok=True)
