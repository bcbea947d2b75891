"""The `filter` of ListSandboxes: a documented subset of AIP-160, parsed into the conditions
of a controller.listing.ListQuery (the store compiles them to its query language).

    filter      := comparison ("AND" comparison)*
    comparison  := "state" ("=" | "!=") STATE
                 | "labels." KEY ("=" | "!=") VALUE
                 | "labels." KEY ":" "*"            (the label is present)
    VALUE       := a bare word or a "double-quoted string"

A filter has at most MAX_FILTER_BYTES bytes and MAX_FILTER_TERMS comparisons. Anything else is
INVALID_ARGUMENT with a message that names the offending part.
"""

import json
import re

from controller.errors import InvalidArgument
from controller.listing import Condition, LabelIs, LabelPresent, StateIs
from controller.quoting import quote
from controller.records import PUBLIC_STATES
from controller.sandboxes.labels import LABEL_KEY_PATTERN, is_valid_label_key

# A filter's bounds: checked before any work on it, so a huge filter costs the controller
# nothing. SQLite refuses conditions nested deeper than 1000; a sandbox has at most 64 labels.
MAX_FILTER_BYTES = 8192
MAX_FILTER_TERMS = 128

_TOKEN = re.compile(
    r"""\s*(?:
        (?P<string>"(?:[^"\\]|\\.)*")
      | (?P<op>!=|=|:)
      | (?P<word>[A-Za-z0-9_.*-]+)
      | (?P<bad>\S)
    )""",
    re.VERBOSE,
)
_FIELDS_HELP = "state, labels.KEY"
_STATES = {state.name: state for state in PUBLIC_STATES}


def _tokens(text: str) -> list[tuple[str, str]]:
    tokens = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        assert kind is not None
        value = match.group(kind)
        if kind == "bad":
            raise InvalidArgument(
                f"invalid filter {quote(text)}: unexpected {value!r}; supported: comparisons "
                f"of {_FIELDS_HELP} with =, != or :*, joined by AND"
            )
        tokens.append((kind, value))
    return tokens


def _check_bounds(text: str) -> None:
    size = len(text.encode(errors="replace"))
    if size > MAX_FILTER_BYTES:
        raise InvalidArgument(
            f"filter is {size} bytes, more than the maximum of {MAX_FILTER_BYTES}: "
            "narrow it down to fewer comparisons"
        )


def _unquote(kind: str, value: str) -> str:
    if kind != "string":
        return value
    try:
        result: str = json.loads(value)  # JSON string escapes are AIP-160's
        result.encode()  # a lone surrogate ("\ud800") is no text to compare with
    except (ValueError, UnicodeEncodeError):
        raise InvalidArgument(f"invalid string {quote(value)} in filter: bad escape") from None
    return result


def parse_filter(text: str) -> tuple[Condition, ...]:
    """The conditions a filter names, all of which a sandbox must meet; none for ""."""
    _check_bounds(text)
    tokens = _tokens(text)
    if not tokens:
        return ()
    conditions: list[Condition] = []
    position = 0

    def fail(reason: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {quote(text)}: {reason}")

    while True:
        if len(conditions) == MAX_FILTER_TERMS:
            raise fail(f"more than {MAX_FILTER_TERMS} comparisons")
        if position + 3 > len(tokens):
            raise fail("expected FIELD OPERATOR VALUE, e.g. state = RUNNING")
        (field_kind, field), (op_kind, op), (value_kind, raw_value) = tokens[
            position : position + 3
        ]
        position += 3
        if field_kind != "word":
            raise fail(f"expected a field name ({_FIELDS_HELP}), got {quote(field)}")
        if op_kind != "op":
            raise fail(f"expected =, != or : after {quote(field)}, got {quote(op)}")
        if value_kind not in ("word", "string"):
            raise fail(f"expected a value after {quote(field)} {op}")
        value = _unquote(value_kind, raw_value)

        if field == "state":
            if op == ":":
                raise fail("state supports = and !=")
            state = _STATES.get(value)
            if state is None:
                raise fail(f"unknown state {quote(value)}; states are {', '.join(_STATES)}")
            conditions.append(StateIs(state, negated=op == "!="))
        elif field.startswith("labels."):
            key = field.removeprefix("labels.")
            if not is_valid_label_key(key):
                raise fail(f"invalid label key {quote(key)}: keys match {LABEL_KEY_PATTERN}")
            if op == ":":
                if not (value_kind == "word" and value == "*"):
                    raise fail(f"use labels.{key}:* to test that a label is present")
                conditions.append(LabelPresent(key))
            else:
                conditions.append(LabelIs(key, value, negated=op == "!="))
        else:
            raise fail(f"unknown field {quote(field)}; filterable fields are {_FIELDS_HELP}")

        if position == len(tokens):
            break
        kind, word = tokens[position]
        if kind == "word" and word == "AND":
            position += 1
            continue
        if kind == "word" and word.upper() in ("OR", "NOT"):
            raise fail(f"{word.upper()} is not supported; join comparisons with AND")
        raise fail(f"expected AND after a comparison, got {quote(word)}")
    return tuple(conditions)
