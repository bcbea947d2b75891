"""End-to-end fixtures for tests/e2e and tests/adversarial: a real controller (in-process,
real gRPC on a loopback port) driving real
rootless podman. Run as the unprivileged user that owns the podman storage and the sandbox image
(scripts/test does this). Nothing here is mocked."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, podman
from tests.postgres import Cluster, cluster_fixture

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

CreateSandbox = Callable[..., Awaitable[sandbox_pb2.Sandbox]]


def _short_temp_dir(prefix: str) -> Path:
    # Unix socket paths are limited to 107 bytes: keep the runtime directory short.
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


@pytest.fixture(scope="session")
def postgres_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real PostgreSQL (scripts/postgres) for the session, in a temporary directory."""
    yield from cluster_fixture(tmp_path_factory)


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: Cluster) -> str:
    """The URL of the session's PostgreSQL database `petri` (a unix socket)."""
    return postgres_cluster.url


@pytest.fixture(scope="session")
def e2e_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run the tests through scripts/test")
    if os.geteuid() == 0:
        pytest.fail(
            "end-to-end tests use rootless podman: run them as the service user "
            "(scripts/test does this)"
        )
    return Config(
        listen="127.0.0.1:0",
        state_dir=tmp_path_factory.mktemp("state"),
        runtime_dir=_short_temp_dir("petri-e2e-"),
        default_image_profile=os.environ.get("PETRI_TEST_IMAGE_PROFILE", "test"),
        image_repository=os.environ.get("PETRI_IMAGE_REPOSITORY", "localhost/petri-sandbox"),
        kill_grace=timedelta(seconds=1),
        # The suites' own bursts (a flood of 1000 executes) must not meet the default quotas.
        max_executes_per_minute=100_000,
        max_sandboxes_per_project=1000,
        start_timeout=timedelta(seconds=60),
        # Cold creates for the suite, so each test knows what it gets; the warm pool has
        # tests of its own (test_warm_pool.py), with a controller of their own.
        warm_pool=(),
        # Idle checkpoints would save the suites' hostile workspaces in the background, and
        # make a sandbox whose container a test removes come back rather than terminate:
        # hibernation has tests of its own (test_hibernation.py), with controllers of their own.
        checkpoint_idle_after=timedelta(0),
    )


@pytest.fixture(scope="session")
async def controller(e2e_config: Config) -> AsyncIterator[Controller]:
    running = await start_controller(e2e_config)
    yield running
    await running.stop(grace=1)
    # Leave no container behind, whatever the tests did.
    label = f"io.petri.registry={running.manager.registry_label}"
    names = podman("ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}").split()
    if names:
        podman("rm", "-f", *names)
    shutil.rmtree(e2e_config.runtime_dir, ignore_errors=True)


@pytest.fixture(scope="session")
async def channel(controller: Controller) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{controller.port}",
        options=[("grpc.max_receive_message_length", 128 << 20)],
    ) as chan:
        yield chan


@pytest.fixture(scope="session")
def stub(channel: grpc.aio.Channel) -> Stub:
    return sandbox_pb2_grpc.SandboxServiceStub(channel)


@pytest.fixture
async def create_sandbox(
    stub: Stub,
) -> AsyncIterator[CreateSandbox]:
    """Creates sandboxes through the API and deletes them after the test."""
    created: list[str] = []

    async def create(
        labels: dict[str, str] | None = None, sandbox_id: str = "", **fields: object
    ) -> sandbox_pb2.Sandbox:
        sandbox = await stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(
                parent=PARENT,
                sandbox_id=sandbox_id or f"t-{uuid.uuid4().hex[:10]}",
                sandbox=sandbox_pb2.Sandbox(labels=labels or {}, **fields),  # type: ignore[arg-type]
            )
        )
        created.append(sandbox.name)
        return sandbox

    yield create
    for name in created:
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name, allow_missing=True))


@pytest.fixture
async def sandbox(create_sandbox: CreateSandbox) -> sandbox_pb2.Sandbox:
    return await create_sandbox()
