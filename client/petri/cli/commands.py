"""The CLI's commands: each takes the Client and the parsed arguments and returns an exit code.
Server failures propagate as PetriError (app.main turns them into one line and a code)."""

from __future__ import annotations

import argparse
import base64
import io
import itertools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from petri import Client, Execution, FileInfo, NotFound, PetriError, Resources, Result, Sandbox
from petri.cli.errors import CliError, Exit, describe, exit_code_of, report
from petri.cli.formats import (
    cell,
    console,
    human_size,
    message_dict,
    print_json,
    printable,
    sandbox_details,
    sandbox_table,
    state_name,
)
from petri.cli.values import parse_duration, parse_labels, parse_size
from petri.v1 import sandbox_pb2

# NAME:path, NAME bare or full; a local path with a colon is written ./like:this.
_REMOTE = re.compile(r"^((?:projects/[^/:]+/sandboxes/)?[a-z][a-z0-9-]{0,62}):(.*)$", re.DOTALL)
_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/svg+xml": "svg",
    "text/html": "html",
    "application/json": "json",
    "text/markdown": "md",
    "text/latex": "tex",
    "text/plain": "txt",
}
_ERROR_EXITS = {
    "exception": Exit.EXCEPTION,
    "timeout": Exit.TIMEOUT,
    "interpreter_exited": Exit.INTERPRETER_EXITED,
    "cancelled": Exit.INTERRUPTED,
}
# Copies smaller than this finish before a bar would be worth drawing.
_PROGRESS_MIN_BYTES = 1 << 20


def _show(args: argparse.Namespace, info: sandbox_pb2.Sandbox) -> None:
    if args.json:
        print_json(message_dict(info))
    else:
        console().print(sandbox_details(info))


def create(client: Client, args: argparse.Namespace) -> int:
    resources = None
    if any(v is not None for v in (args.cpus, args.memory, args.disk, args.pids)):
        resources = Resources(
            cpus=args.cpus,
            memory_bytes=parse_size(args.memory) if args.memory else None,
            disk_bytes=parse_size(args.disk) if args.disk else None,
            pids=args.pids,
        )
    sandbox = Sandbox.create(
        profile=args.profile,
        runtime=args.runtime,
        ttl=parse_duration(args.ttl) if args.ttl else None,
        labels=parse_labels(args.label) or None,
        resources=resources,
        sandbox_id=args.sandbox_id,
        display_name=args.display_name,
        auto_pause_after=parse_duration(args.auto_pause_after) if args.auto_pause_after else None,
        keep=True,
        client=client,
    )
    _show(args, sandbox.info)
    return Exit.OK


def ls(client: Client, args: argparse.Namespace) -> int:
    if args.limit < 1 and not args.all:
        raise CliError("--limit must be at least 1")
    found = Sandbox.list(filter=args.filter, client=client)
    # One more than the limit says whether there are more, without fetching every page.
    taken = list(found if args.all else itertools.islice(found, args.limit + 1))
    truncated = not args.all and len(taken) > args.limit
    infos = [s.info for s in taken[: None if args.all else args.limit]]
    if args.json:
        print_json({"sandboxes": [message_dict(i) for i in infos], "truncated": truncated})
        return Exit.OK
    if infos:
        console().print(sandbox_table(infos))
    else:
        print("no sandboxes", file=sys.stderr)
    if truncated:
        print(f"(the first {args.limit}: --all lists every one)", file=sys.stderr)
    return Exit.OK


def get(client: Client, args: argparse.Namespace) -> int:
    _show(args, Sandbox.connect(args.name, client=client).info)
    return Exit.OK


def pause(client: Client, args: argparse.Namespace) -> int:
    sandbox = Sandbox.connect(args.name, client=client)
    sandbox.pause()
    return _state_change(args, sandbox)


def resume(client: Client, args: argparse.Namespace) -> int:
    sandbox = Sandbox.connect(args.name, client=client)
    sandbox.resume()
    return _state_change(args, sandbox)


