"""Bad requests get a precise status code and a message a person can act on: the pure-validation
cases of tests/e2e/test_bad_input.py, with the same assertions, through an in-process
controller (no podman)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from petri.v1 import execution_pb2, sandbox_pb2
from tests.unit.controller.inprocess import PARENT, Petri, expect, fast_petri

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1 << 20


@pytest.fixture(scope="module")
async def petri(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Petri]:
    async with fast_petri(tmp_path_factory.mktemp("bad-input")) as running:
        yield running


@pytest.fixture
def stub(petri: Petri) -> Stub:
    return petri.stub


@pytest.mark.parametrize(
    "name", ["", "sandboxes/x", f"{PARENT}/sandboxes/UPPER", f"{PARENT}/sandboxes/a/b"]
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


async def test_a_ttl_over_the_maximum_reads_as_days_hours_minutes_seconds(stub: Stub) -> None:
    sandbox = sandbox_pb2.Sandbox()
    sandbox.ttl.FromSeconds(14 * 86400 + 1)
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox)),
        INVALID,
        "ttl 14d 0h 0m 1s exceeds the maximum of 14d",
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
    await expect(stub.UpdateSandbox(request), INVALID, "cannot update 'spec'")


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


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_bytes", 1),
        ("memory_bytes", 255 * MiB),
        ("max_processes", 1),
        ("disk_bytes", 1),
        ("cpu_millis", 1),
    ],
)
async def test_resources_below_the_minimum_are_invalid_argument(
    stub: Stub, field: str, value: int
) -> None:
    resources = sandbox_pb2.Resources(**{field: value})
    sandbox = sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(resources=resources))
    await expect(
        stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox=sandbox)),
        INVALID,
        f"resources.{field} {value} is below this server's minimum",
    )


async def test_filters_beyond_the_bounds_are_invalid_argument(stub: Stub) -> None:
    thousand = " AND ".join(["state = RUNNING"] * 1000)
    huge = " AND ".join(["state = RUNNING"] * 1_000_000)  # 19 MiB
    for text in (thousand, huge):
        details = await expect(
            stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter=text)),
            INVALID,
            "more than the maximum of",
        )
        assert len(details) < 500
    many = " AND ".join(["labels.a:*"] * 129)
    await expect(
        stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter=many)),
        INVALID,
        "more than 128 comparisons",
    )


HUGE = "x" * MiB
HUGE_MASK = sandbox_pb2.UpdateSandboxRequest(
    sandbox=sandbox_pb2.Sandbox(name=f"{PARENT}/sandboxes/x")
)
HUGE_MASK.update_mask.paths.append(HUGE)
# A request per field whose bad value a message names, that value 1 MiB long.
HUGE_FIELDS: dict[str, tuple[str, object]] = {
    "name": ("GetSandbox", sandbox_pb2.GetSandboxRequest(name=HUGE)),
    "parent": ("ListSandboxes", sandbox_pb2.ListSandboxesRequest(parent=HUGE)),
    "sandbox_id": (
        "CreateSandbox",
        sandbox_pb2.CreateSandboxRequest(parent=PARENT, sandbox_id=HUGE),
    ),
    "label": (
        "CreateSandbox",
        sandbox_pb2.CreateSandboxRequest(
            parent=PARENT, sandbox=sandbox_pb2.Sandbox(labels={"k": HUGE})
        ),
    ),
    "image_profile": (
        "CreateSandbox",
        sandbox_pb2.CreateSandboxRequest(
            parent=PARENT,
            sandbox=sandbox_pb2.Sandbox(spec=sandbox_pb2.SandboxSpec(image_profile=HUGE)),
        ),
    ),
    "order_by": ("ListSandboxes", sandbox_pb2.ListSandboxesRequest(parent=PARENT, order_by=HUGE)),
    "page_token": (
        "ListSandboxes",
        sandbox_pb2.ListSandboxesRequest(parent=PARENT, page_token=HUGE),
    ),
    "filter": ("ListSandboxes", sandbox_pb2.ListSandboxesRequest(parent=PARENT, filter=HUGE)),
    "update_mask": ("UpdateSandbox", HUGE_MASK),
    "file path": (
        "ExecuteCode",
        sandbox_pb2.ExecuteCodeRequest(
            name=f"{PARENT}/sandboxes/x", code="1", files=[execution_pb2.File(path=HUGE + "\0")]
        ),
    ),
}


@pytest.mark.parametrize("field", sorted(HUGE_FIELDS))
async def test_a_huge_bad_field_is_invalid_argument_quoting_a_prefix(
    stub: Stub, field: str
) -> None:
    method, request = HUGE_FIELDS[field]
    details = await expect(getattr(stub, method)(request), INVALID)
    assert len(details) < 1000


async def stream_requests(
    name: str, files: list[execution_pb2.File]
) -> AsyncIterator[sandbox_pb2.StreamExecuteCodeRequest]:
    yield sandbox_pb2.StreamExecuteCodeRequest(
        start=sandbox_pb2.ExecuteCodeStart(name=name, code="1")
    )
    for file in files:
        chunk = execution_pb2.FileChunk(path=file.path, data=file.content, final=True)
        yield sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk)


async def test_input_paths_beyond_the_limits_are_invalid_argument_and_nothing_runs(
    petri: Petri,
) -> None:
    sandbox = await petri.create()
    deep = "/".join(["d"] * 65)
    for path, fragment in (("x" * 256, "component of 256 bytes"), (deep, "65 components")):
        files = [
            execution_pb2.File(path="fine.txt", content=b"ok"),
            execution_pb2.File(path=path, content=b"x"),
        ]
        request = sandbox_pb2.ExecuteCodeRequest(name=sandbox.name, code="1", files=files)
        details = await expect(petri.stub.ExecuteCode(request), INVALID, fragment)
        assert len(details) < 500
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in petri.stub.StreamExecuteCode(stream_requests(sandbox.name, files[1:])):
                pass
        assert caught.value.code() == INVALID, caught.value.details()
        assert fragment in (caught.value.details() or "")
    # Refused before the executor ran anything or got a file.
    assert petri.runtime.executor_of(sandbox.uid).executions == []
    # The limits themselves are fine: a 255-byte name, 64 levels.
    files = [
        execution_pb2.File(path="y" * 255, content=b"1"),
        execution_pb2.File(path="/".join(["e"] * 63 + ["f"]), content=b"2"),
    ]
    await petri.execute(sandbox.name, "1", files=files)
    [execution] = petri.runtime.executor_of(sandbox.uid).executions
    assert sorted(execution.files) == sorted(f.path for f in files)
