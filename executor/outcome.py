"""What an execution's result says when it did not simply complete: why the worker stopped,
how the code was interrupted, and which files were left out."""

import signal

from executor.workspace import Unscanned
from petri.v1 import execution_pb2

# Omitted files listed in a result (the rest are counted in one more entry, with no path and
# the count as its size):
# a result must stay well within gRPC's message limit whatever the code left in /workspace.
MAX_OMITTED_FILES = 1000

_STATE_LOST = (
    "variables and imports are lost and a fresh interpreter was started; "
    "files in /workspace are kept"
)

# Written to the execution's stderr when the worker is stopped for the processes it left.
PROCESS_PRESSURE_NOTE = (
    "\n[petri: this code left so many processes running that the sandbox reached "
    "half its process limit: the interpreter and every process it started were "
    "stopped; variables are lost, files are kept]\n"
)

Kind = execution_pb2.ExecutionError


def process_limit_error() -> execution_pb2.ExecutionError:
    return execution_pb2.ExecutionError(
        kind=Kind.INTERPRETER_EXITED,
        ename="ProcessLimit",
        evalue=f"the code left too many processes running; {_STATE_LOST}",
    )


def worker_gone_error(
    returncode: int | None,
    killed: bool,
    stop_reason: "execution_pb2.ExecutionError.Kind.ValueType | None",
    timeout: float | None,
    grace: float,
    protocol_error: str,
) -> execution_pb2.ExecutionError:
    """Why the worker is gone: it broke the protocol, ignored the interrupt, or died."""
    if protocol_error:
        return execution_pb2.ExecutionError(
            kind=Kind.INTERPRETER_EXITED,
            ename="InterpreterExited",
            evalue=f"the interpreter broke the executor protocol ({protocol_error}) and was "
            f"killed; {_STATE_LOST}",
        )
    if killed and stop_reason == Kind.TIMEOUT:
        return execution_pb2.ExecutionError(
            kind=Kind.TIMEOUT,
            ename="TimeoutError",
            evalue=f"the code ran past its {timeout:g} s timeout and did not stop within "
            f"{grace:g} s of an interrupt, so the interpreter was killed; {_STATE_LOST}",
        )
    if killed and stop_reason == Kind.CANCELLED:
        return execution_pb2.ExecutionError(
            kind=Kind.CANCELLED,
            ename="CancelledError",
            evalue=f"the call was cancelled and the code did not stop within {grace:g} s of an "
            f"interrupt, so the interpreter was killed; {_STATE_LOST}",
        )
    return execution_pb2.ExecutionError(
        kind=Kind.INTERPRETER_EXITED,
        ename="InterpreterExited",
        evalue=f"the interpreter {_describe_exit(returncode)} during the execution; {_STATE_LOST}",
    )


def interrupted_error(
    error: execution_pb2.ExecutionError,
    stop_reason: "execution_pb2.ExecutionError.Kind.ValueType",
    timeout: float | None,
) -> execution_pb2.ExecutionError:
    """The KeyboardInterrupt our SIGINT raised, said as what caused it."""
    if stop_reason == Kind.TIMEOUT:
        ename = "TimeoutError"
        evalue = (
            f"the code ran past its {timeout:g} s timeout and was interrupted; variables are kept"
        )
    else:
        ename = "CancelledError"
        evalue = "the call was cancelled and the code was interrupted; variables are kept"
    return execution_pb2.ExecutionError(
        kind=stop_reason, ename=ename, evalue=evalue, traceback=error.traceback
    )


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "stopped"
    if returncode < 0:
        try:
            return f"was killed by signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


def omitted_files(
    problems: list[Unscanned], unsent: list[execution_pb2.OmittedFile]
) -> list[execution_pb2.OmittedFile]:
    """The result's omitted files: what the scans could not look at, then the files not sent;
    at most MAX_OMITTED_FILES, plus one entry that counts the rest."""
    omitted = [
        execution_pb2.OmittedFile(path=problem.path, reason=problem.reason)
        for problem in problems
        if not problem.unlisted
    ]
    omitted += unsent
    more = sum(problem.unlisted for problem in problems)
    more += max(0, len(omitted) - MAX_OMITTED_FILES)
    del omitted[MAX_OMITTED_FILES:]
    if more:  # the summary entry: an empty path, and the count in size
        omitted.append(
            execution_pb2.OmittedFile(
                size=more, reason=f"{more} more omitted entries are not listed"
            )
        )
    return omitted
