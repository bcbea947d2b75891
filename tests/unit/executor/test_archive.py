"""The workspace archive (executor.workspace.archive) on its own, with the tar of this host."""

from pathlib import Path

from executor.workspace.archive import Extraction, archive

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
