import base64
from typing import Any

from executor.formatting import MAX_REPR_CHARS, bounded, to_output
from petri.v1 import execution_pb2

RESULT = execution_pb2.Output.RESULT


class Rich:
    def _repr_html_(self) -> str:
        return "<b>rich</b>"

    def _repr_png_(self) -> bytes:
        return b"\x89PNG fake"

    def _repr_json_(self) -> dict[str, int]:
        return {"a": 1}


class Broken:
    def __repr__(self) -> str:
        raise RuntimeError("no")

    def _repr_html_(self) -> str:
        raise RuntimeError("no")


class AnswersEverything:
    def __getattr__(self, name: str) -> Any:
        return lambda: "<i>not really</i>"


class Bundle:
    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return {
            "text/markdown": "**hi**",
            "image/png": base64.b64encode(b"png-bytes").decode(),
            "application/vnd.custom+json": {"k": [1, 2]},
        }


def test_plain_values_have_text_plain_only() -> None:
    output = to_output(42, RESULT)
    assert output.kind == RESULT
    assert dict(output.text) == {"text/plain": "42"}
    assert not output.binary


def test_rich_reprs_are_honoured() -> None:
    output = to_output(Rich(), RESULT)
    assert output.text["text/html"] == "<b>rich</b>"
    assert output.text["application/json"] == '{"a": 1}'
    assert output.binary["image/png"] == b"\x89PNG fake"
    assert "text/plain" in output.text


def test_broken_reprs_never_fail_the_output() -> None:
    output = to_output(Broken(), RESULT)
    assert "repr failed" in output.text["text/plain"]
    assert "text/html" not in output.text


def test_getattr_tricks_do_not_pass_for_rich_objects() -> None:
    assert set(to_output(AnswersEverything(), RESULT).text) == {"text/plain"}


def test_mimebundles_decode_base64_images() -> None:
    output = to_output(Bundle(), RESULT)
    assert output.text["text/markdown"] == "**hi**"
    assert output.binary["image/png"] == b"png-bytes"
    assert output.text["application/vnd.custom+json"] == '{"k": [1, 2]}'


def test_huge_reprs_are_truncated() -> None:
    output = to_output("x" * (MAX_REPR_CHARS * 2), RESULT)
    assert len(output.text["text/plain"]) < MAX_REPR_CHARS + 100
    assert output.text["text/plain"].endswith("characters]")


def test_oversized_outputs_drop_their_largest_renderings_and_say_so() -> None:
    output = execution_pb2.Output(kind=RESULT)
    output.text["text/plain"] = "small"
    output.text["text/html"] = "h" * 5000
    output.binary["image/png"] = b"p" * 20000
    bounded(output, 10000)
    assert "image/png" not in output.binary
    assert output.text["text/html"] == "h" * 5000
    assert "dropped image/png (20000 bytes)" in output.text["text/plain"]
    assert output.ByteSize() <= 10000
