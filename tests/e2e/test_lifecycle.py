"""Create, get, list, delete through the public API, checked against podman itself."""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.conftest import CreateSandbox
from tests.e2e.helpers import PARENT, execute, podman, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


def container_names() -> set[str]:
    return set(podman("ps", "-a", "--format", "{{.Names}}").split())


async def test_create_returns_a_running_sandbox_with_its_container(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = await create_sandbox(labels={"team": "ml"}, display_name="Analysis")
    assert sandbox.state == sandbox_pb2.Sandbox.RUNNING
    assert sandbox.name.startswith(f"{PARENT}/sandboxes/t-")
    assert sandbox.uid and sandbox.incarnation
    assert sandbox.display_name == "Analysis" and dict(sandbox.labels) == {"team": "ml"}
    assert sandbox.spec.image_profile and sandbox.spec.runtime == sandbox_pb2.SandboxSpec.RUNC
    assert sandbox.spec.resources.disk_bytes > 0
    lifetime = sandbox.expire_time.ToDatetime() - sandbox.create_time.ToDatetime()
    assert lifetime.total_seconds() == pytest.approx(3600, abs=5)
    assert f"petri-{sandbox.uid}" in container_names()


async def test_server_generates_an_id_when_none_is_given(stub: Stub) -> None:
    sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
    try:
        assert sandbox.name.startswith(f"{PARENT}/sandboxes/sbx-")
    finally:
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


async def test_a_duplicate_id_is_already_exists(stub: Stub, create_sandbox: CreateSandbox) -> None:
    sandbox = await create_sandbox()
    sandbox_id = sandbox.name.rsplit("/", 1)[1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create_sandbox(sandbox_id=sandbox_id)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert sandbox.name in (caught.value.details() or "")


async def test_a_retried_create_with_the_same_request_id_returns_the_same_sandbox(
    stub: Stub,
) -> None:
    request = sandbox_pb2.CreateSandboxRequest(parent=PARENT, request_id=str(uuid.uuid4()))
    first, second = await asyncio.gather(stub.CreateSandbox(request), stub.CreateSandbox(request))
    try:
        assert first.uid == second.uid
    finally:
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=first.name))


async def test_list_pages_one_at_a_time_and_filters(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    group = uuid.uuid4().hex[:8]
    created = [await create_sandbox(labels={"group": group, "n": str(i)}) for i in range(3)]
    names: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(
                parent=PARENT, page_size=1, page_token=token, filter=f"labels.group = {group}"
            )
        )
        pages += 1
        names += [s.name for s in page.sandboxes]
        token = page.next_page_token
        if not token:
            break
    assert names == [s.name for s in created]  # creation order, each exactly once
    assert pages == 3

    only_one = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(
            parent=PARENT, filter=f'labels.group = "{group}" AND labels.n = "1" AND state = RUNNING'
        )
    )
    assert [s.name for s in only_one.sandboxes] == [created[1].name]
    none_terminated = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(
            parent=PARENT, filter=f"labels.group = {group} AND state = TERMINATED"
        )
    )
    assert list(none_terminated.sandboxes) == [] and none_terminated.next_page_token == ""
    newest_first = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(
            parent=PARENT, filter=f"labels.group = {group}", order_by="create_time desc"
        )
    )
    assert [s.name for s in newest_first.sandboxes] == [s.name for s in reversed(created)]


async def test_delete_removes_the_container_and_leaves_a_tombstone(
    stub: Stub, create_sandbox: CreateSandbox
) -> None:
    sandbox = await create_sandbox()
    container = f"petri-{sandbox.uid}"
    assert container in container_names()
    await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    assert container not in container_names()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "was deleted at" in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await execute(stub, sandbox.name, "1")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "was deleted at" in (caught.value.details() or "")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await stub.DeleteSandbox(
        sandbox_pb2.DeleteSandboxRequest(name=sandbox.name, allow_missing=True)
    )


async def test_update_changes_labels_display_name_and_expiry(
    stub: Stub, sandbox: sandbox_pb2.Sandbox
) -> None:
    update = sandbox_pb2.Sandbox(name=sandbox.name, display_name="renamed", labels={"a": "b"})
    update.ttl.FromSeconds(600)
    request = sandbox_pb2.UpdateSandboxRequest(sandbox=update)
    request.update_mask.paths.extend(["labels", "ttl"])
    updated = await stub.UpdateSandbox(request)
    assert dict(updated.labels) == {"a": "b"}
    assert updated.display_name == sandbox.display_name  # not in the mask
    remaining = updated.expire_time.ToDatetime() - updated.update_time.ToDatetime()
    assert remaining.total_seconds() == pytest.approx(600, abs=5)


async def test_health_and_reflection_are_served(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="petri.v1.SandboxService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING

    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    services = {
        service.name
        async for response in responses
        for service in response.list_services_response.service
    }
    assert "petri.v1.SandboxService" in services


async def test_a_restarted_controller_adopts_running_sandboxes(
    stub: Stub, e2e_config: Config, controller: Controller
) -> None:
    """A second controller on the same registry finds the sandbox, its variables and files."""
    sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
    await execute(stub, sandbox.name, "x = 'before'\nopen('f.txt', 'w').write('file')")
    # The session's controller keeps running; the second one shares its registry and podman.
    # It must leave the sandboxes running when it stops: they are the session's too.
    second_config = sibling_config(
        e2e_config,
        controller,
        "second",
        runtime_dir=e2e_config.runtime_dir,
        keep_running_on_shutdown=True,
    )
    second: Controller = await start_controller(second_config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            other = sandbox_pb2_grpc.SandboxServiceStub(channel)
            got = await other.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
            assert got.state == sandbox_pb2.Sandbox.RUNNING
            response = await execute(other, sandbox.name, "(x, open('f.txt').read())")
            assert value_of(response) == "('before', 'file')"
    finally:
        await second.stop(grace=1)
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


async def test_image_profiles_list_what_each_image_carries(
    stub: Stub, controller: Controller
) -> None:
    listed = await stub.ListImageProfiles(sandbox_pb2.ListImageProfilesRequest())
    profiles = {p.name: p for p in listed.image_profiles}
    test = profiles["imageProfiles/test"]
    assert test.python_version.startswith("3.13")
    assert (test.packages["grpcio"], test.packages["protobuf"]) == ("1.80.0", "6.31.1")
    assert "pandas" in test.packages and test.size_bytes > 0
    assert test.is_default == (controller.config.default_image_profile == "test")
