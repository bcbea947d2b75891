"""Bad requests get a precise status code and a message a person can act on."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest

from petri.v1 import sandbox_pb2
from tests.e2e.helpers import PARENT

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def expect(call: object, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    for fragment in fragments:
        assert fragment in (caught.value.details() or "")


@pytest.mark.parametrize(
    "name", ["", "sandboxes/x", "projects/e2e/sandboxes/UPPER", "projects/e2e/sandboxes/a/b"]
)
async def test_malformed_names(stub: Stub, name: str) -> None:
    await expect(
        stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name)),
        INVALID,
        "projects/{project}/sandboxes/{sandbox}",
    )
    await expect(
        stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name, code="1")),
        INVALID,
        "invalid sandbox name",
    )


async def test_malformed_parent_and_sandbox_id(stub: Stub) -> None:
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent="e2e")),
        INVALID,
        "expected projects/{project}",
    )
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id="Bad_Id")),
        INVALID,
        "invalid sandbox_id 'Bad_Id'",
    )


async def test_unknown_filter_field(stub: Stub) -> None:
    await expect(
        stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter="owner = me")),
        INVALID,
        "unknown field 'owner'",
        "state, labels.KEY",
    )


async def test_negative_page_size(stub: Stub) -> None:
    await expect(
        stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT, page_size=-1)),
        INVALID,
        "page_size must not be negative",
    )


async def test_foreign_page_token(stub: Stub) -> None:
    await expect(
        stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT, page_token="abc")),
        INVALID,
        "invalid page_token",
    )


async def test_bad_order_by(stub: Stub) -> None:
    await expect(
        stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT, order_by="size")),
        INVALID,
        "create_time, expire_time, name",
    )


async def test_unknown_sandbox(stub: Stub) -> None:
    name = f"{PARENT}/sandboxes/never-created"
    await expect(
        stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name)),
        grpc.StatusCode.NOT_FOUND,
        f"sandbox {name} does not exist",
    )
    await expect(
        stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name, code="1")),
        grpc.StatusCode.NOT_FOUND,
        "does not exist",
    )


async def test_ttl_beyond_the_maximum_names_the_maximum(stub: Stub) -> None:
    sandbox = sandbox_pb2.Sandbox()
    sandbox.ttl.FromSeconds(15 * 86400)
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox)),
        INVALID,
        "exceeds the maximum of 14d",
    )


async def test_bad_labels(stub: Stub) -> None:
    sandbox = sandbox_pb2.Sandbox(labels={"Team": "x"})
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox)),
        INVALID,
        "invalid label key 'Team'",
    )


async def test_unknown_image_profile(stub: Stub) -> None:
    sandbox = sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile="nope"))
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "image profile 'nope' is not available",
        "sandbox-image/build.sh nope",
    )


async def test_empty_code_and_bad_timeouts(stub: Stub) -> None:
    name = f"{PARENT}/sandboxes/whatever"
    await expect(
        stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name, code="")),
        INVALID,
        "code is empty",
    )
    request = sandbox_pb2.ExecuteCodeRequest(name=name, code="1")
    request.timeout.FromSeconds(10 * 3600)
    await expect(stub.ExecuteCode(request), INVALID, "exceeds the maximum of 1h")


async def test_update_of_an_immutable_field(stub: Stub) -> None:
    request = sandbox_pb2.UpdateSandboxRequest(
        sandbox=sandbox_pb2.Sandbox(name=f"{PARENT}/sandboxes/x")
    )
    request.update_mask.paths.append("spec")
    await expect(stub.UpdateSandbox(request), INVALID, "cannot update spec")


async def test_update_mask_must_name_the_expiration_that_is_set(stub: Stub) -> None:
    sandbox = sandbox_pb2.Sandbox(name=f"{PARENT}/sandboxes/x")
    sandbox.expire_time.FromSeconds(2_000_000_000)
    request = sandbox_pb2.UpdateSandboxRequest(sandbox=sandbox)
    request.update_mask.paths.append("ttl")
    await expect(stub.UpdateSandbox(request), INVALID, "names ttl but the sandbox sets expire_time")


async def test_filter_with_a_bad_escape(stub: Stub) -> None:
    await expect(
        stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter='labels.a = "\\x"')
        ),
        INVALID,
        "bad escape",
    )
