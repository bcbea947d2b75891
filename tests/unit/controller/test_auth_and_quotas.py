import hashlib
from pathlib import Path

import pytest

from controller.api.auth import TokenTable
from controller.app import tokens_for
from controller.config import load_config
from controller.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from controller.sandboxes.quotas import Quotas


def tokens_file(tmp_path: Path) -> Path:
    digest = hashlib.sha256(b"secret-a").hexdigest()
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[tokens]]\nname = "agent-a"\nsha256 = "{digest}"\nprojects = ["alpha"]\n'
        f'[[tokens]]\nname = "ops"\nsha256 = "{hashlib.sha256(b"root").hexdigest()}"\n'
        'projects = ["*"]\n'
    )
    return path


def test_a_known_token_is_its_principal_and_sees_only_its_projects(tmp_path: Path) -> None:
    table = TokenTable.load(tokens_file(tmp_path))
    agent = table.authenticate([("authorization", "Bearer secret-a")])
    assert agent.name == "agent-a"
    agent.check_project("alpha")
    with pytest.raises(PermissionDenied, match="agent-a may not use project 'beta'"):
        agent.check_project("beta")
    table.authenticate([("authorization", "bearer root")]).check_project("anything")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing credentials"),
        ([("authorization", "Basic xyz")], "Bearer <token>"),
        ([("authorization", "Bearer ")], "Bearer <token>"),
        ([("authorization", "Bearer wrong")], "unknown or revoked"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    tmp_path: Path, metadata: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        TokenTable.load(tokens_file(tmp_path)).authenticate(metadata)


def test_a_broken_tokens_file_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[tokens]]\nname = "x"\nsha256 = "short"\nprojects = ["a"]\n')
    with pytest.raises(ValueError, match="64 hex digits"):
        TokenTable.load(path)


def test_no_auth_is_refused_beyond_loopback_unless_asked_for() -> None:
    assert tokens_for(load_config(["--listen", "127.0.0.1:0"], environ={})) is None
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0:50051"):
        tokens_for(load_config(["--listen", "0.0.0.0:50051"], environ={}))
    insecure = load_config(["--listen", "0.0.0.0:50051", "--insecure-no-auth"], environ={})
    assert insecure.insecure_no_auth and tokens_for(insecure) is None


def test_sandbox_quota_names_the_limit() -> None:
    quotas = Quotas(2, 10, 1)
    quotas.check_sandbox_count("alpha", 1)
    with pytest.raises(ResourceExhausted, match="quota of 2"):
        quotas.check_sandbox_count("alpha", 2)


def test_execute_rate_is_per_project_over_a_sliding_minute() -> None:
    now = [0.0]
    quotas = Quotas(10, 3, 1, clock=lambda: now[0])
    for _ in range(3):
        quotas.count_execute("alpha")
    with pytest.raises(ResourceExhausted, match="quota of 3 per minute"):
        quotas.count_execute("alpha")
    quotas.count_execute("beta")
    now[0] = 61.0
    quotas.count_execute("alpha")


def test_concurrent_creates_are_bounded() -> None:
    quotas = Quotas(10, 10, 1)
    quotas.take_create_slot()
    with pytest.raises(ResourceExhausted, match="limit of 1 at once"):
        quotas.take_create_slot()
    quotas.release_create_slot()
    quotas.take_create_slot()
