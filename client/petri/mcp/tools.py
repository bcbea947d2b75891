"""The MCP tools: run Python and handle files in the session's petri sandbox.

What each tool returns is written for a model: plain text sections, images as image content."""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ImageContent, TextContent, ToolAnnotations

from petri import AsyncSandbox, Deleted, Execution, Expired, NotFound, PetriError, Terminated
from petri.mcp.sessions import Sessions

T = TypeVar("T")

# Bounds on what one tool result puts into a model's context.
MAX_TEXT_CHARS = 50_000
MAX_IMAGE_BYTES = 5 << 20
MAX_DOWNLOAD_TEXT_BYTES = 1 << 20
MAX_DOWNLOAD_BINARY_BYTES = 256 << 10
MAX_LISTED_FILES = 1000
# A run's images and text all go into the model's context: a sandbox printing thousands of
# figures or files must not flood it (the server caps bytes, not counts).
MAX_IMAGES = 10
MAX_NAMED_FILES = 100
MAX_RESULT_CHARS = 4 * MAX_TEXT_CHARS
# What a model provider accepts as an image: the magic bytes of each type. A sandbox can
# label any bytes "image/png"; a bad image can make the provider refuse the whole turn.
_MAGIC = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
}
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
_SANDBOX_GONE_REASONS = {"SANDBOX_NOT_FOUND", "SANDBOX_EXPIRED", "SANDBOX_DELETED"}

INSTRUCTIONS = """\
Tools to run Python in an isolated, stateful sandbox (a petri sandbox): no network, its own
files under /workspace (the working directory). The sandbox is created on the first call and
kept for this session: variables, imports and files persist from one call to the next, until
reset() or until it has not been used for its time to live."""

RUN_PYTHON = """\
Run Python code in the session's sandbox, like a Jupyter cell, and return what it produced.

State persists between calls: variables, functions and imports defined here stay defined for
the next run_python call, and files written under /workspace (the working directory) stay
there. The value of the last expression is returned (as in a notebook), as well as stdout,
stderr, and every display() call or matplotlib figure (figures come back as PNG images).
If the code raises, the result is an error holding the traceback; fix the code and call
again (the state from before the failing line is kept). The sandbox has no network access:
install nothing, use what is there (numpy, pandas, matplotlib...). timeout_seconds interrupts
long-running code (the server's default applies when omitted); a timeout may restart the
interpreter, and the result then says that variables were lost (files are kept)."""

UPLOAD_FILE = """\
Write a file into the sandbox's /workspace (path relative to it, e.g. "data/input.csv";
parent directories are created, an existing file is replaced). content is the file's text
with encoding "utf-8" (the default), or its bytes in base64 with encoding "base64". The
code run by run_python can then open it by that path."""

DOWNLOAD_FILE = """\
Read a file from the sandbox's /workspace (path relative to it). A text file comes back as
its text (up to 1 MiB); a PNG, JPEG, GIF or WebP image as an image; any other binary file as
base64 text (up to 256 KiB: summarize bigger files with run_python instead)."""

LIST_FILES = """\
List the files and directories under a directory of the sandbox's /workspace (path relative
to it; "" is /workspace itself), with their sizes. recursive lists everything beneath it."""

RESET = """\
Delete this session's sandbox with all its variables and files. The next call starts a fresh,
empty sandbox. Use it to start over from a clean state."""


