"""Saves a worker's namespace to bytes and restores it in a new worker (worker side only).

Each global is pickled on its own (cloudpickle), so one that cannot be saved costs only
itself; modules are recorded by name and re-imported. The saved bytes are a stream of entries
(executor.proto's SavedEntry), sent and received in chunks: a value is never held twice
whole, and no frame needs to hold one. They are produced by user code and are hostile: only a
worker, which runs that user's code anyway, ever unpickles them.
"""

import collections
import contextlib
import importlib
import io
import pickle
import struct
import types
from collections.abc import Callable
from typing import Any

from petri.protocol import CHECKPOINT_CHUNK_BYTES
from petri.v1 import execution_pb2, executor_pb2

# Names the worker itself puts in the namespace: a new worker has its own.
_OWN_NAMES = frozenset(("__builtins__", "__name__"))
MAX_REASON_CHARS = 300
MAX_LOST_NAMES = 1000
# Counted against the limit for each entry besides its name's bytes and its pickle: the entry's
# length prefix and protobuf's tags and lengths, so that the bytes sent never pass the limit.
ENTRY_OVERHEAD = 32
_LENGTH = struct.Struct(">I")
# An entry (a name and sizes) is small; a longer one is garbage. Names (and modules' names)
# and out-of-band buffers per value are bounded so that every entry saved fits.
MAX_ENTRY_BYTES = 64 * 1024
MAX_NAME_BYTES = 4096
MAX_OUT_OF_BAND = 1024
# Counted against the limit for each out-of-band buffer: its size in the entry.
BUFFER_OVERHEAD = 10


class _TooLarge(Exception):
    pass


class _Unsaved(Exception):
    """A value refused on purpose; its message is the reason."""


class _BoundedBuffer:
    """A pickle's output that stops it as soon as it passes its share of the limit, so that
    a huge value is not held in memory whole just to be refused. Large contiguous buffers
    (numpy's, so pandas' too) stay out of band: views of the value's own memory, written
    out from there, never copied whole."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.data = bytearray()
        self.out_of_band: list[memoryview] = []

    def _charge(self, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise _TooLarge

    def write(self, chunk: Any) -> int:
        view = memoryview(chunk).cast("B")  # any buffer: protocol 5 may write a PickleBuffer
        self._charge(len(view))
        self.data += view
        return len(view)

    def keep(self, buffer: pickle.PickleBuffer) -> bool:
        """The pickler's buffer_callback: False keeps the buffer out of band."""
        if len(self.out_of_band) >= MAX_OUT_OF_BAND:
            return True
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: in band (pickle copies it)
            return True
        self._charge(len(view) + BUFFER_OVERHEAD)
        self.out_of_band.append(view)
        return False


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


class ChunkWriter:
    """Cuts the saved stream into chunks of CHECKPOINT_CHUNK_BYTES for `emit`, copying a large
    pickle only a chunk at a time."""

    def __init__(self, emit: Callable[[bytes], None]) -> None:
        self._emit = emit
        self._pending = bytearray()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        self.written += len(view)
        while view:
            take = CHECKPOINT_CHUNK_BYTES - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == CHECKPOINT_CHUNK_BYTES:
                self.flush()

    def flush(self) -> None:
        if self._pending:
            chunk, self._pending = bytes(self._pending), bytearray()
            self._emit(chunk)


def save(
    namespace: dict[str, Any], limit_bytes: int, emit: Callable[[bytes], None]
) -> executor_pb2.WorkerSnapshot:
    """Sends the namespace to `emit` in chunks (modules first: values may need them); gives the
    names that could not be saved and the bytes sent."""
    pickler: Any = pickle.Pickler  # without cloudpickle, session functions are lost
    with contextlib.suppress(ImportError):  # imported here: only the worker needs it
        import cloudpickle

        pickler = cloudpickle.Pickler
    writer = ChunkWriter(emit)
    lost: list[execution_pb2.LostName] = []
    left = max(limit_bytes, 0)
    beyond = f"beyond the size limit ({limit_bytes} bytes in all)"
    items = list(namespace.items())
    modules = [(k, v) for k, v in items if isinstance(v, types.ModuleType)]
    others = [(k, v) for k, v in items if not isinstance(v, types.ModuleType)]
    # What __reduce__ methods print belongs to no execution.
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        for name, value in modules + others:
            if name in _OWN_NAMES:
                continue
            if not isinstance(name, str):  # globals()[1] = ... is possible, and unnamed
                lost.append(_lost(_clipped_repr(name), "not a name (not a string)"))
                continue
            try:
                left -= _save_one(writer, name, value, left, pickler)
            except _TooLarge:
                lost.append(_lost(name, beyond))
            except BaseException as exc:  # user code's __reduce__ may raise anything
                lost.append(_lost(name, _reason(exc)))
    writer.flush()
    return executor_pb2.WorkerSnapshot(lost=_few(lost), namespace_bytes=writer.written)


