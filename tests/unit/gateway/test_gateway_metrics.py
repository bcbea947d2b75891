"""A gateway's metrics endpoint: the gRPC server's standard figures as a node has them, the live
nodes, and what became of the calls it forwarded, read by a real scrape."""

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from controller.gateway.server import Gateway
from petri.v1 import files_pb2, sandbox_pb2
from tests.unit.controller.test_metrics import Samples, handled, scrape, value
from tests.unit.gateway.fakes import MemoryNodes, node_record, running_node
from tests.unit.gateway.harness import PARENT, name_of, running_gateway

SERVICE = "petri.v1.SandboxService"


async def scraped(gateway: Gateway) -> Samples:
    assert gateway.metrics_server is not None
    return await asyncio.to_thread(scrape, gateway.metrics_server.port)


async def test_a_gateway_serves_its_metrics(tmp_path: Path) -> None:
    async with running_node("node-a") as (a, a_address), running_node("node-b") as (b, b_address):
        stale = node_record("node-gone", "127.0.0.1:9", age=timedelta(minutes=5))
        nodes = MemoryNodes([node_record("node-a", a_address), node_record("node-b", b_address)])
        nodes.nodes.append(stale)
        holders = {"s1": "node-a", "lost": "node-gone"}
        gateway_of = running_gateway(tmp_path, nodes, holders, metrics_listen="127.0.0.1:0")
        async with gateway_of as (gateway, stub, _):
            await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("s1")))
            with pytest.raises(grpc.aio.AioRpcError) as deleted:  # the node's answer
                await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=name_of("s1")))
            assert deleted.value.code() is grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as lost:  # the gateway's own answer
                await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=name_of("lost")))
            assert lost.value.code() is grpc.StatusCode.UNAVAILABLE
            read = stub.ReadFile(files_pb2.ReadFileRequest(name=name_of("s1"), path="2.bin"))
            assert len([chunk async for chunk in read]) == 2
            # Both nodes refuse the create: it is tried on one, retried on the other.
            a.create_status = b.create_status = grpc.StatusCode.UNAVAILABLE
            request = sandbox_pb2.CreateSandboxRequest(parent=PARENT, request_id="r1")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.CreateSandbox(request)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
            samples = await scraped(gateway)
    assert handled(samples, "GetSandbox", "OK") == 1
    assert handled(samples, "GetSandbox", "UNAVAILABLE") == 1
    assert handled(samples, "DeleteSandbox", "NOT_FOUND") == 1
    assert handled(samples, "CreateSandbox", "UNAVAILABLE") == 1
    assert value(samples, "grpc_server_started_total", grpc_service=SERVICE) == 5
    assert value(samples, "grpc_server_msg_sent_total", grpc_method="ReadFile") == 2
    assert value(samples, "grpc_server_msg_received_total", grpc_method="ReadFile") == 1
    assert value(samples, "grpc_server_handling_seconds_count", grpc_method="GetSandbox") == 2
    assert value(samples, "petri_gateway_live_nodes") == 2
    # Sent on: GetSandbox, DeleteSandbox, ReadFile and the create twice.
    assert value(samples, "petri_gateway_forwarded_total", outcome="forwarded") == 5
    assert value(samples, "petri_gateway_forwarded_total", outcome="unreachable") == 1
    assert value(samples, "petri_gateway_forwarded_total", outcome="retried") == 1


async def test_a_gateway_without_metrics_listen_serves_none(tmp_path: Path) -> None:
    async with running_gateway(tmp_path, MemoryNodes([])) as (gateway, _, _):
        assert gateway.metrics_server is None