def _cap(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [{len(text) - limit} more characters cut]"


def _is_image(mime_type: str, data: bytes) -> bool:
    if mime_type == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    return data.startswith(_MAGIC.get(mime_type, ()))


def _named(paths: list[str]) -> str:
    listed = ", ".join(paths[:MAX_NAMED_FILES])
    more = len(paths) - MAX_NAMED_FILES
    return listed + (f" ... and {more} more" if more > 0 else "")


def _size(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KiB"


def render_execution(execution: Execution) -> CallToolResult:
    """An execution as text sections (stdout, stderr, results, error, files) plus images."""
    sections: list[str] = []
    images: list[ImageContent] = []
    if execution.namespace_restored:
        lost = ", ".join(f"{name} ({why})" for name, why in execution.lost_names)
        sections.append(
            "note: the sandbox was resumed from a checkpoint before this call"
            + (f"; these variables were not restored: {lost}" if lost else "")
        )
    if execution.namespace_reset:
        sections.append(
            "note: the interpreter was restarted during this call: all variables were lost "
            "(files under /workspace are kept)"
        )
    if execution.stdout:
        sections.append("stdout:\n" + _cap(execution.stdout))
    if execution.stderr:
        sections.append("stderr:\n" + _cap(execution.stderr))
    for result in execution.results:
        before = len(images)
        for mime in ("image/png", "image/jpeg"):
            data = result.mime(mime)
            if isinstance(data, bytes):
                if len(data) > MAX_IMAGE_BYTES:
                    sections.append(f"[{mime} of {_size(len(data))} left out: too big]")
                    continue
                if not _is_image(mime, data):
                    sections.append(f"[{mime} left out: its data is not a valid {mime} image]")
                    continue
                if len(images) >= MAX_IMAGES:
                    sections.append(f"[{mime} left out: only {MAX_IMAGES} images are attached]")
                    continue
                images.append(
                    ImageContent(
                        type="image", data=base64.b64encode(data).decode("ascii"), mime_type=mime
                    )
                )
        if len(images) > before:
            sections.append(f"[{result.kind}: an image, attached]")
        elif result.text is not None:
            title = "result" if result.kind == "result" else "display"
            sections.append(f"{title}:\n" + _cap(result.text))
    if execution.output_truncated:
        sections.append("note: the output was cut at the server's cap")
    error = execution.error
    if error is not None:
        what = {
            "timeout": "error: the code timed out",
            "interpreter_exited": "error: the interpreter exited; its variables are gone",
            "cancelled": "error: the execution was cancelled",
        }.get(error.kind, f"error: {error.ename}: {error.evalue}")
        detail = _cap(error.rendered) if error.rendered else ""
        sections.append(what + ("\n" + detail if detail else ""))
    if execution.files:
        listed = _named([f"{f.path} ({_size(f.size)})" for f in execution.files])
        sections.append("files created or changed: " + listed)
    if execution.omitted_files:
        names = _named([f"{o.path or 'more'} ({o.reason})" for o in execution.omitted_files])
        sections.append("also changed (too big to return): " + names)
    if not sections:
        sections.append("(no output)")
    content: list[TextContent | ImageContent] = [
        TextContent(type="text", text=_cap("\n\n".join(sections), MAX_RESULT_CHARS))
    ]
    content.extend(images)
    return CallToolResult(content=list(content), is_error=error is not None)


def check_timeout(timeout_seconds: float | None) -> None:
    """A model's timeout_seconds: positive and finite (JSON schema lets "NaN" through)."""
    if timeout_seconds is not None and not 0 < timeout_seconds < math.inf:
        raise ToolError("timeout_seconds must be a positive number of seconds")


def session_key(ctx: Context) -> str | None:
    """The MCP session the call belongs to: the Streamable HTTP session id, or None on stdio
    and for clients of the stateless protocol (2026-07-28), which share the server's one."""
    headers = ctx.headers
    if headers is None:
        return None
    value = headers.get("mcp-session-id")
    return value or None


class _Capped(io.BytesIO):
    """A download destination that refuses more than `limit` bytes: sandbox files are
    hostile, and a model's context is small."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: Any, /) -> int:
        if self.tell() + len(data) > self.limit:
            raise _TooBig(self.limit)
        return super().write(data)


class _TooBig(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def register(server: MCPServer[Any], sessions: Sessions) -> None:
    """Adds the tools to `server`, each using the sandbox of the caller's session."""

    async def call(ctx: Context, action: Callable[[AsyncSandbox], Awaitable[T]]) -> T:
        key = session_key(ctx)
        sandbox: AsyncSandbox | None = None
        try:
            sandbox = await sessions.get(key)
            return await action(sandbox)
        except PetriError as error:
            raise ToolError(_explain(error, sessions, key, sandbox)) from error

    async def run_python(
        code: str, ctx: Context, timeout_seconds: float | None = None
    ) -> CallToolResult:
        check_timeout(timeout_seconds)

        async def run(sandbox: AsyncSandbox) -> Execution:
            return await sandbox.run(code, timeout=timeout_seconds)

        return render_execution(await call(ctx, run))

    async def upload_file(path: str, content: str, ctx: Context, encoding: str = "utf-8") -> str:
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as error:
                raise ToolError(f"content is not valid base64: {error}") from error
        elif encoding == "utf-8":
            data = content.encode("utf-8")
        else:
            raise ToolError('encoding is "utf-8" or "base64"')

        async def write(sandbox: AsyncSandbox) -> str:
            info = await sandbox.files.write(path, data)
            return f"wrote /workspace/{info.path} ({_size(info.size)})"

        return await call(ctx, write)

    async def download_file(path: str, ctx: Context) -> CallToolResult:
        async def read(sandbox: AsyncSandbox) -> CallToolResult:
            sink = _Capped(MAX_DOWNLOAD_TEXT_BYTES)
            try:
                info = await sandbox.files.download(path, sink)
            except _TooBig as error:
                raise ToolError(
                    f"{path} is larger than {_size(error.limit)}: read or summarize it with "
                    "run_python instead"
                ) from None
            return _file_content(path, info.mime_type, sink.getvalue())

        return await call(ctx, read)

    async def list_files(ctx: Context, path: str = "", recursive: bool = False) -> str:
        async def listing(sandbox: AsyncSandbox) -> str:
            # One more than shown says whether there are more, without listing them all.
            files = await sandbox.files.list(path, recursive=recursive, limit=MAX_LISTED_FILES + 1)
            lines = []
            for info in files[:MAX_LISTED_FILES]:
                if info.type == "directory":
                    lines.append(f"{info.path}/")
                elif info.type == "symlink":
                    lines.append(f"{info.path} (symlink)")
                else:
                    lines.append(f"{info.path}  {_size(info.size)}")
            if len(files) > MAX_LISTED_FILES:
                lines.append(f"... and more: only the first {MAX_LISTED_FILES} are listed")
            where = f"/workspace/{path}".rstrip("/")
            return "\n".join(lines) if lines else f"{where} is empty"

        return await call(ctx, listing)

    async def reset(ctx: Context) -> str:
        key = session_key(ctx)
        try:
            had = await sessions.reset(key)
        except PetriError as error:
            raise ToolError(_explain(error, sessions, key, None)) from error
        if had:
            return "the sandbox was deleted; the next call starts a fresh, empty one"
        return "there was no sandbox yet; the next call starts a fresh, empty one"

    readonly = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    server.add_tool(
        run_python,
        description=RUN_PYTHON,
        annotations=ToolAnnotations(open_world_hint=False),
        structured_output=False,
    )
    server.add_tool(
        upload_file,
        description=UPLOAD_FILE,
        annotations=ToolAnnotations(idempotent_hint=True, open_world_hint=False),
        structured_output=False,
    )
    server.add_tool(
        download_file, description=DOWNLOAD_FILE, annotations=readonly, structured_output=False
    )
    server.add_tool(
        list_files, description=LIST_FILES, annotations=readonly, structured_output=False
    )
    server.add_tool(
        reset,
        description=RESET,
        annotations=ToolAnnotations(destructive_hint=True, open_world_hint=False),
        structured_output=False,
    )


def _file_content(path: str, mime_type: str, data: bytes) -> CallToolResult:
    header = f"/workspace/{path}: {mime_type or 'unknown type'}, {_size(len(data))}"
    if mime_type in _IMAGE_TYPES and _is_image(mime_type, data):
        image = ImageContent(
            type="image", data=base64.b64encode(data).decode("ascii"), mime_type=mime_type
        )
        return CallToolResult(content=[TextContent(type="text", text=header), image])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:
        return CallToolResult(content=[TextContent(type="text", text=text)])
    if len(data) > MAX_DOWNLOAD_BINARY_BYTES:
        raise ToolError(
            f"{header}: a binary file larger than {_size(MAX_DOWNLOAD_BINARY_BYTES)}; "
            "inspect it with run_python instead"
        )
    encoded = base64.b64encode(data).decode("ascii")
    return CallToolResult(
        content=[TextContent(type="text", text=f"{header}, binary; base64:\n{encoded}")]
    )


def _explain(
    error: PetriError, sessions: Sessions, key: str | None, sandbox: AsyncSandbox | None
) -> str:
    """A petri failure as a tool error a model can act on. The call's sandbox, if it is gone
    (expired, deleted, or its runtime died), is forgotten, so that the next call gets a fresh
    one."""
    message = f"petri: {error.message} ({error.code.name})"
    gone = isinstance(error, Expired | Deleted | Terminated) or (
        isinstance(error, NotFound) and error.reason in _SANDBOX_GONE_REASONS
    )
    if gone:
        if sandbox is not None:
            sessions.forget(key, sandbox)
        return (
            message + "\nThe sandbox is gone with its variables and files; the next call "
            "starts a fresh, empty one."
        )
    return message
