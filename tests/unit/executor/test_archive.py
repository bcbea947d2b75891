"""The workspace archive (executor.workspace.archive) on its own, with the tar of this host."""

from pathlib import Path

import pytest

from executor.workspace.archive import ArchiveFailed, Extraction, archive

APPARENT = 8 << 30  # far beyond any sandbox's checkpoint limit, were its holes archived


async def test_a_sparse_file_is_archived_as_its_data_not_its_apparent_size(
    tmp_path: Path,
) -> None:
    """`f.truncate(8 << 30)` is one line of user code and takes no disk: archived byte by
    byte, it would stream gigabytes of zeros to the controller's disk at every pause."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    with open(source / "sparse", "wb") as file:
        file.truncate(APPARENT)
        file.seek(1 << 20)
        file.write(b"data in the middle")
    chunks: list[bytes] = []

    async def send(chunk: bytes) -> None:
        chunks.append(chunk)
        assert sum(map(len, chunks)) < 1 << 20, "the holes are being archived"

    sent = await archive(source, None, send)
    assert sent == sum(map(len, chunks)) < 1 << 20
    extraction = await Extraction.start(target, None)
    for chunk in chunks:
        await extraction.write(chunk)
    await extraction.finish()
    restored = target / "sparse"
    assert restored.stat().st_size == APPARENT
    assert restored.stat().st_blocks * 512 < 1 << 20  # still sparse
    with open(restored, "rb") as reader:
        reader.seek((1 << 20) - 2)
        assert reader.read(22) == b"\0\0data in the middle\0\0"


async def test_a_file_that_shrinks_while_it_is_archived_fails_the_archive(
    tmp_path: Path,
) -> None:
    """tar pads a file that shrank under it with zeros (and exits 1, as for a file that only
    changed): a thread user code left rewriting a file must not get it back with megabytes
    of zeros it never wrote, from a pause that said it saved everything."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "rewritten.bin").write_bytes(b"\x01" * (24 << 20))

    async def send(chunk: bytes) -> None:
        # tar is in the middle of the file (the pipe holds it up): now it is rewritten.
        with open(source / "rewritten.bin", "wb") as file:
            file.write(b"\x01" * 1000)

    with pytest.raises(ArchiveFailed) as failed:
        await archive(source, None, send)
    message = str(failed.value)
    assert "rewritten.bin" in message and "shrank" in message and "retry" in message
