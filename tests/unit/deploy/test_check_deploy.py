"""deploy/ validated offline by scripts/check-deploy: the manifests render and match the
Kubernetes API's schemas, the systemd units verify, and a broken copy of either is rejected.

Needs kubectl, kubernetes-validate (the dev extra) and systemd-analyze: without one, these
tests skip, or fail when CI is set (CI must validate deploy/, not skip it).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "scripts" / "check-deploy"


def _require(tool: str, present: bool) -> None:
    if present:
        return
    message = f"{tool} is not installed: deploy/ cannot be validated"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI is set; scripts/bootstrap installs it)")
    pytest.skip(message)


@pytest.fixture(scope="module", autouse=True)
def tools() -> None:
    _require("kubectl", shutil.which("kubectl") is not None)
    _require("kubernetes-validate", importlib.util.find_spec("kubernetes_validate") is not None)
    _require("systemd-analyze", shutil.which("systemd-analyze") is not None)


def check(deploy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), str(deploy)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "deploy"
    shutil.copytree(REPO / "deploy", copy)
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def test_deploy_is_valid() -> None:
    result = check(REPO / "deploy")
    assert result.returncode == 0, result.stderr
    # Every rendering was checked, not skipped: each one's line names it.
    for name in ("base", "overlays/with-postgres", "overlays/external-postgres", "secrets-example"):
        assert f"ok: {name} (" in result.stderr
    units = sorted(p.name for p in (REPO / "deploy" / "systemd").glob("*.service"))
    assert {"petri-node.service", "petri-gateway.service"} <= set(units)
    assert f"ok: {len(units)} of {len(units)} systemd units verified" in result.stderr


def test_unknown_field_is_rejected(deploy_copy: Path) -> None:
    # A typo a cluster would reject (strict schemas: no unknown fields).
    edit(deploy_copy / "kubernetes/base/gateway.yaml", "  replicas: 2\n", "  replica: 2\n")
    result = check(deploy_copy)
    assert result.returncode == 1
    assert "deployment/petri-gateway" in result.stderr
    assert "replica" in result.stderr


def test_unknown_api_version_is_rejected(deploy_copy: Path) -> None:
    # kubernetes-validate only warns when it has no schema: the script makes that an error.
    gateway = deploy_copy / "kubernetes/base/gateway.yaml"
    edit(gateway, "apiVersion: policy/v1\n", "apiVersion: policy/v1beta7\n")
    result = check(deploy_copy)
    assert result.returncode == 1
    assert "WARN" in result.stderr and "PodDisruptionBudget" in result.stderr


def test_wrong_type_in_an_overlay_is_rejected(deploy_copy: Path) -> None:
    postgres = deploy_copy / "kubernetes/overlays/with-postgres/postgres.yaml"
    edit(postgres, "  replicas: 1\n", '  replicas: "one"\n')
    result = check(deploy_copy)
    assert result.returncode == 1
    assert "does not validate" in result.stderr and "statefulset/petri-postgres" in result.stderr


def test_kustomize_error_is_rejected(deploy_copy: Path) -> None:
    (deploy_copy / "kubernetes/base/network-policy.yaml").unlink()
    result = check(deploy_copy)
    assert result.returncode == 1
    assert "kubectl kustomize base" in result.stderr


def test_invalid_unit_is_rejected(deploy_copy: Path) -> None:
    edit(deploy_copy / "systemd/petri-node.service", "Restart=on-failure\n", "Restart=sometimes\n")
    result = check(deploy_copy)
    assert result.returncode == 1
    assert "systemd-analyze verify petri-node.service" in result.stderr


def test_user_specifier_in_a_system_unit_is_rejected(deploy_copy: Path) -> None:
    # %U in a system unit is the service manager's uid (0), whatever User= says: the runtime
    # directory would have been root's /run/user/0.
    edit(
        deploy_copy / "systemd/petri-podman.service",
        "WorkingDirectory=/\n",
        "WorkingDirectory=/\nEnvironment=XDG_RUNTIME_DIR=/run/user/%U\n",
    )
    result = check(deploy_copy)
    assert result.returncode == 1
    assert "petri-podman.service: %u, %U" in result.stderr
