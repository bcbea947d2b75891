"""Bearer tokens, projects and quotas, through a second real controller that requires them."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import sibling_config

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
ALPHA = ("authorization", "Bearer alpha-token")
BETA = ("authorization", "Bearer beta-token")


@pytest.fixture(scope="module")
async def guarded(
    e2e_config: Config, controller: Controller, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Controller]:
    """A controller that requires tokens, with small quotas, on the session's podman."""
    state = tmp_path_factory.mktemp("guarded")
    tokens = state / "tokens.toml"
    entries = [("agent-alpha", "alpha-token", "alpha"), ("agent-beta", "beta-token", "beta")]
    tokens.write_text(
        "".join(
            f'[[tokens]]\nname = "{name}"\nprojects = ["{project}"]\n'
            f'sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\n'
            for name, token, project in entries
        )
    )
    config = sibling_config(
        e2e_config,
        controller,
        "guarded",
        state_dir=state,
        tokens_file=tokens,
        max_sandboxes_per_project=2,
        max_executes_per_minute=5,
    )
    running = await start_controller(config)
    yield running
    for project, credentials in (("alpha", ALPHA), ("beta", BETA)):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
            page = await stub.ListSandboxes(
                sandbox_pb2.ListSandboxesRequest(parent=f"projects/{project}"),
                metadata=[credentials],
            )
            for sandbox in page.sandboxes:
                await stub.DeleteSandbox(
                    sandbox_pb2.DeleteSandboxRequest(name=sandbox.name), metadata=[credentials]
                )
    await running.stop(grace=1)


@pytest.fixture
async def guarded_stub(guarded: Controller) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        yield sandbox_pb2_grpc.SandboxServiceStub(channel)


async def expect(call: object, code: grpc.StatusCode, fragment: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    assert fragment in (caught.value.details() or "")


async def test_no_or_unknown_token_is_unauthenticated(guarded_stub: Stub) -> None:
    request = sandbox_pb2.ListSandboxesRequest(parent="projects/alpha")
    await expect(
        guarded_stub.ListSandboxes(request), grpc.StatusCode.UNAUTHENTICATED, "missing credentials"
    )
    await expect(
        guarded_stub.ListSandboxes(request, metadata=[("authorization", "Bearer nope")]),
        grpc.StatusCode.UNAUTHENTICATED,
        "unknown or revoked token",
    )


async def test_health_needs_no_token(guarded: Controller) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_token_reaches_only_its_projects(guarded_stub: Stub) -> None:
    mine = await guarded_stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent="projects/alpha", sandbox_id="mine"),
        metadata=[ALPHA],
    )
    response = await guarded_stub.ExecuteCode(
        sandbox_pb2.ExecuteCodeRequest(name=mine.name, code="1 + 1"), metadata=[ALPHA]
    )
    assert response.outputs[0].text["text/plain"] == "2"
    denied = grpc.StatusCode.PERMISSION_DENIED
    await expect(
        guarded_stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=mine.name), metadata=[BETA]),
        denied,
        "agent-beta may not use project 'alpha'",
    )
    # The same answer whether the sandbox exists or not: nothing leaks.
    await expect(
        guarded_stub.GetSandbox(
            sandbox_pb2.GetSandboxRequest(name="projects/alpha/sandboxes/nothing"),
            metadata=[BETA],
        ),
        denied,
        "agent-beta may not use project 'alpha'",
    )
    for call in (
        guarded_stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=mine.name, code="1"), metadata=[BETA]
        ),
        guarded_stub.DeleteSandbox(
            sandbox_pb2.DeleteSandboxRequest(name=mine.name), metadata=[BETA]
        ),
        guarded_stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(parent="projects/alpha"), metadata=[BETA]
        ),
        guarded_stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(parent="projects/alpha"), metadata=[BETA]
        ),
    ):
        await expect(call, denied, "may not use project 'alpha'")
    listed = await guarded_stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(parent="projects/beta"), metadata=[BETA]
    )
    assert list(listed.sandboxes) == []


async def test_quotas_name_their_limit(guarded_stub: Stub) -> None:
    first = await guarded_stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent="projects/beta"), metadata=[BETA]
    )
    await guarded_stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent="projects/beta"), metadata=[BETA]
    )
    await expect(
        guarded_stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(parent="projects/beta"), metadata=[BETA]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "has 2 sandboxes, its quota of 2",
    )
    for _ in range(5):
        await guarded_stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=first.name, code="1"), metadata=[BETA]
        )
    await expect(
        guarded_stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=first.name, code="1"), metadata=[BETA]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "its quota of 5 per minute",
    )
