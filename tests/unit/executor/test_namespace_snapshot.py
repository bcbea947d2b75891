"""Saving a worker's namespace and restoring it in a new worker, with real worker processes
(no container): what survives, what is listed as lost and why, the size limit, and that the
saved bytes are only ever unpickled by the worker that restores them."""

import os
import pickle
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from executor.supervisor import NotFresh, SnapshotFailed, Supervisor
from petri.protocol import CHECKPOINT_CHUNK_BYTES
from petri.v1 import execution_pb2, executor_pb2
from tests.unit.executor.test_supervisor import run

SESSION = """
import numpy as np
import pandas as pd
from os import path as ospath
array = np.arange(12).reshape(3, 4)
frame = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
scale = 3
def times_scale(v):
    return v * scale
class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return self.x ** 2 + self.y ** 2 + offset
    @staticmethod
    def origin():
        return Point(0, 0)
offset = 0
point = Point(3, 4)
square = lambda v: v * v
def make_adder(n):
    def add(v):
        return v + n
    return add
add5 = make_adder(5)
"""


@pytest.fixture
async def supervisors(tmp_path: Path) -> AsyncIterator[tuple[Supervisor, Supervisor]]:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = Supervisor(tmp_path / "a"), Supervisor(tmp_path / "b")
    await first.start()
    await second.start()
    yield first, second
    await first.close()
    await second.close()


def lost_names(lost: list[execution_pb2.LostName]) -> dict[str, str]:
    return {entry.name: entry.reason for entry in lost}


async def save(
    sup: Supervisor, limit: int = 1 << 20
) -> tuple[bytes, list[execution_pb2.LostName], int]:
    """A checkpoint's namespace bytes, the names lost and the execution count."""
    namespace = bytearray()

    async def send(chunk: executor_pb2.CheckpointChunk) -> None:
        if chunk.HasField("namespace"):
            assert len(chunk.namespace) <= CHECKPOINT_CHUNK_BYTES
            namespace.extend(chunk.namespace)

    summary = await sup.checkpoint(limit, send)
    assert summary.namespace_bytes == len(namespace)
    return bytes(namespace), list(summary.lost), summary.execution_count


async def restore(sup: Supervisor, saved: bytes, count: int = 1) -> list[execution_pb2.LostName]:
    async with sup.restoring() as restoring:
        for start in range(0, len(saved), CHECKPOINT_CHUNK_BYTES):
            await restoring.namespace(saved[start : start + CHECKPOINT_CHUNK_BYTES])
        result = await restoring.finish(count)
    return list(result.lost)


def entry(name: str, module: str = "", pickled: bytes | None = None) -> bytes:
    """A saved namespace's entry, as the worker writes it."""
    if pickled is None:
        encoded = executor_pb2.SavedEntry(name=name, module=module).SerializeToString()
        return struct.pack(">I", len(encoded)) + encoded
    encoded = executor_pb2.SavedEntry(name=name, pickled_bytes=len(pickled)).SerializeToString()
    return struct.pack(">I", len(encoded)) + encoded + pickled


