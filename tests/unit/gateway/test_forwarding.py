"""The gateway forwards each call to the right node and the node's answer back, unchanged."""

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller.errors import STATUS_DETAILS_KEY, InvalidArgument
from controller.gateway.forward import SERVICE
from controller.names import parse_sandbox_name
from petri.v1 import error_details_pb2, execution_pb2, files_pb2, sandbox_pb2, sandbox_pb2_grpc
from tests.unit.gateway.fakes import MemoryNodes, MiB, Outcomes, node_record, running_node
from tests.unit.gateway.harness import PARENT, name_of, running_gateway


async def test_a_call_naming_a_sandbox_goes_to_the_node_holding_it(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, a_address), running_node("node-b") as (b, b_address):
        nodes = MemoryNodes([node_record("node-a", a_address), node_record("node-b", b_address)])
        holders = {"on-a": "node-a", "on-b": "node-b"}
        async with running_gateway(tmp_path, nodes, holders) as (_, stub, _):
            for _ in range(8):
                got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("on-b")))
                assert (got.name, got.display_name) == (name_of("on-b"), "node-b")
            got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("on-a")))
            assert got.display_name == "node-a"
        assert a.methods() == ["GetSandbox"]
        assert b.methods() == ["GetSandbox"] * 8


async def test_a_sandbox_live_nowhere_is_answered_by_a_live_node(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, address):
        # node-dead's heartbeat is old: it is not live, and no call goes to its address.
        stale = node_record("node-dead", "127.0.0.1:9", age=timedelta(minutes=5))
        nodes = MemoryNodes([stale, node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes) as (_, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name_of("gone")))
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
            listed = await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent=PARENT))
            assert listed.next_page_token == "node-a"
        assert a.methods() == ["DeleteSandbox", "ListSandboxes"]