def _state_change(args: argparse.Namespace, sandbox: Sandbox) -> int:
    if args.json:
        print_json(message_dict(sandbox.info))
    else:
        print(f"{sandbox.sandbox_id}: {state_name(sandbox.info)}")
    return Exit.OK


def rm(client: Client, args: argparse.Namespace) -> int:
    """Deletes each sandbox named; a failure on one does not stop the others."""
    status: int = Exit.OK
    deleted: list[str] = []
    for name in args.names:
        try:
            Sandbox.connect(name, client=client).delete()
        except NotFound as error:
            if not args.missing_ok:
                report(f"{name}: {describe(error)}")
                status = status or exit_code_of(error)
            continue
        except PetriError as error:
            report(f"{name}: {describe(error)}")
            status = status or exit_code_of(error)
            continue
        deleted.append(name)
        if not args.json:
            print(f"deleted {name}")
    if args.json:
        print_json({"deleted": deleted})
    return status


def profiles(client: Client, args: argparse.Namespace) -> int:
    found = client.profiles()
    if args.json:
        print_json({"image_profiles": [message_dict(p) for p in found]})
        return Exit.OK
    table = Table(box=None, pad_edge=False)
    for column in ("PROFILE", "DEFAULT", "PYTHON", "OS", "SIZE", "PACKAGES"):
        table.add_column(column)
    for profile in found:
        row = (
            profile.name.rsplit("/", 1)[-1],
            "yes" if profile.is_default else "",
            profile.python_version,
            profile.os,
            human_size(profile.size_bytes),
            str(len(profile.packages)),
        )
        table.add_row(*(cell(value) for value in row))
    console().print(table)
    return Exit.OK


# exec ---------------------------------------------------------------------------------------


def _read_code(args: argparse.Namespace) -> str:
    if args.file is not None and args.code is not None:
        raise CliError("give the code as an argument or with -f, not both")
    source = args.file if args.file is not None else args.code
    if source is None:
        raise CliError("no code: give it as an argument, with -f FILE, or '-' for stdin")
    if source == "-":
        return sys.stdin.read()
    if args.file is not None:
        return Path(args.file).read_text(encoding="utf-8")
    code: str = source
    return code


def _write_live(stream: TextIO) -> Callable[[str], None]:
    def write(text: str) -> None:
        stream.write(text)
        stream.flush()

    return write


class _Outputs:
    """Shows each rich output as it arrives: its text, or a summary of what it holds
    ('[image/png 12.3 KB]'); with a directory, writes every rendering there too."""

    def __init__(self, save_dir: Path | None, live: bool) -> None:
        self.save_dir = save_dir
        self.live = live
        self.saved: list[Path] = []

    def __call__(self, result: Result) -> None:
        if self.live:
            print(summarize(result), flush=True)
        if self.save_dir is not None:
            self.save(result)

    def save(self, result: Result) -> None:
        assert self.save_dir is not None
        self.save_dir.mkdir(parents=True, exist_ok=True)
        number = len({p.stem for p in self.saved}) + 1
        for mime in result.mime_types:
            if mime == "text/plain" and len(result.mime_types) > 1:
                continue  # the repr beside a figure says nothing the figure does not
            data = result.mime(mime)
            if data is None:
                continue
            path = self.save_dir / f"output-{number}.{_EXTENSIONS.get(mime, 'bin')}"
            path.write_bytes(data.encode() if isinstance(data, str) else data)
            self.saved.append(path)


def summarize(result: Result) -> str:
    """How a terminal shows a rich output: an image as '[image/png 12.3 KB]', anything else
    as its text (a DataFrame's text/plain, not its HTML), or a summary when it has none."""

    def sized(mime: str) -> str:
        data = result.mime(mime)
        size = len(data.encode() if isinstance(data, str) else data) if data is not None else 0
        return f"[{mime} {human_size(size)}]"

    images = [m for m in result.mime_types if m.startswith("image/")]
    if images:
        return " ".join(sized(m) for m in images)
    if result.text is not None:
        return result.text
    return " ".join(sized(m) for m in result.mime_types)


