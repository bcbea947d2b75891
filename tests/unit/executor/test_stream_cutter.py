from executor.stream_cutter import StreamCutter

MARKER = b"\0end-1234\0"


def feed_all(chunks: list[bytes]) -> tuple[bytes, bytes | None]:
    cutter = StreamCutter()
    emitted = b""
    for index, chunk in enumerate(chunks):
        before, after = cutter.feed(chunk, MARKER)
        emitted += before
        if after is not None:  # unread chunks belong to the next execution too
            return emitted, after + b"".join(chunks[index + 1 :])
    return emitted + cutter.flush(), None


def test_finds_the_marker_in_one_chunk() -> None:
    assert feed_all([b"hello\n" + MARKER + b"next"]) == (b"hello\n", b"next")


def test_finds_a_marker_split_across_every_possible_boundary() -> None:
    data = b"abc" + MARKER + b"tail"
    for cut in range(1, len(data)):
        assert feed_all([data[:cut], data[cut:]]) == (b"abc", b"tail")


def test_finds_a_marker_fed_byte_by_byte() -> None:
    data = b"xy" + MARKER
    assert feed_all([bytes([b]) for b in data]) == (b"xy", b"")


def test_without_a_marker_everything_is_returned_eventually() -> None:
    assert feed_all([b"no marker\0end-12"]) == (b"no marker\0end-12", None)


def test_holds_back_only_a_possible_marker_prefix() -> None:
    cutter = StreamCutter()
    before, after = cutter.feed(b"text\0end", MARKER)
    assert (before, after) == (b"text", None)
