"""petri: isolated, stateful Python sandboxes for AI agents.

    import petri

    with petri.Sandbox.create() as sb:
        print(sb.run("1 + 1").text)

Names are loaded on first use (PEP 562), so that ``petri.v1`` (the generated stubs), which the
service itself imports, does not load the SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from petri import errors as errors
    from petri.sdk.async_sandbox import AsyncSandbox as AsyncSandbox
    from petri.sdk.connection import AsyncClient as AsyncClient
    from petri.sdk.connection import Client as Client
    from petri.sdk.errors import AlreadyExists as AlreadyExists
    from petri.sdk.errors import Cancelled as Cancelled
    from petri.sdk.errors import DeadlineExceeded as DeadlineExceeded
    from petri.sdk.errors import Deleted as Deleted
    from petri.sdk.errors import Expired as Expired
    from petri.sdk.errors import FailedPrecondition as FailedPrecondition
    from petri.sdk.errors import InvalidArgument as InvalidArgument
    from petri.sdk.errors import NotFound as NotFound
    from petri.sdk.errors import OutcomeUnknown as OutcomeUnknown
    from petri.sdk.errors import PermissionDenied as PermissionDenied
    from petri.sdk.errors import PetriError as PetriError
    from petri.sdk.errors import QuotaExceeded as QuotaExceeded
    from petri.sdk.errors import ResourceExhausted as ResourceExhausted
    from petri.sdk.errors import Terminated as Terminated
    from petri.sdk.errors import Unauthenticated as Unauthenticated
    from petri.sdk.errors import Unavailable as Unavailable
    from petri.sdk.execution import Execution as Execution
    from petri.sdk.execution import ExecutionError as ExecutionError
    from petri.sdk.execution import OmittedFile as OmittedFile
    from petri.sdk.execution import OutputFile as OutputFile
    from petri.sdk.execution import Result as Result
    from petri.sdk.files import AsyncFiles as AsyncFiles
    from petri.sdk.files import FileInfo as FileInfo
    from petri.sdk.files import Files as Files
    from petri.sdk.resources import Resources as Resources
    from petri.sdk.sandbox import Sandbox as Sandbox

_ERRORS = [
    "AlreadyExists",
    "Cancelled",
    "DeadlineExceeded",
    "Deleted",
    "Expired",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutcomeUnknown",
    "PermissionDenied",
    "PetriError",
    "QuotaExceeded",
    "ResourceExhausted",
    "Terminated",
    "Unauthenticated",
    "Unavailable",
]

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Sandbox": "petri.sdk.sandbox",
    "AsyncSandbox": "petri.sdk.async_sandbox",
    "Client": "petri.sdk.connection",
    "AsyncClient": "petri.sdk.connection",
    "Execution": "petri.sdk.execution",
    "ExecutionError": "petri.sdk.execution",
    "OmittedFile": "petri.sdk.execution",
    "OutputFile": "petri.sdk.execution",
    "Result": "petri.sdk.execution",
    "FileInfo": "petri.sdk.files",
    "Files": "petri.sdk.files",
    "AsyncFiles": "petri.sdk.files",
    "Resources": "petri.sdk.resources",
    **dict.fromkeys(_ERRORS, "petri.sdk.errors"),
}

__all__ = sorted([*_EXPORTS, "errors"])


def __getattr__(name: str) -> Any:
    if name == "errors":  # the submodule petri.errors, on `petri.errors.NotFound`
        return importlib.import_module("petri.errors")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'petri' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, "errors"])