def _result_dict(result: Result) -> dict[str, Any]:
    data: dict[str, str] = {}
    for mime in result.mime_types:
        value = result.mime(mime)
        if isinstance(value, bytes):
            data[mime] = base64.b64encode(value).decode("ascii")
        elif value is not None:
            data[mime] = value
    return {"kind": result.kind, "data": data}


def exec_(client: Client, args: argparse.Namespace) -> int:
    code = _read_code(args)
    timeout = parse_duration(args.timeout) if args.timeout else None
    save_dir = Path(args.save_outputs) if args.save_outputs else None
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)  # a bad directory fails before the code runs
    outputs = _Outputs(save_dir, live=not args.json)
    sandbox = Sandbox.connect(args.name, client=client)
    live = not args.json
    execution = sandbox.run(
        code,
        timeout=timeout,
        on_stdout=_write_live(sys.stdout) if live else None,
        on_stderr=_write_live(sys.stderr) if live else None,
        on_output=outputs,
    )
    saved_files: dict[str, str] = {}
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        for file in execution.files:
            try:
                saved_files[file.path] = str(file.save(save_dir))
            except (ValueError, OSError) as refused:  # a hostile path from the sandbox
                print(
                    f"petri: not saved: {file.path[:200]!r}: {printable(str(refused))}",
                    file=sys.stderr,
                )
    error = execution.error
    status = Exit.OK if error is None else _ERROR_EXITS.get(error.kind, Exit.EXCEPTION)
    if args.json:
        print_json(
            {
                "stdout": execution.stdout,
                "stderr": execution.stderr,
                "results": [_result_dict(r) for r in execution.results],
                "error": None
                if error is None
                else {
                    "kind": error.kind,
                    "ename": error.ename,
                    "evalue": error.evalue,
                    "traceback": list(error.traceback),
                },
                "files": [
                    {
                        "path": f.path,
                        "size": f.size,
                        "mime_type": f.mime_type,
                        "saved_to": saved_files.get(f.path),
                    }
                    for f in execution.files
                ],
                "omitted_files": [
                    {"path": o.path, "size": o.size, "reason": o.reason}
                    for o in execution.omitted_files
                ],
                "execution_count": execution.execution_count,
                "duration_seconds": execution.duration.total_seconds(),
                "incarnation": execution.incarnation,
                "namespace_reset": execution.namespace_reset,
                "namespace_restored": execution.namespace_restored,
                "lost_names": [list(pair) for pair in execution.lost_names],
                "output_truncated": execution.output_truncated,
                "exit_code": int(status),
            }
        )
        return status
    _notes(execution, saved_files)
    if error is not None:
        if error.rendered:
            sys.stderr.write(error.rendered.rstrip("\n") + "\n")
        what = {
            "timeout": "the code timed out",
            "interpreter_exited": "the interpreter exited; its variables are gone",
            "cancelled": "the execution was cancelled",
        }.get(error.kind, f"the code raised {error.ename or 'an exception'}")
        print(f"petri: {what} (exit {int(status)})", file=sys.stderr, flush=True)
    return status


def _notes(execution: Execution, saved: dict[str, str]) -> None:
    """What happened besides the output, on stderr so that stdout stays the code's own."""
    notes = []
    if execution.namespace_reset:
        notes.append("the interpreter was restarted during this call: variables were lost")
    if execution.namespace_restored:
        lost = ", ".join(name for name, _ in execution.lost_names)
        notes.append("resumed from a checkpoint" + (f"; not restored: {lost}" if lost else ""))
    if execution.output_truncated:
        notes.append("output was truncated at the server's cap")
    for file in execution.files:
        where = f" -> {saved[file.path]}" if file.path in saved else ""
        notes.append(f"file {file.path} ({human_size(file.size)}){where}")
    for omitted in execution.omitted_files:
        what = omitted.path or "more files"
        notes.append(f"{what} changed but not returned: {omitted.reason}")
    for note in notes:
        print(f"petri: {printable(note)}", file=sys.stderr)
    sys.stderr.flush()


