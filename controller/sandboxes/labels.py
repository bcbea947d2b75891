"""Validation of labels and display names (the rules of Google Cloud labels)."""

import re

from controller.errors import InvalidArgument
from controller.quoting import quote

LABEL_KEY_PATTERN = "[a-z][a-z0-9_-]{0,62}"
LABEL_VALUE_PATTERN = "[a-z0-9_-]{0,63}"
MAX_LABELS = 64
MAX_DISPLAY_NAME = 256
_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)


def is_valid_label_key(key: str) -> bool:
    return _KEY.fullmatch(key) is not None


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"too many labels: {len(labels)}, at most {MAX_LABELS}")
    for key, value in labels.items():
        if not is_valid_label_key(key):
            raise InvalidArgument(
                f"invalid label key {quote(key)}: keys match {LABEL_KEY_PATTERN} "
                "(lowercase letters, digits, '_' and '-', starting with a letter)"
            )
        if _VALUE.fullmatch(value) is None:
            raise InvalidArgument(
                f"invalid value {quote(value)} of label {quote(key)}: "
                f"values match {LABEL_VALUE_PATTERN}"
            )
    return dict(labels)


def validate_display_name(display_name: str) -> str:
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(
            f"display_name has {len(display_name)} characters, at most {MAX_DISPLAY_NAME}"
        )
    if any(ord(c) < 32 for c in display_name):
        raise InvalidArgument("display_name must not contain control characters")
    return display_name
