import pytest

from controller.api.page_tokens import decode_token, encode_token, request_digest
from controller.errors import InvalidArgument


def test_token_round_trips_its_position() -> None:
    digest = request_digest("projects/p", "state = RUNNING", "")
    token = encode_token(digest, (1_700_000_000_000_000, "uid-1"))
    assert decode_token(token, digest) == (1_700_000_000_000_000, "uid-1")


def test_token_is_bound_to_its_request() -> None:
    token = encode_token(request_digest("projects/p", "", ""), ("x", "uid"))
    for other in (
        request_digest("projects/q", "", ""),
        request_digest("projects/p", "state = RUNNING", ""),
        request_digest("projects/p", "", "name desc"),
    ):
        with pytest.raises(InvalidArgument, match="same parent, filter and order_by"):
            decode_token(token, other)


@pytest.mark.parametrize("garbage", ["x", "!!!", "e30", "bnVsbA", "W10", "eyJ2IjoxfQ"])
def test_garbage_tokens_are_invalid_argument(garbage: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid page_token"):
        decode_token(garbage, request_digest("projects/p", "", ""))


def test_an_oversized_token_is_refused_without_being_decoded() -> None:
    with pytest.raises(InvalidArgument, match="invalid page_token") as caught:
        decode_token("A" * (1 << 20), "digest")
    assert len(str(caught.value)) < 300
