"""The rule for file paths callers send: relative to /workspace, and nothing else.

Shared by the controller (which refuses bad paths before anything reaches a sandbox) and the
executor (which checks again, and refuses paths through symlinks, which only it can see).
"""

MAX_PATH_BYTES = 4096


class InvalidPath(ValueError):
    """A caller's path is not a plain relative path inside /workspace."""


def check_relative_path(path: str) -> tuple[str, ...]:
    """Returns the path's components; InvalidPath names what is wrong with it."""
    if not path:
        raise InvalidPath("a file path is empty")
    if "\0" in path:
        raise InvalidPath(f"file path {path!r} contains a NUL byte")
    if len(path.encode()) > MAX_PATH_BYTES:
        raise InvalidPath(f"file path {path[:64]!r}... is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise InvalidPath(
            f"file path {path!r} is absolute: give it relative to /workspace, e.g. 'data.csv'"
        )
    parts = tuple(path.split("/"))
    if ".." in parts:
        raise InvalidPath(f"file path {path!r} contains '..': paths stay inside /workspace")
    if any(part in ("", ".") for part in parts):
        raise InvalidPath(f"file path {path!r} has an empty or '.' component")
    return parts