# cp -----------------------------------------------------------------------------------------


class _CountingReader(io.BufferedReader):
    def __init__(self, raw: io.RawIOBase, advance: Callable[[int], None]) -> None:
        super().__init__(raw, buffer_size=1 << 20)
        self._advance = advance

    def read(self, size: int | None = -1, /) -> bytes:
        data = super().read(size)
        self._advance(len(data))
        return data

    def read1(self, size: int = -1, /) -> bytes:
        data = super().read1(size)
        self._advance(len(data))
        return data

    def readinto(self, buffer: Any, /) -> int:
        count = super().readinto(buffer)
        self._advance(count)
        return count


class _CountingWriter(io.BufferedWriter):
    def __init__(self, raw: io.RawIOBase, advance: Callable[[int], None]) -> None:
        super().__init__(raw, buffer_size=1 << 20)
        self._advance = advance

    def write(self, data: Any, /) -> int:
        count = super().write(data)
        self._advance(count)
        return count


@contextmanager
def _progress(label: str, total: int | None, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr for a big copy when stderr is a terminal; else nothing."""
    if quiet or not sys.stderr.isatty() or (total is not None and total < _PROGRESS_MIN_BYTES):
        yield lambda _: None
        return
    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with bar:
        task = bar.add_task(escape(printable(label)), total=total)  # a path is not markup
        yield lambda n: bar.advance(task, n)


def _split_remote(argument: str) -> tuple[str, str] | None:
    match = _REMOTE.match(argument)
    return (match.group(1), match.group(2)) if match else None


def cp(client: Client, args: argparse.Namespace) -> int:
    source, dest = _split_remote(args.source), _split_remote(args.dest)
    if (source is None) == (dest is None):
        raise CliError("cp copies between a local path and NAME:path (exactly one of them)")
    if dest is not None:
        info = _upload(client, args.source, *dest, quiet=args.json)
    else:
        assert source is not None
        info = _download(client, *source, args.dest, quiet=args.json)
    if args.json:
        print_json(_file_dict(info))
    return Exit.OK


def _upload(client: Client, local: str, name: str, path: str, quiet: bool) -> FileInfo:
    if not path or path.endswith("/"):
        if local == "-":
            raise CliError("copying stdin needs a file name: NAME:path")
        path += Path(local).name
    sandbox = Sandbox.connect(name, client=client)
    if local == "-":
        return sandbox.files.write(path, sys.stdin.buffer)
    size = os.stat(local).st_size
    with (
        _progress(f"{local} -> {name}:{path}", size, quiet) as advance,
        _CountingReader(io.FileIO(local, "r"), advance) as reader,
    ):
        return sandbox.files.write(path, reader)


def _download(client: Client, name: str, path: str, local: str, quiet: bool) -> FileInfo:
    if not path:
        raise CliError("name the file to copy: NAME:path")
    sandbox = Sandbox.connect(name, client=client)
    if local == "-":
        return sandbox.files.download(path, sys.stdout.buffer)
    target = Path(local)
    if target.is_dir():
        target = target / PurePosixPath(path).name
    # Written beside the target and renamed at the end: a failed copy leaves no half file.
    partial = target.with_name(f".{target.name}.petri-partial")
    try:
        with (
            _progress(f"{name}:{path} -> {target}", None, quiet) as advance,
            _CountingWriter(io.FileIO(partial, "w"), advance) as writer,
        ):
            info = sandbox.files.download(path, writer)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    if not quiet:
        copied = f"{name}:{path} -> {target} ({human_size(target.stat().st_size)})"
        print(printable(copied), file=sys.stderr)
    return info


def _file_dict(info: FileInfo) -> dict[str, Any]:
    modified = info.modify_time
    return {
        "path": info.path,
        "type": info.type,
        "size": info.size,
        "mode": info.mode,
        "modify_time": modified.isoformat() if isinstance(modified, datetime) else modified,
        "mime_type": info.mime_type,
    }