async def test_the_nodes_status_details_and_trailing_metadata_pass_unchanged(
    tmp_path: Path,
) -> None:
    async with running_node("node-a") as (_, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        direct = grpc.aio.insecure_channel(address)
        direct_stub = sandbox_pb2_grpc.SandboxServiceStub(direct)
        request = sandbox_pb2.DeleteSandboxRequest(name=name_of("s1"))
        with pytest.raises(grpc.aio.AioRpcError) as from_node:
            await direct_stub.DeleteSandbox(request)
        await direct.close()
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as through:
                await stub.DeleteSandbox(request)
            call = stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")))
            await call
            assert ("x-node", "node-a") in tuple(await call.trailing_metadata())
    expected, got = from_node.value, through.value
    assert got.code() is expected.code() is grpc.StatusCode.NOT_FOUND
    assert got.details() == expected.details()
    details = dict(got.trailing_metadata())
    assert details[STATUS_DETAILS_KEY] == dict(expected.trailing_metadata())[STATUS_DETAILS_KEY]
    assert details["x-node"] == "node-a"
    status = error_details_pb2.Status.FromString(details[STATUS_DETAILS_KEY])
    info = error_details_pb2.ErrorInfo.FromString(status.details[0].value)
    assert info.reason == "SANDBOX_DELETED"


async def test_the_callers_deadline_and_metadata_reach_the_node(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            await stub.GetSandbox(
                sandbox_pb2.GetSandboxRequest(name=name_of("s1")),
                timeout=7,
                metadata=(("authorization", "Bearer t0k"), ("x-request-tag", "abc")),
            )
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")))
    with_deadline, without = a.seen
    assert with_deadline.metadata["authorization"] == "Bearer t0k"
    assert with_deadline.metadata["x-request-tag"] == "abc"
    assert with_deadline.time_remaining is not None
    assert 5 < with_deadline.time_remaining < 7.5  # the wire rounds the timeout up a little
    assert without.time_remaining is None  # no deadline is made up on the way


async def test_a_caller_cancelling_cancels_the_nodes_call(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            call = stub.ExecuteCode(sandbox_pb2.ExecuteCodeRequest(name=name_of("s1"), code="1"))
            await asyncio.wait_for(a.execute_started.wait(), 10)
            call.cancel()
            await asyncio.wait_for(a.execute_cancelled.wait(), 10)


async def test_a_node_down_before_the_call_is_unavailable_and_says_retry(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, address):
        holder_address = address
    # node-a's heartbeat is fresh but nothing listens there any more.
    nodes = MemoryNodes([node_record("node-a", holder_address)])
    async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "node node-a holding the sandbox is not answering; retry"
    assert a.seen == []


async def test_a_holder_that_stopped_heartbeating_is_unavailable_without_a_call(
    tmp_path: Path,
) -> None:
    async with running_node("node-a") as (a, address), running_node("node-b") as (b, b_address):
        nodes = MemoryNodes(
            [
                node_record("node-a", address, age=timedelta(minutes=5)),
                node_record("node-b", b_address),
            ]
        )
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "node node-a holding the sandbox is not answering; retry"
        assert a.seen == [] and b.seen == []


async def test_no_live_node_is_unavailable(tmp_path: Path) -> None:
    nodes = MemoryNodes([node_record("node-a", "127.0.0.1:9", age=timedelta(minutes=5))])
    async with running_gateway(tmp_path, nodes) as (_, stub, _):
        for call in (
            stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent=PARENT)),
            stub.ListImageProfiles(sandbox_pb2.ListImageProfilesRequest()),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
            assert caught.value.details() == "no petri node is available; retry"


async def test_malformed_names_are_refused_with_the_nodes_words_and_reach_no_node(
    tmp_path: Path,
) -> None:
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes) as (_, stub, _):
            bad = "projects/Alpha/sandboxes/s1"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=bad))
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(InvalidArgument) as parsed:
                parse_sandbox_name(bad)
            assert caught.value.details() == str(parsed.value)
            update = sandbox_pb2.UpdateSandboxRequest(sandbox=sandbox_pb2.Sandbox(name="x/y"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.UpdateSandbox(update)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid sandbox name 'x/y'" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.ListSandboxes(sandbox_pb2.ListSandboxesRequest(parent="projects/"))
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid parent" in (caught.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateSandbox(sandbox_pb2.CreateSandboxRequest(parent="projects/-"))
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "invalid parent 'projects/-'" in (caught.value.details() or "")
        assert a.seen == []


async def test_tokens_are_checked_at_the_gateway_and_passed_on(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    digest = hashlib.sha256(b"secret-a").hexdigest()
    tokens.write_text(f'[[tokens]]\nname = "agent-a"\nsha256 = "{digest}"\nprojects = ["alpha"]\n')
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}, tokens_file=tokens) as (
            _,
            stub,
            _,
        ):
            request = sandbox_pb2.GetSandboxRequest(name=name_of("s1"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(request)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(request, metadata=(("authorization", "Bearer wrong"),))
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            other = sandbox_pb2.GetSandboxRequest(name="projects/beta/sandboxes/s1")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(other, metadata=(("authorization", "Bearer secret-a"),))
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert a.seen == []
            await stub.GetSandbox(request, metadata=(("authorization", "Bearer secret-a"),))
        assert [s.metadata["authorization"] for s in a.seen] == ["Bearer secret-a"]


async def test_a_bidirectional_stream_is_pumped_one_message_at_a_time(tmp_path: Path) -> None:
    async with running_node("node-a") as (_, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            call = stub.StreamExecuteCode()
            start = sandbox_pb2.ExecuteCodeStart(name=name_of("s1"), code="1")
            await call.write(sandbox_pb2.StreamExecuteCodeRequest(start=start))
            assert (await _read(call)).stdout == "node-a"
            # Each answer comes back before the next message is sent, the stream still open.
            for index in range(3):
                chunk = execution_pb2.FileChunk(path=f"in-{index}", data=b"d", final=True)
                await call.write(sandbox_pb2.StreamExecuteCodeRequest(input_chunk=chunk))
                assert (await _read(call)).stdout == f"in-{index}"
            await call.done_writing()
            assert (await _read(call)).HasField("result")
            assert await call.code() is grpc.StatusCode.OK


async def _read(call: Any) -> sandbox_pb2.StreamExecuteCodeResponse:
    reply = await asyncio.wait_for(call.read(), 10)
    assert isinstance(reply, sandbox_pb2.StreamExecuteCodeResponse)
    return reply


async def test_a_stream_without_a_name_is_answered_by_a_node(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes) as (_, stub, _):

            async def nothing() -> AsyncIterator[files_pb2.WriteFileRequest]:
                return
                yield

            info = await stub.WriteFile(nothing())
        assert info.size == 0
        assert a.methods() == ["WriteFile"]


async def test_a_client_stream_the_node_ended_early_gets_the_node_s_status(
    tmp_path: Path,
) -> None:
    # The node refuses after the first message while the caller is still sending: the
    # gateway's next write found the call finished, and the caller got UNKNOWN "RPC already
    # finished" from the gateway itself. (grpc's own client answers INTERNAL "Internal error
    # from Core", now and then, to a caller still writing when a server ends the call, with
    # or without a gateway in between: 10 runs in 12 straight to this fake node.)
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, holders={"s1": "node-a"}) as (_, stub, _):

            async def chunks() -> AsyncIterator[files_pb2.WriteFileRequest]:
                chunk = execution_pb2.FileChunk(path="refused", data=b"r" * MiB)
                yield files_pb2.WriteFileRequest(name=name_of("s1"), chunk=chunk)
                await a.write_refused.wait()
                for _ in range(4):
                    yield files_pb2.WriteFileRequest(chunk=execution_pb2.FileChunk(data=b"r"))

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.WriteFile(chunks())
        said = (refused.value.code(), refused.value.details())
        # grpc's client may still report its own INTERNAL, as it does straight to a node.
        assert said in (
            (grpc.StatusCode.PERMISSION_DENIED, "node-a refuses the file"),
            (grpc.StatusCode.INTERNAL, "Internal error from Core"),
        ), said


async def test_health_serves_while_the_database_answers(tmp_path: Path) -> None:
    nodes = MemoryNodes([])
    async with running_gateway(tmp_path, nodes) as (_, _, channel):
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE.full_name)
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(request)
        nodes.failing = True
        await asyncio.wait_for(_until(watch, health_pb2.HealthCheckResponse.NOT_SERVING), 10)
        nodes.failing = False
        await asyncio.wait_for(_until(watch, health_pb2.HealthCheckResponse.SERVING), 10)
        watch.cancel()


async def _until(watch: Any, status: int) -> None:
    async for reply in watch:
        if reply.status == status:
            return


async def test_a_stream_error_of_the_node_passes_unchanged(tmp_path: Path) -> None:
    async with running_node("node-a") as (_, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            request = files_pb2.ReadFileRequest(name=name_of("s1"), path="missing")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stub.ReadFile(request):
                    pass
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "no file missing"
    status = dict(caught.value.trailing_metadata())[STATUS_DETAILS_KEY]
    assert error_details_pb2.Status.FromString(status).message == "no file missing"


async def test_the_locating_registry_failing_is_unavailable(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, failing_locate=True) as (_, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")))
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert caught.value.details() == "the registry is not answering; retry"
        assert a.seen == []


async def test_a_stream_message_over_the_gateways_budget_ends_both_calls(tmp_path: Path) -> None:
    """The gateway reads the caller's stream within its request budget, as a node does: a
    message over it ends the caller's call RESOURCE_EXHAUSTED and cancels the node's."""
    big = execution_pb2.FileChunk(path="big", data=b"b" * (3 * MiB))

    async def chunks() -> AsyncIterator[files_pb2.WriteFileRequest]:
        yield files_pb2.WriteFileRequest(
            name=name_of("s1"), chunk=execution_pb2.FileChunk(path="f")
        )
        yield files_pb2.WriteFileRequest(chunk=big)

    outcomes = Outcomes()
    async with running_node("node-a") as (_, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(
            tmp_path,
            nodes,
            {"s1": "node-a"},
            outcomes=outcomes,
            max_request_bytes_in_flight=2 * MiB,
            max_request_bytes_in_flight_per_caller=2 * MiB,
        ) as (_, stub, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.WriteFile(chunks())
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too much request data in flight" in (caught.value.details() or "")
            call = stub.StreamExecuteCode()
            start = sandbox_pb2.ExecuteCodeStart(name=name_of("s1"), code="1")
            await call.write(sandbox_pb2.StreamExecuteCodeRequest(start=start))
            assert (await _read(call)).stdout == "node-a"
            await call.write(sandbox_pb2.StreamExecuteCodeRequest(input_chunk=big))
            assert await asyncio.wait_for(call.code(), 10) is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "too much request data in flight" in (await call.details() or "")
            await asyncio.wait_for(outcomes.until_ended(2), 10)
    assert outcomes.cancelled == ["WriteFile", "StreamExecuteCode"]


async def test_a_caller_cancelling_a_stream_cancels_the_nodes_stream(tmp_path: Path) -> None:
    outcomes = Outcomes()
    async with running_node("node-a") as (_, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        holders = {"s1": "node-a"}
        async with running_gateway(tmp_path, nodes, holders, outcomes=outcomes) as (_, stub, _):
            call = stub.ReadFile(files_pb2.ReadFileRequest(name=name_of("s1"), path="1000.bin"))
            first = await asyncio.wait_for(call.read(), 10)
            assert isinstance(first, execution_pb2.FileChunk) and len(first.data) == MiB
            call.cancel()
            await asyncio.wait_for(outcomes.until_ended(1), 10)
    assert outcomes.cancelled == ["ReadFile"]


async def test_a_caller_cancelling_while_its_node_has_not_taken_its_stream_cancels_it(
    tmp_path: Path,
) -> None:
    # The gateway waits for the node to take a client stream (its turn, here never) before
    # it writes the second message: the caller giving up meanwhile ends the node's call.
    outcomes = Outcomes()
    async with running_node("node-a") as (a, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        holders = {"s1": "node-a"}
        async with running_gateway(tmp_path, nodes, holders, outcomes=outcomes) as (_, stub, _):

            async def chunks() -> AsyncIterator[files_pb2.WriteFileRequest]:
                for final in (False, True):
                    chunk = execution_pb2.FileChunk(path="waiting", data=b"w", final=final)
                    yield files_pb2.WriteFileRequest(name=name_of("s1"), chunk=chunk)

            call = stub.WriteFile(chunks())
            await asyncio.wait_for(a.write_waiting.wait(), 10)
            call.cancel()
            await asyncio.wait_for(outcomes.until_ended(1), 10)
    assert outcomes.cancelled == ["WriteFile"] and a.written == 0


async def test_the_nodes_initial_metadata_passes_on_every_kind_of_call(tmp_path: Path) -> None:
    async with running_node("node-a") as (_, address):
        nodes = MemoryNodes([node_record("node-a", address)])
        async with running_gateway(tmp_path, nodes, {"s1": "node-a"}) as (_, stub, _):
            unary = stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")))
            await unary
            read = stub.ReadFile(files_pb2.ReadFileRequest(name=name_of("s1"), path="1.bin"))
            assert len([chunk async for chunk in read]) == 1

            async def chunks() -> AsyncIterator[files_pb2.WriteFileRequest]:
                chunk = execution_pb2.FileChunk(path="f", data=b"d", final=True)
                yield files_pb2.WriteFileRequest(name=name_of("s1"), chunk=chunk)

            written = stub.WriteFile(chunks())
            await written
            start = sandbox_pb2.ExecuteCodeStart(name=name_of("s1"), code="1")
            streamed = stub.StreamExecuteCode(
                iter([sandbox_pb2.StreamExecuteCodeRequest(start=start)])
            )
            assert [reply async for reply in streamed][-1].HasField("result")
            for call in (unary, read, written, streamed):
                assert ("x-node-initial", "node-a") in tuple(await call.initial_metadata())
