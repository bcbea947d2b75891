"""The checkpoint store on its own: a new checkpoint replaces the previous one only once it is
whole, and a damaged or foreign file is refused with a reason, never half-read."""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controller.errors import ResourceExhausted
from controller.store import checkpoints
from controller.store.checkpoints import (
    CheckpointIncomplete,
    CheckpointStore,
    CheckpointUnreadable,
)
from petri.v1 import executor_pb2

Chunk = executor_pb2.CheckpointChunk
SUMMARY = Chunk(summary=executor_pb2.CheckpointSummary(execution_count=3))


async def stream(*chunks: Chunk) -> AsyncIterator[Chunk]:
    for chunk in chunks:
        yield chunk


async def read_all(store: CheckpointStore, uid: str) -> list[Chunk]:
    return [chunk async for chunk in store.read(uid)]


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoints")
    store.open()
    return store


async def test_a_checkpoint_reads_back_as_written(store: CheckpointStore) -> None:
    written = [Chunk(namespace=b"\x00" * 10), Chunk(workspace=b"tar"), SUMMARY]
    summary, size = await store.write("u", stream(*written), 1 << 20)
    assert summary.execution_count == 3 and size == store.path("u").stat().st_size
    assert await read_all(store, "u") == written


async def test_a_failed_write_leaves_the_previous_checkpoint_whole(
    store: CheckpointStore,
) -> None:
    await store.write("u", stream(Chunk(namespace=b"old"), SUMMARY), 1 << 20)
    before = store.path("u").read_bytes()

    with pytest.raises(CheckpointIncomplete):  # the executor stopped before its summary
        await store.write("u", stream(Chunk(namespace=b"new")), 1 << 20)
    with pytest.raises(ResourceExhausted, match="passed the limit of 1 KiB per sandbox"):
        await store.write("u", stream(Chunk(namespace=b"x" * 2048), SUMMARY), 1024)

    async def fails() -> AsyncIterator[Chunk]:
        yield Chunk(namespace=b"new")
        raise ConnectionError("the executor went away")

    with pytest.raises(ConnectionError):
        await store.write("u", fails(), 1 << 20)
    assert store.path("u").read_bytes() == before
    assert sorted(p.name for p in store.root.iterdir()) == ["u.ckpt"]


async def test_damaged_and_foreign_files_are_refused_with_a_reason(
    store: CheckpointStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(CheckpointUnreadable, match="no checkpoint"):
        await read_all(store, "missing")
    await store.write("u", stream(Chunk(namespace=b"n" * 100), SUMMARY), 1 << 20)
    whole = store.path("u").read_bytes()

    store.path("u").write_bytes(whole[:-5])
    with pytest.raises(CheckpointUnreadable, match="cut short"):
        await read_all(store, "u")
    store.path("u").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointUnreadable, match="not a checkpoint of this format"):
        await read_all(store, "u")
    header = checkpoints._HEADER.size
    store.path("u").write_bytes(whole[:header] + b"\xff\xff\xff\xff" + whole[header + 4 :])
    with pytest.raises(CheckpointUnreadable, match="holds a frame of 4294967295 bytes"):
        await read_all(store, "u")

    store.path("u").write_bytes(whole)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_VERSION", 99)  # a controller upgraded since
    with pytest.raises(CheckpointUnreadable, match="the checkpoint is of version 2;"):
        await read_all(store, "u")


async def test_what_a_crash_left_mid_write_is_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "u.1234abcd.tmp").write_bytes(b"half")
    (root / "u.ckpt").write_bytes(b"whole")
    CheckpointStore(root).open()
    assert sorted(p.name for p in root.iterdir()) == ["u.ckpt"]


