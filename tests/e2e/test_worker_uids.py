"""Worker uids across controllers: every controller of the service user on one host shares one
subordinate-id range, so user code's uid must be unique on the host, not per controller."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from controller.app import Controller, start_controller
from controller.config import Config
from petri.v1 import sandbox_pb2, sandbox_pb2_grpc
from tests.e2e.helpers import PARENT, execute, sibling_config, value_of

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e


async def worker_uid(stub: Stub) -> int:
    sandbox = await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT))
    return int(value_of(await execute(stub, sandbox.name, "import os\nos.getuid()")) or -1)


async def delete_all(stub: Stub) -> None:
    listed = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(parent=PARENT, page_size=1000)
    )
    for sandbox in listed.sandboxes:
        await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=sandbox.name))


async def test_two_controllers_on_one_host_never_hand_out_the_same_worker_uid(
    e2e_config: Config, controller: Controller, tmp_path: Path
) -> None:
    # Fresh registries, so each controller starts from the bottom of the range.
    controllers = [
        await start_controller(
            sibling_config(e2e_config, controller, name, state_dir=tmp_path / name)
        )
        for name in ("first", "second")
    ]
    try:
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{c.port}") for c in controllers]
        stubs = [sandbox_pb2_grpc.SandboxServiceStub(channel) for channel in channels]
        try:
            uids = [await worker_uid(stub) for _ in range(2) for stub in stubs]
            assert len(set(uids)) == 4 and min(uids) >= 10000, uids
        finally:
            for stub in stubs:
                await delete_all(stub)
            for channel in channels:
                await channel.close()
    finally:
        for running in controllers:
            await running.stop(grace=1)
