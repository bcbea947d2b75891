"""The CLI's exit codes, one per class of failure (docs/cli.md lists them), and how a failure
becomes one line on stderr."""

from __future__ import annotations

import sys
from enum import IntEnum

import grpc

from petri import PetriError
from petri.cli.formats import printable


class Exit(IntEnum):
    OK = 0
    EXCEPTION = 1  # exec: the code raised an exception
    USAGE = 2  # bad command line (argparse uses 2 as well)
    NOT_FOUND = 3  # no such sandbox or file (it may have expired or been deleted)
    ALREADY_EXISTS = 4
    INVALID_ARGUMENT = 5  # the server refused a value
    FAILED_PRECONDITION = 6  # the sandbox cannot do that in its state (e.g. TERMINATED)
    RESOURCE_EXHAUSTED = 7  # a size limit or a quota
    AUTH = 8  # UNAUTHENTICATED or PERMISSION_DENIED
    UNAVAILABLE = 9  # the service cannot be reached, or a deadline passed
    SERVER = 10  # any other server failure (UNKNOWN: the code may have run)
    LOCAL_IO = 11  # a local file could not be read or written
    INTERRUPTED = 130  # Ctrl-C, or exec: the execution was cancelled
    TIMEOUT = 124  # exec: the code ran past its timeout (as timeout(1))
    INTERPRETER_EXITED = 137  # exec: the interpreter died (os._exit, a crash, out of memory)
    BROKEN_PIPE = 141  # stdout's reader went away (128 + SIGPIPE, as a shell reports it)


_BY_STATUS: dict[grpc.StatusCode, Exit] = {
    grpc.StatusCode.NOT_FOUND: Exit.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: Exit.ALREADY_EXISTS,
    grpc.StatusCode.INVALID_ARGUMENT: Exit.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE: Exit.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION: Exit.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Exit.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED: Exit.AUTH,
    grpc.StatusCode.PERMISSION_DENIED: Exit.AUTH,
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.UNAVAILABLE,
    grpc.StatusCode.CANCELLED: Exit.INTERRUPTED,
}


class CliError(Exception):
    """A failure the CLI itself detects: its message is printed, its code returned."""

    def __init__(self, message: str, code: Exit = Exit.USAGE) -> None:
        super().__init__(message)
        self.code = code


def exit_code_of(error: PetriError) -> Exit:
    return _BY_STATUS.get(error.code, Exit.SERVER)


def one_line(text: str, limit: int = 2000) -> str:
    """The server's words on one bounded line: they are shown, not trusted."""
    flat = printable(" ".join(text.split()))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def report(message: str) -> None:
    print(f"petri: error: {one_line(message)}", file=sys.stderr, flush=True)


def describe(error: PetriError) -> str:
    name = error.code.name if isinstance(error.code, grpc.StatusCode) else "UNKNOWN"
    return f"{error.message or name} ({name})"
