from datetime import timedelta

import pytest

from controller.errors import InvalidArgument
from controller.quoting import quote
from controller.records import Resources, Runtime
from controller.sandboxes.labels import validate_labels
from controller.sandboxes.specs import CreateParams, create_request_json, differing_fields


def test_quote_keeps_short_values_whole_and_cuts_long_ones() -> None:
    assert quote("abc") == "'abc'"
    cut = quote("x" * (1 << 20))
    assert cut.startswith("'xxx") and cut.endswith("... (1048576 characters)")
    assert len(cut) < 100


def test_a_huge_label_is_quoted_by_a_prefix() -> None:
    for labels in ({"K" * (1 << 20): "v"}, {"k": "V" * (1 << 20)}):
        with pytest.raises(InvalidArgument) as caught:
            validate_labels(labels)
        assert len(str(caught.value)) < 400


def params(**changes: object) -> CreateParams:
    values: dict[str, object] = {
        "project": "p",
        "sandbox_id": "",
        "display_name": "",
        "labels": {"team": "ml"},
        "image_profile": "",
        "runtime": None,
        "resources": Resources(),
        "expire_time": None,
        "ttl": timedelta(hours=1),
        "request_id": "r",
    }
    values.update(changes)
    return CreateParams(**values)  # type: ignore[arg-type]


def test_a_retry_of_the_same_create_differs_in_nothing() -> None:
    assert differing_fields(create_request_json(params()), create_request_json(params())) == []


def test_a_reused_request_id_names_every_field_that_differs() -> None:
    first = create_request_json(params())
    other = params(
        labels={"team": "web"},
        runtime=Runtime.GVISOR,
        resources=Resources(memory_bytes=1 << 30),
        ttl=None,
    )
    assert differing_fields(first, create_request_json(other)) == [
        "sandbox.labels",
        "sandbox.spec.resources.memory_bytes",
        "sandbox.spec.runtime",
        "sandbox.ttl",
    ]
