"""The rule for file paths callers send: relative to /workspace, and nothing else.

Shared by the controller (which refuses bad paths before anything reaches a sandbox) and the
executor (which checks again, and refuses paths through symlinks, which only it can see).
"""

# A caller's path, once under "/workspace/" and with its NUL, must fit PATH_MAX (4096): the
# executor's checks use absolute paths, and a longer one would fail there (ENAMETOOLONG).
WORKSPACE_PREFIX_BYTES = len("/workspace/")
MAX_PATH_BYTES = 4096 - WORKSPACE_PREFIX_BYTES - 1


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


class PathConflict(InvalidPath):
    """Two files of one request that cannot both be written: the same path twice, or one
    inside the other (a file where the other needs a directory)."""

    def __init__(self, path: str, other: str) -> None:
        self.path, self.other = path, other
        if path == other:
            super().__init__(f"file {path!r} is sent twice")
        else:
            super().__init__(
                f"files {other!r} and {path!r} cannot both be written: the first would have "
                "to be a directory of the second"
            )


class RequestPaths:
    """The paths of one request's files, checked as they come: none twice, and none where
    another needs a directory, so that the request is refused before anything is written."""

    def __init__(self) -> None:
        self._files: set[str] = set()
        # Every directory some file of the request lies in, with one such file.
        self._directories: dict[str, str] = {}

    def add(self, path: str, parts: tuple[str, ...]) -> None:
        if path in self._files:
            raise PathConflict(path, path)
        if path in self._directories:
            raise PathConflict(self._directories[path], path)
        prefixes = ["/".join(parts[:end]) for end in range(1, len(parts))]
        for prefix in prefixes:
            if prefix in self._files:
                raise PathConflict(path, prefix)
        self._files.add(path)
        for prefix in prefixes:
            self._directories.setdefault(prefix, path)
