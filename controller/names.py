"""Resource names (AIP-122): projects/{project}/sandboxes/{sandbox}."""

import re
import secrets
from dataclasses import dataclass

from controller.errors import InvalidArgument
from controller.quoting import quote

ID_PATTERN = "[a-z][a-z0-9-]{0,62}"
_ID = re.compile(ID_PATTERN)
_FORMAT = "projects/{project}/sandboxes/{sandbox}"


@dataclass(frozen=True, order=True)
class SandboxName:
    project: str
    sandbox_id: str

    def __str__(self) -> str:
        return f"projects/{self.project}/sandboxes/{self.sandbox_id}"


def _valid_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None and not value.endswith("-")


def parse_parent(parent: str) -> str:
    """Returns the project id of `projects/{project}`."""
    # At most one split too many: a name of a million slashes is not cut a million times.
    parts = parent.split("/", 2)
    if len(parts) != 2 or parts[0] != "projects" or not _valid_id(parts[1]):
        raise InvalidArgument(
            f"invalid parent {quote(parent)}: expected projects/{{project}}, the project id "
            f"matching {ID_PATTERN} (lowercase, not ending in '-')"
        )
    return parts[1]


def parse_sandbox_name(name: str) -> SandboxName:
    parts = name.split("/", 4)
    if (
        len(parts) != 4
        or parts[0] != "projects"
        or parts[2] != "sandboxes"
        or not _valid_id(parts[1])
        or not _valid_id(parts[3])
    ):
        raise InvalidArgument(
            f"invalid sandbox name {quote(name)}: expected {_FORMAT}, each id matching "
            f"{ID_PATTERN} (lowercase, not ending in '-')"
        )
    return SandboxName(parts[1], parts[3])


def validate_sandbox_id(sandbox_id: str) -> str:
    if not _valid_id(sandbox_id):
        raise InvalidArgument(
            f"invalid sandbox_id {quote(sandbox_id)}: it must match {ID_PATTERN} "
            "(start with a lowercase letter; lowercase letters, digits and '-'; "
            "at most 63 characters; not ending in '-'), or be empty to let the server choose"
        )
    return sandbox_id


def generate_sandbox_id() -> str:
    return "sbx-" + secrets.token_hex(6)
