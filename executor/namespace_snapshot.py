"""Saves a worker's namespace to bytes and restores it in a new worker (worker side only).

Each global is pickled on its own (cloudpickle), so one that cannot be saved costs only
itself; modules are recorded by name and re-imported. The saved bytes are produced by user
code and are hostile: only a worker, which runs that user's code anyway, ever unpickles them.
"""

import contextlib
import importlib
import io
import pickle
import types
from typing import Any

from petri.v1 import execution_pb2, executor_pb2

# Names the worker itself puts in the namespace: a new worker has its own.
_OWN_NAMES = frozenset(("__builtins__", "__name__"))
MAX_REASON_CHARS = 300
MAX_LOST_NAMES = 1000
# Counted against the limit for each entry besides its name and bytes: protobuf's tags and
# lengths, so that a million tiny values cannot make the snapshot outgrow its frame.
ENTRY_OVERHEAD = 16


class _TooLarge(Exception):
    pass


class _Unsaved(Exception):
    """A value refused on purpose; its message is the reason."""


class _BoundedBuffer:
    """A pickle's output that stops it as soon as it passes its share of the limit, so that
    a huge value is not held in memory whole just to be refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    def write(self, chunk: bytes) -> int:
        if len(self.data) + len(chunk) > self.limit:
            raise _TooLarge
        self.data += chunk
        return len(chunk)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Unsaved):
        return str(exc)
    try:
        text = f"{type(exc).__name__}: {exc}"
    except Exception:  # an exception whose __str__ raises
        text = type(exc).__name__
    return text[:MAX_REASON_CHARS]


def _lost(name: str, reason: str) -> execution_pb2.LostName:
    return execution_pb2.LostName(name=_text(name[:MAX_REASON_CHARS]), reason=_text(reason))


def _text(text: str) -> str:
    """Text protobuf accepts: a lone surrogate (a name or message may hold one) escaped."""
    return text.encode("utf-8", "backslashreplace").decode()


def import_pickler() -> None:
    """Imports cloudpickle before /workspace is on sys.path: a user's cloudpickle.py there
    must not take its place (restoring imports it too, by name)."""
    with contextlib.suppress(ImportError):  # a snapshot then reports it, name by name
        import cloudpickle  # noqa: F401


def save(
    namespace: dict[str, Any], execution_count: int, limit_bytes: int
) -> executor_pb2.WorkerSnapshot:
    """The namespace as a SavedNamespace, and the names that could not be saved."""
    pickler: Any = pickle.Pickler  # without cloudpickle, session functions are lost
    with contextlib.suppress(ImportError):  # imported here: only the worker needs it
        import cloudpickle

        pickler = cloudpickle.Pickler
    saved = executor_pb2.SavedNamespace(execution_count=execution_count)
    lost: list[execution_pb2.LostName] = []
    left = max(limit_bytes, 0)
    beyond = f"beyond the size limit ({limit_bytes} bytes in all)"
    # What __reduce__ methods print belongs to no execution.
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        for name, value in list(namespace.items()):
            if name in _OWN_NAMES:
                continue
            if not isinstance(name, str):  # globals()[1] = ... is possible, and unnamed
                lost.append(_lost(_clipped_repr(name), "not a name (not a string)"))
                continue
            try:
                left -= _save_one(saved, name, value, left, pickler)
            except _TooLarge:
                lost.append(_lost(name, beyond))
            except BaseException as exc:  # user code's __reduce__ may raise anything
                lost.append(_lost(name, _reason(exc)))
    return executor_pb2.WorkerSnapshot(saved_namespace=saved.SerializeToString(), lost=_few(lost))


def _save_one(
    saved: executor_pb2.SavedNamespace, name: str, value: Any, left: int, pickler: Any
) -> int:
    """Adds one global to `saved`; the bytes it takes of the limit."""
    name.encode()  # a name protobuf would refuse (a lone surrogate) fails here, alone
    if isinstance(value, types.ModuleType):
        module = str(value.__name__)
        size = ENTRY_OVERHEAD + len(name) + len(module)
        if size > left:
            raise _TooLarge
        saved.modules.add(name=name, module=module)
        return size
    if isinstance(value, io.IOBase):  # cloudpickle would keep a reader's contents only
        raise _Unsaved("an open file")
    buffer = _BoundedBuffer(left - ENTRY_OVERHEAD - len(name))
    pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    saved.values.add(name=name, pickled=bytes(buffer.data))
    return ENTRY_OVERHEAD + len(name) + len(buffer.data)


def _clipped_repr(value: Any) -> str:
    try:
        return repr(value)[:MAX_REASON_CHARS]
    except Exception:
        return f"<a {type(value).__name__}>"


def _few(lost: list[execution_pb2.LostName]) -> list[execution_pb2.LostName]:
    """At most MAX_LOST_NAMES entries: the reply must fit in one frame whatever the namespace."""
    if len(lost) <= MAX_LOST_NAMES:
        return lost
    more = len(lost) - MAX_LOST_NAMES + 1
    return [*lost[: MAX_LOST_NAMES - 1], _lost("...", f"and {more} more names not kept")]


def restore(namespace: dict[str, Any], blob: bytes) -> executor_pb2.WorkerRestored:
    """Puts a saved namespace's globals into `namespace`: what could not be restored is
    listed, the rest kept."""
    try:
        saved = executor_pb2.SavedNamespace.FromString(blob)
    except Exception as exc:  # protobuf's DecodeError, or worse on hostile bytes
        unreadable = _lost("*", f"unreadable snapshot: {_reason(exc)}")
        return executor_pb2.WorkerRestored(lost=[unreadable])
    lost: list[execution_pb2.LostName] = []
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        for module in saved.modules:
            try:
                namespace[module.name] = importlib.import_module(module.module)
            except BaseException as exc:
                lost.append(_lost(module.name, f"cannot import {module.module}: {_reason(exc)}"))
        for value in saved.values:
            if value.name in _OWN_NAMES:  # never saved: the new worker's own stay
                continue
            try:
                namespace[value.name] = pickle.loads(value.pickled)
            except BaseException as exc:
                lost.append(_lost(value.name, _reason(exc)))
    lost = _few(lost)
    for name in list(namespace):
        with contextlib.suppress(Exception):  # a hostile class's __module__ may raise
            namespace[name] = _rebound(namespace[name], namespace)
    return executor_pb2.WorkerRestored(execution_count=saved.execution_count, lost=lost)


def _rebound(value: Any, namespace: dict[str, Any]) -> Any:
    """A session's function (or its class's methods) reads its globals from the namespace
    again: unpickled, each has a private copy of the globals it used when it was saved."""
    if isinstance(value, types.FunctionType):
        return _rebound_function(value, namespace)
    if isinstance(value, type) and value.__module__ == "__main__":
        for attr, member in list(vars(value).items()):
            rebound: Any = None
            if isinstance(member, types.FunctionType):
                rebound = _rebound_function(member, namespace)
            elif isinstance(member, staticmethod | classmethod) and isinstance(
                member.__func__, types.FunctionType
            ):
                function = _rebound_function(member.__func__, namespace)
                if function is not member.__func__:
                    rebound = type(member)(function)
            if rebound is not None and rebound is not member:
                with contextlib.suppress(Exception):  # a metaclass may refuse
                    setattr(value, attr, rebound)
    return value


def _rebound_function(function: types.FunctionType, namespace: dict[str, Any]) -> Any:
    if function.__module__ != "__main__" or function.__globals__ is namespace:
        return function
    rebound = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    rebound.__qualname__ = function.__qualname__
    rebound.__doc__ = function.__doc__
    rebound.__module__ = function.__module__
    rebound.__dict__.update(function.__dict__)
    with contextlib.suppress(Exception):
        rebound.__annotations__ = function.__annotations__
    return rebound