async def test_every_kind_of_value_survives_in_a_new_worker(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    old, new = supervisors
    assert (await run(old, SESSION)).error is None
    assert (await run(old, "None")).error is None
    saved, lost, count = await save(old)
    assert lost == [] and count == 2
    old_pid = (await run(old, "import os; os.getpid()")).value

    assert await restore(new, saved, count) == []
    assert new.execution_count == 2  # that of the snapshot; the getpid above came after
    checks = (
        "(array.sum(), array.shape, frame['a'].sum(), list(frame['b']),"
        " times_scale(2), point.norm2(), Point.origin().norm2(), square(7), add5(1),"
        " np.__name__, pd.__name__, ospath.__name__)"
    )
    ran = await run(new, checks)
    assert ran.error is None, ran.error
    assert ran.value == (
        "(np.int64(66), (3, 4), np.int64(6), ['x', 'y', 'z'], 6, 25, 0, 49, 6,"
        " 'numpy', 'pandas', 'posixpath')"
    )
    assert ran.result.execution_count == 3
    assert (await run(new, "import os; os.getpid()")).value != old_pid  # a new interpreter


async def test_restored_functions_read_the_namespace_globals(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    old, new = supervisors
    await run(old, SESSION)
    saved, _, _ = await save(old)
    await restore(new, saved)
    ran = await run(new, "scale = 10; offset = 1; (times_scale(2), point.norm2())")
    assert ran.value == "(20, 26)"  # not the copies of scale and offset pickled with them


async def test_unserialisable_names_are_listed_with_reasons_and_the_rest_kept(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    old, new = supervisors
    code = (
        "import socket, threading\n"
        "kept = [1, 2, 3]\n"
        "gen = (i for i in range(3))\n"
        "lock = threading.Lock()\n"
        "handle = open('notes.txt', 'w')\n"
        "sock = socket.socket()\n"
        "thread = threading.Thread(target=lambda: None)\n"
        "also_kept = {'k': 'v'}\n"
        "globals()[1] = 'not a name'\n"
        "globals()['\\ud800'] = 'a name protobuf refuses'\n"
        "globals()['n' * 5000] = 'a name too long for an entry'\n"
    )
    assert (await run(old, code)).error is None
    saved, lost, _ = await save(old)
    reasons = lost_names(lost)
    assert set(reasons) == {"gen", "lock", "handle", "sock", "thread", "1", "\\ud800", "n" * 300}
    assert "longer than" in reasons["n" * 300]
    assert reasons["1"] == "not a name (not a string)"
    assert "generator" in reasons["gen"]
    assert "lock" in reasons["lock"]
    assert reasons["handle"] == "an open file"
    assert "socket" in reasons["sock"]
    assert all(reasons.values())
    assert await restore(new, saved) == []
    ran = await run(new, "(kept, also_kept, socket.__name__, 'gen' in globals())")
    assert ran.value == "([1, 2, 3], {'k': 'v'}, 'socket', False)"


async def test_the_size_limit_is_honoured(supervisors: tuple[Supervisor, Supervisor]) -> None:
    old, new = supervisors
    await run(old, "small = 'a' * 100\nbig = b'x' * 200_000\nafter = 'b' * 100")
    saved, lost, _ = await save(old, 100_000)
    assert len(saved) <= 100_000
    assert list(lost_names(lost)) == ["big"]
    assert "size limit" in lost[0].reason
    await restore(new, saved)
    ran = await run(new, "(len(small), len(after), 'big' in globals())")
    assert ran.value == "(100, 100, False)"


async def test_a_restore_is_a_new_incarnation_and_only_into_a_sandbox_that_ran_nothing(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    old, new = supervisors
    await run(old, "kept = 1")
    saved, _, _ = await save(old)
    before = new.incarnation
    await restore(new, saved)
    assert new.incarnation != before
    assert (await run(new, "kept")).value == "1"
    with pytest.raises(NotFresh):
        await restore(new, saved)  # restored already
    with pytest.raises(NotFresh):
        await restore(old, saved)  # has run code


async def test_a_worker_that_dies_while_saving_fails_the_snapshot_and_is_replaced(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    old, _ = supervisors
    code = "import os\nclass Bomb:\n    def __reduce__(self):\n        os._exit(3)\nbomb = Bomb()"
    assert (await run(old, code)).error is None
    with pytest.raises(SnapshotFailed, match="exited"):
        await save(old)
    assert (await run(old, "1 + 1")).value == "2"


class _Malicious:
    """Unpickled, writes the pid of the process that unpickles it to a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        code = f"import os; open({str(self.marker)!r}, 'w').write(str(os.getpid()))"
        return (exec, (code,))


async def test_a_malicious_pickle_runs_only_in_the_restoring_worker(
    supervisors: tuple[Supervisor, Supervisor], tmp_path: Path
) -> None:
    _, new = supervisors
    marker = tmp_path / "unpickled-by"
    blob = entry("payload", pickled=pickle.dumps(_Malicious(marker)))
    blob += entry("fine", pickled=pickle.dumps([1, 2]))
    assert not marker.exists()  # building the bytes ran nothing

    lost = await restore(new, blob)
    assert lost == []
    worker_pid = (await run(new, "import os; os.getpid()")).value
    assert marker.read_text() == worker_pid
    assert marker.read_text() != str(os.getpid())
    assert (await run(new, "fine")).value == "[1, 2]"


async def test_garbage_and_unimportable_modules_are_reported_not_fatal(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    _, new = supervisors
    saved = entry("gone", module="no_such_module_anywhere")
    saved += entry("broken", pickled=b"not a pickle")
    saved += entry("fine", pickled=pickle.dumps("ok"))
    reasons = lost_names(await restore(new, saved, 7))
    assert set(reasons) == {"gone", "broken"}
    assert "no_such_module_anywhere" in reasons["gone"]
    ran = await run(new, "fine")
    assert ran.value == "'ok'"
    assert ran.result.execution_count == 8


@pytest.mark.parametrize(
    ("saved", "why"),
    [
        (b"\xff\xff\xff", "in the middle of an entry"),
        (b"\xff\xff\xff\xff" + b"x" * 100, "an entry of"),
        (struct.pack(">I", 3) + b"\xff\xff\xff", "unreadable"),
        (entry("kept", pickled=pickle.dumps(1)) + entry("cut", pickled=b"x" * 10)[:-3], "middle"),
    ],
)
async def test_an_unreadable_namespace_is_lost_not_fatal(
    supervisors: tuple[Supervisor, Supervisor], saved: bytes, why: str
) -> None:
    _, new = supervisors
    lost = await restore(new, saved)
    assert lost[0].name == "*" and why in lost[0].reason, lost
    assert "cut" not in lost_names(lost)
    assert (await run(new, "'cut' in globals()")).value == "False"


class _Exit:
    """Unpickled, ends the process that unpickles it."""

    def __reduce__(self) -> tuple[object, tuple[int]]:
        return (os._exit, (3,))


async def test_a_pickle_that_kills_the_worker_loses_the_namespace_and_a_new_worker_follows(
    supervisors: tuple[Supervisor, Supervisor],
) -> None:
    _, new = supervisors
    lost = await restore(new, entry("bomb", pickled=pickle.dumps(_Exit())))
    assert lost_names(lost).keys() == {"*"} and "exited" in lost[0].reason
    ran = await run(new, "'bomb' in globals()")
    assert ran.error is None and ran.value == "False"