async def test_a_full_disk_is_resource_exhausted_and_leaves_nothing(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC, even the last flush of a buffered file."""
    store = CheckpointStore(tmp_path / "checkpoints")
    store.open()
    await store.write("u", stream(Chunk(namespace=b"old"), SUMMARY), 1 << 20)
    before = store.path("u").read_bytes()
    original = checkpoints._create

    def full(path: Path) -> Any:
        original(path).close()  # the temporary file exists, as it would
        return open("/dev/full", "wb")

    checkpoints._create = full
    try:
        with pytest.raises(ResourceExhausted, match="No space left on device"):
            await store.write("u", stream(Chunk(namespace=b"x" * 10), SUMMARY), 1 << 20)
    finally:
        checkpoints._create = original
    assert store.path("u").read_bytes() == before
    assert sorted(p.name for p in store.root.iterdir()) == ["u.ckpt"]


async def test_a_bit_flipped_on_disk_or_another_sandboxs_file_is_refused(
    store: CheckpointStore,
) -> None:
    """The controller never reads inside a checkpoint: without a checksum, a flipped bit
    in a file's contents would be restored as it is, and a file copied from another sandbox
    would give this sandbox that one's variables and files."""
    await store.write("mine", stream(Chunk(workspace=b"w" * 1000), SUMMARY), 1 << 20)
    await store.write("theirs", stream(Chunk(workspace=b"t" * 1000), SUMMARY), 1 << 20)
    whole = bytearray(store.path("mine").read_bytes())
    whole[len(whole) // 2] ^= 0x10  # in the middle of the archive's bytes
    store.path("mine").write_bytes(whole)
    with pytest.raises(CheckpointUnreadable, match="damaged: a chunk's checksum is wrong"):
        await read_all(store, "mine")

    store.path("mine").write_bytes(store.path("theirs").read_bytes())
    with pytest.raises(CheckpointUnreadable, match="another sandbox's checkpoint"):
        await read_all(store, "mine")
    assert (await read_all(store, "theirs"))[0].workspace == b"t" * 1000


# --- moved to another node: the file's bytes, checked whole before they are kept --------------


async def pieces(data: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_checkpoint_sent_is_received_whole_and_reads_back(tmp_path: Path) -> None:
    source, target = CheckpointStore(tmp_path / "a"), CheckpointStore(tmp_path / "b")
    source.open()
    target.open()
    written = [*[Chunk(namespace=b"\x01" * (1 << 20))] * 3, Chunk(workspace=b"tar"), SUMMARY]
    await source.write("u", stream(*written), 1 << 30)
    sent = [piece async for piece in source.send("u")]
    assert max(len(piece) for piece in sent) == checkpoints.TRANSFER_CHUNK_BYTES  # never whole

    async def replay() -> AsyncIterator[bytes]:
        for piece in sent:
            yield piece

    assert await target.receive("u", replay(), 1 << 30) == source.path("u").stat().st_size
    assert await read_all(target, "u") == written


async def test_a_received_checkpoint_that_is_damaged_foreign_or_too_big_is_not_kept(
    tmp_path: Path,
) -> None:
    source, target = CheckpointStore(tmp_path / "a"), CheckpointStore(tmp_path / "b")
    source.open()
    target.open()
    await source.write("u", stream(Chunk(namespace=b"n" * 100), SUMMARY), 1 << 20)
    whole = source.path("u").read_bytes()
    flipped = bytearray(whole)
    flipped[-3] ^= 0xFF
    cases = {
        "another sandbox's": whole,  # received as sandbox "v"
        "checksum is wrong": bytes(flipped),
        "cut short": whole[:-5],
        "goes on after its summary": whole + b"more",
    }
    for reason, data in cases.items():
        uid = "v" if reason == "another sandbox's" else "u"
        with pytest.raises(CheckpointUnreadable, match=reason):
            await target.receive(uid, pieces(data), 1 << 20)
    with pytest.raises(ResourceExhausted, match="passed the limit"):
        await target.receive("u", pieces(whole), len(whole) - 1)
    assert list((tmp_path / "b").iterdir()) == []  # no file kept, no temporary left
