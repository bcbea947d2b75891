"""The gateway in front of the real node (the fast tier's controller: its real SandboxService,
a fake runtime and stand-in executors): every kind of call goes through and comes back as the
node answers it directly."""

import dataclasses
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import grpc
import pytest

from controller.gateway.server import start_gateway
from petri.v1 import execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.unit.controller.inprocess import PARENT, PROJECT, create_request, fast_petri
from tests.unit.gateway.fakes import MemoryNodes, node_record


async def _failure(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def _answer(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, bytes | str | None]:
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    return error.code(), error.details() or "", details


async def _file(name: str) -> AsyncIterator[files_pb2.WriteFileRequest]:
    for index, piece in enumerate((b"hello ", b"world")):
        yield files_pb2.WriteFileRequest(
            name=name if index == 0 else "",
            chunk=execution_pb2.FileChunk(path="notes.txt", data=piece, final=index == 1),
        )


async def test_every_kind_of_call_through_the_gateway_to_a_real_node(tmp_path: Path) -> None:
    async with fast_petri(tmp_path) as petri:

        async def locate(project: str, sandbox_id: str) -> str | None:
            # One node: it holds every live sandbox.
            record = await petri.controller.registry.get_live(project, sandbox_id)
            return "node-1" if record is not None else None

        nodes = MemoryNodes([node_record("node-1", f"127.0.0.1:{petri.controller.port}")])
        config = dataclasses.replace(petri.config, listen="127.0.0.1:0")
        gateway = await start_gateway(config, nodes, locate)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        stub = sandbox_pb2_grpc.SandboxServiceStub(channel)
        direct = petri.stub
        try:
            created = await stub.CreateSandbox(create_request("s1", request_id="r1"))
            name = f"{PARENT}/sandboxes/s1"
            assert created.name == name
            again = await stub.CreateSandbox(create_request("s1", request_id="r1"))
            assert again.uid == created.uid  # the node's request_id replay, through
            assert (await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name))).uid == (
                created.uid
            )
            listed = await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
            assert [s.name for s in listed.sandboxes] == [name]
            profiles = await stub.ListImageProfiles(sandbox_pb2.ListImageProfilesRequest())
            direct_profiles = await direct.ListImageProfiles(sandbox_pb2.ListImageProfilesRequest())
            assert profiles == direct_profiles

            ran = await stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name, code="x = 1"))
            assert ran.stdout == "ran x = 1\n"
            start = sandbox_pb2.ExecuteCodeStart(name=name, code="y = 2")
            events = [
                event
                async for event in stub.StreamExecuteCode(
                    iter([sandbox_pb2.StreamExecuteCodeRequest(start=start)])
                )
            ]
            assert events[0].stdout == "ran y = 2\n" and events[-1].HasField("result")

            info = await stub.WriteFile(_file(name))
            assert info.size == len(b"hello world")
            read = b"".join(
                [
                    chunk.data
                    async for chunk in stub.ReadFile(
                        files_pb2.ReadFileRequest(name=name, path="notes.txt")
                    )
                ]
            )
            assert read == b"hello world"
            listing = await stub.ListFiles(files_pb2.ListFilesRequest(name=name))
            assert [f.path for f in listing.files] == ["notes.txt"]
            await stub.DeleteFile(files_pb2.DeleteFileRequest(name=name, path="notes.txt"))

            # The node's refusals come through as it gives them to a direct caller.
            for request in (
                files_pb2.ReadFileRequest(name=name, path="../etc/passwd"),
                files_pb2.ReadFileRequest(name=name, path="missing.txt"),
            ):
                through = await _failure(_drain(stub.ReadFile(request)))
                assert _answer(through) == _answer(await _failure(_drain(direct.ReadFile(request))))
            bad_name = sandbox_pb2.GetSandboxRequest(name=f"projects/{PROJECT}/sandboxes/Bad")
            through = await _failure(stub.GetSandbox(bad_name))
            assert _answer(through) == _answer(await _failure(direct.GetSandbox(bad_name)))
            assert through.code() is grpc.StatusCode.INVALID_ARGUMENT

            await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name))
            gone = sandbox_pb2.GetSandboxRequest(name=name)
            through = await _failure(stub.GetSandbox(gone))
            assert through.code() is grpc.StatusCode.NOT_FOUND
            assert _answer(through) == _answer(await _failure(direct.GetSandbox(gone)))
            assert _answer(through)[2]  # the AIP-193 details (SANDBOX_DELETED) came through
        finally:
            await channel.close()
            await gateway.stop(0)


async def _drain(call: AsyncIterable[object]) -> None:
    async for _ in call:
        pass
