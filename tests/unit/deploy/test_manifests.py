"""What the schemas cannot say about the rendered manifests: the pods' security posture (the node
container is the only privileged one), that every Service, budget and policy selects the pods
it is for, and that every Secret and ConfigMap a pod reads exists with the keys it reads."""

import copy
import importlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

KUBERNETES = Path(__file__).resolve().parents[3] / "deploy/kubernetes"
WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")
# The one container that runs privileged (base/node.yaml says why), and the one that runs as
# root to chown the node's host directory.
PRIVILEGED = {("petri-node", "node")}
ROOT = {("petri-node", "own-state")}


def render(directory: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        message = "kubectl is not installed: the manifests cannot be rendered"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set)")
        pytest.skip(message)
    yaml: Any = importlib.import_module("yaml")  # PyYAML comes with kubernetes-validate (dev)
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render(KUBERNETES / "overlays/with-postgres")


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The Secrets secrets-example generates, with their keys."""
    example = tmp_path_factory.mktemp("secrets") / "secrets-example"
    shutil.copytree(KUBERNETES / "secrets-example", example)
    tls = ("tls.crt", "tls.key", "ca.crt", "node-tls.crt", "node-tls.key", "node-ca.crt")
    for name in ("tokens.toml", *tls):
        (example / name).write_text("placeholder")
    for name in ("database-url", "database-password"):
        (example / name).write_text("placeholder")
    return {s["metadata"]["name"]: set(s["data"]) for s in render(example)}


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def containers(workload: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    found = [o for o in objects if o["kind"] in WORKLOADS]
    names = {o["metadata"]["name"] for o in found}
    assert names == {"petri-gateway", "petri-node", "petri-postgres"}
    return found


def test_pods_run_unprivileged_but_the_node_container(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, name
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(key), (name, key)
        for container in containers(workload):
            where = (name, container["name"])
            security = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
            assert container["resources"]["requests"], where
            assert security.get("privileged", False) == (where in PRIVILEGED), where
            assert security["runAsNonRoot"] is (where not in ROOT), where
            assert security.get("runAsUser") != 0 or where in ROOT, where
            if where in PRIVILEGED:
                assert security["runAsUser"] == 1000, where
                continue
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert set(security["capabilities"].get("add", [])) <= {"CHOWN", "FOWNER"}, where


def test_the_check_above_catches_a_privileged_gateway(objects: list[dict[str, Any]]) -> None:
    broken = copy.deepcopy(objects)
    gateway = find(broken, "Deployment", "petri-gateway")
    gateway["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    with pytest.raises(AssertionError):
        test_pods_run_unprivileged_but_the_node_container(broken)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    if any(labels.get(k) != v for k, v in wanted.items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In"
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def pod_labels(objects: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    pods = workloads(objects)
    return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"] for w in pods}


def test_selectors_select_their_pods(objects: list[dict[str, Any]]) -> None:
    labels = pod_labels(objects)
    expect = {
        ("Service", "petri-gateway"): {"petri-gateway"},
        ("Service", "petri-node"): {"petri-node"},
        ("Service", "petri-postgres"): {"petri-postgres"},
        ("PodDisruptionBudget", "petri-gateway"): {"petri-gateway"},
        ("NetworkPolicy", "petri-node"): {"petri-node"},
        ("NetworkPolicy", "petri-postgres"): {"petri-postgres"},
    }
    found = {}
    for o in objects:
        key = (o["kind"], o["metadata"]["name"])
        if o["kind"] == "Service":
            selector = {"matchLabels": o["spec"]["selector"]}
        elif o["kind"] == "PodDisruptionBudget":
            selector = o["spec"]["selector"]
        elif o["kind"] == "NetworkPolicy":
            selector = o["spec"]["podSelector"]
        else:
            continue
        found[key] = {name for name, pod in labels.items() if selects(selector, pod)}
    assert found == expect
    # Only gateways (and nodes, moving a draining node's sandboxes) reach a node's API; only
    # petri's pods reach PostgreSQL.
    node_policy = find(objects, "NetworkPolicy", "petri-node")
    api_rule = next(r for r in node_policy["spec"]["ingress"] if r["ports"][0]["port"] == 50051)
    reach_api = {
        n for n, pod in labels.items() for p in api_rule["from"] if selects(p["podSelector"], pod)
    }
    assert reach_api == {"petri-gateway", "petri-node"}
    (db_rule,) = find(objects, "NetworkPolicy", "petri-postgres")["spec"]["ingress"]
    (peer,) = db_rule["from"]
    reach_db = {n for n, pod in labels.items() if selects(peer["podSelector"], pod)}
    assert reach_db == {"petri-gateway", "petri-node"}


def test_secrets_and_config_maps_exist(
    objects: list[dict[str, Any]], secrets: dict[str, set[str]]
) -> None:
    config_maps = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    read: list[tuple[str, str | None]] = []
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                read.append((volume["secret"]["secretName"], None))
                # The keys a volume picks (items), the Secret has.
                for item in volume["secret"].get("items", []):
                    read.append((volume["secret"]["secretName"], item["key"]))
                # Secret files are root's: a non-root process reads them through fsGroup.
                if not volume["secret"].get("defaultMode", 0o644) & 0o004:
                    fs_group = pod["securityContext"].get("fsGroup")
                    assert fs_group == pod["securityContext"]["runAsGroup"], volume["name"]
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    read.append((ref["name"], ref["key"]))
    assert {name for name, _ in read} == set(secrets)
    for name, key in read:
        assert key is None or key in secrets[name], (name, key)
    # What the gateways and nodes mount from the TLS Secrets, the Secrets have.
    assert {"tls.crt", "tls.key", "ca.crt"} <= secrets["petri-tls"]
    assert {"tls.crt", "tls.key", "ca.crt"} <= secrets["petri-node-tls"]
    assert "tokens.toml" in secrets["petri-tokens"]


def test_probes_and_services_use_the_listening_port(objects: list[dict[str, Any]]) -> None:
    for workload in workloads(objects):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            env = {v["name"]: v.get("value") for v in container.get("env", [])}
            if "PETRI_LISTEN" not in env:
                continue
            port = int(env["PETRI_LISTEN"].rpartition(":")[2])
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert ports["grpc"] == port
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                spec = container[probe]
                if "grpc" in spec:
                    assert spec["grpc"]["port"] == port
                else:
                    assert f"127.0.0.1:{port}" in spec["exec"]["command"][-1]
