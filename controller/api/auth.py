"""Who is calling, and which projects they may use.

Callers send `authorization: Bearer <token>`. The tokens file (TOML) maps tokens, stored as
SHA-256 digests so the file is no secret worth stealing, to the projects they may use:

    [[tokens]]
    name = "agent-a"                      # shown in logs and error messages
    sha256 = "9f86d08..."                 # sha256 of the token: `printf %s TOKEN | sha256sum`
    projects = ["alpha", "beta"]          # or ["*"] for every project

With no tokens file, authentication is off: allowed only on loopback addresses, or with an
explicit --insecure-no-auth, and logged loudly either way.

The token is checked once per call, by controller.api.interceptors.RequestGuard, before the call's
request is read; the handlers find the caller in `current_caller()`.
"""

import hashlib
import hmac
import tomllib
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from controller.errors import PermissionDenied, Unauthenticated

ALL_PROJECTS = "*"


@dataclass(frozen=True)
class Principal:
    name: str
    projects: frozenset[str]

    def may_use(self, project: str) -> bool:
        return ALL_PROJECTS in self.projects or project in self.projects

    def check_project(self, project: str) -> None:
        if not self.may_use(project):
            raise PermissionDenied(f"{self.name} may not use project {project!r}")


ANYONE = Principal("anyone (authentication is off)", frozenset({ALL_PROJECTS}))

# Set by the interceptor for the handler of each call it let through.
_CALLER: ContextVar[Principal] = ContextVar("petri_caller")


def set_current_caller(principal: Principal) -> None:
    _CALLER.set(principal)


def current_caller() -> Principal | None:
    """The caller of the call being handled, when the interceptor authenticated it."""
    return _CALLER.get(None)


class TokenTable:
    """Bearer tokens, by the SHA-256 of the token."""

    def __init__(self, by_digest: Mapping[str, Principal]) -> None:
        self._by_digest = dict(by_digest)

    def __repr__(self) -> str:
        return f"<TokenTable {len(self._by_digest)} tokens>"

    @classmethod
    def load(cls, path: Path) -> "TokenTable":
        """Reads a tokens file; ValueError says what is wrong with it."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read tokens file {path}: {exc}") from exc
        entries = data.get("tokens")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"tokens file {path} has no [[tokens]] entries")
        by_digest: dict[str, Principal] = {}
        for index, entry in enumerate(entries):
            where = f"{path}: tokens[{index}]"
            name, digest, projects = entry.get("name"), entry.get("sha256"), entry.get("projects")
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: `name` must be a non-empty string")
            if not isinstance(digest, str) or len(digest) != 64:
                raise ValueError(f"{where} ({name}): `sha256` must be 64 hex digits")
            if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
                raise ValueError(f"{where} ({name}): `projects` must be a list of project ids")
            by_digest[digest.lower()] = Principal(name, frozenset(projects))
        return cls(by_digest)

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        header = next((v for k, v in metadata if k == "authorization"), None)
        if header is None:
            raise Unauthenticated(
                "missing credentials: send the metadata `authorization: Bearer <token>`"
            )
        text = header.decode(errors="replace") if isinstance(header, bytes) else header
        scheme, _, token = text.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("the authorization metadata must be `Bearer <token>`")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown or revoked token")
