"""The `full` image profile: its whole supported library list, checked inside a real sandbox.

sandbox-image/verify_full.py runs as one notebook cell in a `full` sandbox (pins, imports and one
small real operation per area). Needs localhost/petri-sandbox:full (`sandbox-image/build.sh
full`, ~5 GB): without it the sandbox tests are skipped, unless PETRI_REQUIRE_FULL_IMAGE is set,
which makes a missing image a failure.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from google.protobuf import duration_pb2

from controller.config import Config
from petri.v1 import sandbox_pb2
from tests.conftest import CreateSandbox
from tests.e2e.helpers import execute, podman, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e

SANDBOX_IMAGE_DIR = Path(__file__).resolve().parents[2] / "sandbox-image"
VERIFY_SCRIPT = SANDBOX_IMAGE_DIR / "verify_full.py"
PROFILE_PINS = SANDBOX_IMAGE_DIR / "profiles" / "full.txt"
VERIFY_TIMEOUT_SECONDS = 600  # tensorflow's first import alone takes seconds


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _script_constant(name: str) -> dict[str, object]:
    """A dict literal assigned at the top level of verify_full.py."""
    for node in ast.parse(VERIFY_SCRIPT.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == name for target in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict), name
            return value
    raise AssertionError(f"{VERIFY_SCRIPT.name} assigns no {name}")


@pytest.fixture
def full_image(e2e_config: Config) -> str:
    """The full image's name; skips (or fails, with PETRI_REQUIRE_FULL_IMAGE) without it."""
    image = f"{e2e_config.image_repository}:full"
    found = subprocess.run(["podman", "image", "exists", image], check=False).returncode == 0
    if not found:
        message = f"{image} does not exist: build it with `sandbox-image/build.sh full`"
        if os.environ.get("PETRI_REQUIRE_FULL_IMAGE"):
            pytest.fail(f"{message} (PETRI_REQUIRE_FULL_IMAGE is set)")
        pytest.skip(message)
    return image


def test_verify_script_checks_exactly_the_profile_pins() -> None:
    """verify_full.py's PINS and ADDED are profiles/full.txt, no more, no less."""
    pinned: dict[str, str] = {}
    for line in PROFILE_PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pinned[_normalize(name)] = version
    checked: dict[str, str] = {}
    for dist, spec in _script_constant("PINS").items():
        assert isinstance(spec, tuple)
        checked[_normalize(dist)] = str(spec[0])
    for dist, pin in _script_constant("ADDED").items():
        checked[_normalize(dist)] = str(pin)
    assert checked == pinned


async def test_full_image_passes_its_verification(
    full_image: str, stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = await create_sandbox(spec=sandbox_pb2.SandboxSpec(image_profile="full"))
    response = await execute(
        stub,
        sandbox.name,
        VERIFY_SCRIPT.read_text(),
        timeout=duration_pb2.Duration(seconds=VERIFY_TIMEOUT_SECONDS),
    )
    report = f"stdout:\n{response.stdout}\nstderr (tail):\n{response.stderr[-3000:]}"
    assert not response.HasField("error"), f"{response.error}\n{report}"
    value = value_of(response)
    assert value is not None, report
    summary = ast.literal_eval(value)
    assert summary["failures"] == [], report
    assert summary["checked"] == len(_script_constant("PINS")), report


async def test_full_image_carries_its_manifest(
    full_image: str, stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = await create_sandbox(spec=sandbox_pb2.SandboxSpec(image_profile="full"))
    response = await execute(
        stub,
        sandbox.name,
        "import json\n"
        "with open('/opt/petri/manifest.json') as f:\n"
        "    manifest = json.load(f)\n"
        "json.dumps(manifest)",
    )
    assert not response.HasField("error"), response.error
    value = value_of(response)
    assert value is not None
    manifest = json.loads(ast.literal_eval(value))
    assert manifest["profile"] == "full"
    assert manifest["python"].startswith("3.13.")
    assert manifest["packages"]["numpy"] == "2.1.3"
    # The same manifest is the image's label io.petri.manifest.
    label = podman(
        "image", "inspect", "--format", '{{index .Labels "io.petri.manifest"}}', full_image
    )
    assert json.loads(label) == manifest