def _save_one(writer: ChunkWriter, name: str, value: Any, left: int, pickler: Any) -> int:
    """Writes one global's entry (and pickle); the bytes it takes of the limit."""
    name_bytes = len(name.encode())  # a name protobuf would refuse (a lone surrogate) fails here
    if name_bytes > MAX_NAME_BYTES:
        raise _Unsaved(f"a name longer than {MAX_NAME_BYTES} bytes")
    if isinstance(value, types.ModuleType):
        entry = executor_pb2.SavedEntry(name=name, module=str(value.__name__))
        if len(entry.module.encode()) > MAX_NAME_BYTES:
            raise _Unsaved(f"a module whose name is longer than {MAX_NAME_BYTES} bytes")
        size = ENTRY_OVERHEAD + name_bytes + len(entry.module.encode())
        if size > left:
            raise _TooLarge
        _write_entry(writer, entry)
        return size
    if isinstance(value, io.IOBase):  # cloudpickle would keep a reader's contents only
        raise _Unsaved("an open file")
    buffer = _BoundedBuffer(left - ENTRY_OVERHEAD - name_bytes)
    pickler(buffer, protocol=5, buffer_callback=buffer.keep).dump(value)
    entry = executor_pb2.SavedEntry(
        name=name,
        pickled_bytes=len(buffer.data),
        buffer_bytes=[len(view) for view in buffer.out_of_band],
    )
    _write_entry(writer, entry)
    writer.write(buffer.data)
    for view in buffer.out_of_band:
        writer.write(view)
    return ENTRY_OVERHEAD + name_bytes + buffer.used


def _write_entry(writer: ChunkWriter, entry: executor_pb2.SavedEntry) -> None:
    encoded = entry.SerializeToString()
    writer.write(_LENGTH.pack(len(encoded)) + encoded)


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


class Unreadable(Exception):
    """The saved stream is not a sequence of entries (its message says where it fails)."""


class Restorer:
    """Receives a saved namespace chunk by chunk, keeping each value's pickle on its own (none
    is unpickled before `apply`: the workspace's files, which a pickle may import, come first)."""

    def __init__(self) -> None:
        self._modules: list[tuple[str, str]] = []
        # Each value's pickle, then its out-of-band buffers.
        self._values: list[tuple[str, list[bytearray]]] = []
        self._head = bytearray()
        # The parts of the last value still to be filled, and how many bytes each misses.
        self._filling: collections.deque[tuple[bytearray, int]] = collections.deque()
        self._broken = ""

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and not self._broken:
            if self._filling:
                part, missing = self._filling[0]
                take = view[:missing]
                part += take
                view = view[len(take) :]
                if len(take) == missing:
                    self._filling.popleft()
                else:
                    self._filling[0] = (part, missing - len(take))
                continue
            view = self._read_entry(view)

    def _read_entry(self, view: memoryview) -> memoryview:
        """Takes the bytes of the next entry's length prefix and entry; the rest of `view`."""
        if len(self._head) < _LENGTH.size:
            take = view[: _LENGTH.size - len(self._head)]
        else:
            size = _LENGTH.unpack_from(self._head)[0]
            if size > MAX_ENTRY_BYTES:
                self._broken = f"an entry of {size} bytes"
                return view[:0]
            take = view[: _LENGTH.size + size - len(self._head)]
        self._head += take
        view = view[len(take) :]
        if len(self._head) >= _LENGTH.size and len(self._head) == (
            _LENGTH.size + _LENGTH.unpack_from(self._head)[0]
        ):
            self._start_entry(bytes(self._head[_LENGTH.size :]))
            self._head = bytearray()
        return view

    def _start_entry(self, encoded: bytes) -> None:
        try:
            entry = executor_pb2.SavedEntry.FromString(encoded)
        except Exception as exc:  # protobuf's DecodeError, or worse on hostile bytes
            self._broken = _reason(exc)
            return
        kind = entry.WhichOneof("kind")
        sizes = [entry.pickled_bytes, *entry.buffer_bytes]
        if kind == "module":
            self._modules.append((entry.name, entry.module))
        elif kind == "pickled_bytes" and min(sizes) >= 0:
            parts = [bytearray() for _ in sizes]
            self._values.append((entry.name, parts))
            self._filling.extend(
                (part, size) for part, size in zip(parts, sizes, strict=True) if size
            )
        else:
            self._broken = "an entry that is neither a module nor a value"

    def apply(self, namespace: dict[str, Any]) -> executor_pb2.WorkerRestored:
        """Puts the saved globals into `namespace`: what could not be restored is listed, the
        rest kept. Each pickle is dropped once read."""
        lost: list[execution_pb2.LostName] = []
        if self._broken or self._head or self._filling:
            why = self._broken or "it ends in the middle of an entry"
            lost.append(_lost("*", f"unreadable snapshot: {why}"))
            if self._filling:  # the value cut short is not restored
                self._values.pop()
        modules, self._modules = self._modules, []
        values, self._values = self._values, []
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            for name, module in modules:
                try:
                    namespace[name] = importlib.import_module(module)
                except BaseException as exc:
                    lost.append(_lost(name, f"cannot import {module}: {_reason(exc)}"))
            values.reverse()  # popped from the end, in the saved order
            while values:
                name, parts = values.pop()
                if name in _OWN_NAMES:  # never saved: the new worker's own stay
                    continue
                try:
                    # The buffers become the arrays' memory: no copy.
                    namespace[name] = pickle.loads(parts[0], buffers=parts[1:])
                except BaseException as exc:
                    lost.append(_lost(name, _reason(exc)))
                del parts  # the pickle goes as soon as it was read
        lost = _few(lost)
        for name in list(namespace):
            with contextlib.suppress(Exception):  # a hostile class's __module__ may raise
                namespace[name] = _rebound(namespace[name], namespace)
        return executor_pb2.WorkerRestored(lost=lost)


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
