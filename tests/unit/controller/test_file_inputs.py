import pytest

from controller.api.file_inputs import (
    MAX_COMPONENT_BYTES,
    MAX_PATH_DEPTH,
    InputChecker,
    check_files,
    check_input_path,
)
from controller.errors import InvalidArgument
from petri.v1 import execution_pb2


@pytest.mark.parametrize(
    "path",
    [
        "a" * MAX_COMPONENT_BYTES,
        "é" * (MAX_COMPONENT_BYTES // 2),
        "/".join(["d"] * MAX_PATH_DEPTH),
        "data/x.csv",
    ],
)
def test_paths_within_the_limits_pass(path: str) -> None:
    check_input_path(path)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("a" * (MAX_COMPONENT_BYTES + 1), "component of 256 bytes"),
        ("dir/" + "é" * 128, "component of 256 bytes"),
        ("/".join(["d"] * (MAX_PATH_DEPTH + 1)), "65 components, more than the maximum of 64"),
        ("/".join(["d"] * 3000), "longer than 4084 bytes"),
        ("/" + "x" * 4000, "is absolute"),
        ("a/../" + "x" * 4000, "contains '..'"),
        ("x" * 4000 + "\0", "NUL"),
        ("x" * (1 << 20), "longer than 4084 bytes"),
    ],
)
def test_paths_beyond_a_limit_are_invalid_argument_quoting_a_prefix(
    path: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        check_input_path(path)
    assert len(str(caught.value)) < 400


def test_unary_files_and_stream_chunks_are_checked_alike() -> None:
    long_name = "x" * 256
    with pytest.raises(InvalidArgument, match="component of 256 bytes"):
        check_files([execution_pb2.File(path=long_name, content=b"1")], 1 << 20)
    with pytest.raises(InvalidArgument, match="component of 256 bytes"):
        InputChecker(1 << 20).check(execution_pb2.FileChunk(path=long_name, final=True))


def test_a_file_left_open_is_named_by_a_prefix() -> None:
    checker = InputChecker(1 << 20)
    checker.check(execution_pb2.FileChunk(path="a" * 200, data=b"x"))
    with pytest.raises(InvalidArgument, match="without a chunk marked final") as caught:
        checker.check(execution_pb2.FileChunk(path="b", final=True))
    assert len(str(caught.value)) < 300


@pytest.mark.parametrize(
    "paths", [("a/b", "a/b/c"), ("a/b/c", "a/b"), ("x", "x/y/z"), ("x/y/z", "x/y")]
)
def test_a_file_where_another_needs_a_directory_is_refused(paths: tuple[str, str]) -> None:
    files = [execution_pb2.File(path=path, content=b"x") for path in paths]
    with pytest.raises(InvalidArgument, match="cannot both be written"):
        check_files(files, 1 << 20)


def test_siblings_and_shared_directories_are_fine() -> None:
    paths = ("a/b/c", "a/b/d", "a/e", "f")
    check_files([execution_pb2.File(path=path, content=b"x") for path in paths], 1 << 20)
