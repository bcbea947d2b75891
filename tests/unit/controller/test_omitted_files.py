"""What the executor says it omitted reaches the caller bounded: it is as hostile as its code."""

from controller.sandboxes.results import (
    MAX_OMITTED_ENTRIES,
    MAX_OMITTED_PATH_BYTES,
    MAX_OMITTED_REASON_BYTES,
    MAX_UNLISTED_COUNT,
    OutputLimits,
    ResponseCollector,
)
from petri.v1 import execution_pb2, executor_pb2

LIMITS = OutputLimits(max_output_bytes=1 << 20, max_file_bytes=1 << 20, max_files=10)


def chunk(path: str, data: bytes, final: bool) -> executor_pb2.ExecuteEvent:
    return executor_pb2.ExecuteEvent(
        file_chunk=execution_pb2.FileChunk(path=path, data=data, final=final, size=2)
    )


def result(*omitted: execution_pb2.OmittedFile) -> executor_pb2.ExecuteEvent:
    return executor_pb2.ExecuteEvent(result=executor_pb2.ExecuteResult(omitted_files=omitted))


def test_paths_and_reasons_are_cut_and_entries_counted_beyond_the_cap() -> None:
    collector = ResponseCollector(LIMITS)
    huge = execution_pb2.OmittedFile(path="é" * 10_000, size=-5, reason="ü" * 10_000)
    many = [execution_pb2.OmittedFile(path=f"f{i}", reason="r") for i in range(MAX_OMITTED_ENTRIES)]
    collector.add(result(huge, *many))
    omitted = collector.response().omitted_files
    assert len(omitted) == MAX_OMITTED_ENTRIES + 1
    first = omitted[0]
    assert len(first.path.encode()) <= MAX_OMITTED_PATH_BYTES and first.path.endswith("...")
    assert len(first.reason.encode()) <= MAX_OMITTED_REASON_BYTES and first.size == 0
    assert (omitted[-1].path, omitted[-1].size) == ("", 1)
    assert omitted[-1].reason == "1 more omitted entries are not listed"


def summary(count: int) -> execution_pb2.OmittedFile:
    return execution_pb2.OmittedFile(size=count, reason="hostile text")


def test_the_executors_summary_is_carried_through_not_counted_as_one_entry() -> None:
    collector = ResponseCollector(LIMITS)
    many = [execution_pb2.OmittedFile(path=f"f{i}", reason="r") for i in range(MAX_OMITTED_ENTRIES)]
    collector.add(result(*many, summary(29_000)))
    omitted = collector.response().omitted_files
    assert [o.path for o in omitted[:-1]] == [f"f{i}" for i in range(MAX_OMITTED_ENTRIES)]
    assert (omitted[-1].path, omitted[-1].size) == ("", 29_000)
    assert omitted[-1].reason == "29000 more omitted entries are not listed"


def test_the_executors_summary_adds_to_what_the_controller_drops() -> None:
    collector = ResponseCollector(LIMITS)
    for i in range(LIMITS.max_files + 3):  # 3 files past max_files, omitted by the controller
        collector.add(chunk(f"c{i}", b"ab", final=True))
    many = [execution_pb2.OmittedFile(path=f"f{i}", reason="r") for i in range(MAX_OMITTED_ENTRIES)]
    collector.add(result(*many, summary(7)))
    omitted = collector.response().omitted_files
    assert len(omitted) == MAX_OMITTED_ENTRIES + 1
    assert omitted[-1].size == 3 + 7  # the last 3 of the executor's entries, and its 7


def test_hostile_summary_counts_are_bounded() -> None:
    collector = ResponseCollector(LIMITS)
    huge = (1 << 63) - 1
    collector.add(result(summary(-5), summary(huge), summary(huge)))
    omitted = collector.response().omitted_files
    assert [(o.path, o.size) for o in omitted] == [("", 0), ("", MAX_UNLISTED_COUNT)]


def test_a_file_cut_short_is_not_returned_even_when_its_entry_is_not_listed() -> None:
    collector = ResponseCollector(LIMITS)
    collector.add(chunk("half.txt", b"a", final=False))
    collector.add(chunk("half.txt", b"", final=True))
    collector.add(chunk("whole.txt", b"ok", final=True))
    filler = [
        execution_pb2.OmittedFile(path=f"f{i}", reason="r") for i in range(MAX_OMITTED_ENTRIES)
    ]
    cut = execution_pb2.OmittedFile(path="half.txt", reason="could not be read to its end: EIO")
    collector.add(result(*filler, cut))
    response = collector.response()
    assert [(f.path, f.content) for f in response.files] == [("whole.txt", b"ok")]
    assert "half.txt" not in {o.path for o in response.omitted_files}  # past the cap
