"""A petri cluster on one machine, end to end: two gateway processes in front of three node
processes (each its own name, port, state and runtime directories and registry label, all under
the service user's podman) on one real PostgreSQL. Calls go through either gateway; races
between the gateways are decided once (names, request ids, the last quota slot); pages, drains
and placement span the nodes; a gateway killed loses nothing; PostgreSQL restarting is
UNAVAILABLE for its duration, and then everything serves again by itself.

One cluster serves the module (its nodes allow QUOTA sandboxes per project: each test uses
projects of its own); the tests that kill something start processes of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from controller.config import Config
from controller.errors import STATUS_DETAILS_KEY
from controller.records import State
from petri.v1 import error_details_pb2, sandbox_pb2
from tests.e2e.cluster import (
    NODE_TIMEOUT_SECONDS,
    REAP_SECONDS,
    ROOT,
    GatewayProcess,
    Node,
    containers_of,
    holder,
    live_uids,
    podman_service,
    remove_containers,
    rows,
)
from tests.e2e.helpers import value_of
from tests.postgres import Cluster as Postgres
from tests.postgres import fresh_database

if TYPE_CHECKING:
    from petri.v1.sandbox_pb2_grpc import SandboxServiceAsyncStub as Stub

pytestmark = pytest.mark.e2e

QUOTA = 3  # the nodes' max_sandboxes_per_project
# How long a test waits for what it waits for (a container removed, a heartbeat written).
WAIT_SECONDS = 30.0
CALL_DEADLINE = 20.0


@dataclass
class Petri:
    """The module's cluster: its registry, nodes and gateways, with a stub for each."""

    database: str
    nodes: list[Node]
    gateways: list[GatewayProcess]
    node_stubs: dict[str, Stub]
    a: Stub  # through the first gateway
    b: Stub  # through the second

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]


def new_project() -> str:
    """A project of the test's own: its quota and its list are the test's alone."""
    return f"c-{uuid.uuid4().hex[:10]}"


def sandbox_id(name: str) -> str:
    return name.rpartition("/")[2]


def project_of(name: str) -> str:
    return name.split("/")[1]


async def create(stub: Stub, project: str, **fields: str) -> sandbox_pb2.Sandbox:
    sandbox: sandbox_pb2.Sandbox = await stub.CreateSandbox(
        sandbox_pb2.CreateSandboxRequest(parent=f"projects/{project}", **fields),  # type: ignore[arg-type]
        timeout=120,
    )
    return sandbox


async def run(stub: Stub, name: str, code: str) -> str | None:
    response = await stub.ExecuteCode(
        sandbox_pb2.ExecuteCodeRequest(name=name, code=code), timeout=60
    )
    assert not response.HasField("error"), response
    return value_of(response)


async def names_listed(stub: Stub, project: str) -> list[str]:
    listed = await stub.ListSandboxes(
        sandbox_pb2.ListSandboxesRequest(parent=f"projects/{project}", page_size=100)
    )
    return [sandbox.name for sandbox in listed.sandboxes]


async def nothing_left_behind(database: str, nodes: Sequence[str]) -> None:
    """Podman has a container for each live row of the registry, and no other."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        containers, live = set(containers_of(nodes)), await live_uids(database)
        if containers == live:
            return
        assert asyncio.get_running_loop().time() < deadline, (
            f"containers without a row: {containers - live}; rows without a container: "
            f"{live - containers}"
        )
        await asyncio.sleep(0.2)


async def delete_everything(database: str, stub: Stub) -> None:
    """Deletes every live sandbox of the registry through `stub`."""
    live = await rows(
        database,
        f"SELECT project, sandbox_id FROM sandboxes WHERE state != {int(State.DELETED)}",
    )
    for project, sandbox in live:
        await stub.DeleteSandbox(
            sandbox_pb2.DeleteSandboxRequest(
                name=f"projects/{project}/sandboxes/{sandbox}", allow_missing=True
            ),
            timeout=60,
        )


async def drain(database: str, node: str, *flags: str) -> str:
    """`python -m controller drain NODE`, as an operator runs it: its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "drain", node, *flags, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "PETRI_DATABASE_URL": database},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await process.communicate()
    assert process.returncode == 0, output
    return output.decode().strip()


async def heartbeats_say(cluster: Petri, counts: dict[str, int]) -> None:
    """Waits for the nodes' heartbeats to say they hold `counts` sandboxes: what gateways
    place by."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        found = await rows(cluster.database, "SELECT name, sandboxes FROM nodes")
        said = {str(name): int(str(count)) for name, count in found}
        if said == counts:
            return
        assert asyncio.get_running_loop().time() < deadline, said
        await asyncio.sleep(0.1)


def quota_reason(error: grpc.aio.AioRpcError) -> tuple[str, dict[str, str]]:
    """The ErrorInfo's reason and metadata of a failed call."""
    details = dict(error.trailing_metadata() or ())
    raw = details[STATUS_DETAILS_KEY]
    assert isinstance(raw, bytes)
    status = error_details_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo.FromString(status.details[0].value)
    return info.reason, dict(info.metadata)


async def start_all(processes: Sequence[Node | GatewayProcess]) -> None:
    await asyncio.gather(*(process.start() for process in processes))


@contextlib.asynccontextmanager
async def stubs_of(
    processes: Sequence[Node | GatewayProcess],
) -> AsyncIterator[list[Stub]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(process.stub()) for process in processes]


@pytest.fixture(scope="module")
def module_database(postgres_url: str) -> Iterator[str]:
    yield from fresh_database(postgres_url)


@pytest.fixture(scope="module")
async def module_podman(e2e_config: Config) -> AsyncIterator[Path]:
    async with podman_service(e2e_config) as socket_path:
        yield socket_path


@pytest.fixture(scope="module")
async def petri(
    e2e_config: Config, module_database: str, module_podman: Path
) -> AsyncIterator[Petri]:
    suffix = uuid.uuid4().hex[:6]
    quota = {"PETRI_MAX_SANDBOXES_PER_PROJECT": str(QUOTA)}
    nodes = [
        Node(f"cl-{n}-{suffix}", e2e_config, module_database, module_podman, quota)
        for n in range(3)
    ]
    gateways = [GatewayProcess(f"cl-gw{n}-{suffix}", e2e_config, module_database) for n in range(2)]
    try:
        await start_all(nodes)
        await start_all(gateways)
        async with stubs_of(nodes) as node_stubs, stubs_of(gateways) as (a, b):
            yield Petri(
                module_database,
                nodes,
                gateways,
                {node.name: stub for node, stub in zip(nodes, node_stubs, strict=True)},
                a,
                b,
            )
    finally:
        await asyncio.gather(*(process.stop() for process in [*gateways, *nodes]))
        remove_containers(node.name for node in nodes)


@pytest.fixture
async def cluster(petri: Petri) -> AsyncIterator[Petri]:
    """The module's cluster, emptied after the test (every sandbox deleted, through a
    gateway), so that the next starts with idle nodes."""
    yield petri
    await delete_everything(petri.database, petri.a)
    await nothing_left_behind(petri.database, petri.node_names)


# --- 1. create, execute, list, delete through either gateway -----------------------------------


async def test_a_sandbox_made_through_one_gateway_is_served_through_the_other(
    cluster: Petri,
) -> None:
    project = new_project()
    for first, second in ((cluster.a, cluster.b), (cluster.b, cluster.a)):
        made = await create(first, project)
        assert made.state == sandbox_pb2.Sandbox.RUNNING
        assert await run(second, made.name, "x = 6 * 7") is None
        assert await run(first, made.name, "x") == "42"
        got = await second.GetSandbox(sandbox_pb2.GetSandboxRequest(name=made.name))
        assert (got.uid, got.state) == (made.uid, sandbox_pb2.Sandbox.RUNNING)
        assert made.name in await names_listed(first, project)
        assert made.name in await names_listed(second, project)

        await second.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await first.GetSandbox(sandbox_pb2.GetSandboxRequest(name=made.name))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND, caught.value
        assert made.name not in await names_listed(first, project)
        assert made.name not in await names_listed(second, project)
        assert made.uid not in containers_of(cluster.node_names)


# --- 2. the same name, the same request_id, through two gateways at once -------------------------


async def test_concurrent_creates_of_one_name_or_one_request_id_make_one_sandbox(
    cluster: Petri,
) -> None:
    one, two, _ = cluster.node_names
    # Through the gateways (which place each where they like), and straight to two nodes
    # (one create on each, the race between nodes for sure).
    pairs = [(cluster.a, cluster.b), (cluster.b, cluster.a), tuple(
        cluster.node_stubs[name] for name in (one, two)
    )]  # fmt: skip
    winners: set[str] = set()
    for first, second in pairs:
        project, wanted = new_project(), f"same-{uuid.uuid4().hex[:6]}"
        results = await asyncio.gather(
            create(first, project, sandbox_id=wanted),
            create(second, project, sandbox_id=wanted),
            return_exceptions=True,
        )
        made = [result for result in results if isinstance(result, sandbox_pb2.Sandbox)]
        refused = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
        assert len(made) == 1 and len(refused) == 1, results
        assert refused[0].code() is grpc.StatusCode.ALREADY_EXISTS, refused[0]
        assert await names_listed(cluster.a, project) == [made[0].name]
        winners.add(made[0].uid)

        project, request_id = new_project(), str(uuid.uuid4())
        answers = await asyncio.gather(
            create(first, project, request_id=request_id),
            create(second, project, request_id=request_id),
            return_exceptions=True,
        )
        twins = [twin for twin in answers if isinstance(twin, sandbox_pb2.Sandbox)]
        assert len(twins) == 2, answers
        assert (twins[0].name, twins[0].uid) == (twins[1].name, twins[1].uid), twins
        # Each caller gets the sandbox as a create answers: started.
        assert [twin.state for twin in twins] == [sandbox_pb2.Sandbox.RUNNING] * 2, twins
        assert await run(cluster.b, twins[0].name, "1 + 1") == "2"
        assert await names_listed(cluster.a, project) == [twins[0].name]
        found = await rows(
            cluster.database,
            "SELECT uid FROM sandboxes WHERE project = %s AND request_id = %s",
            project,
            request_id,
        )
        assert found == [(twins[0].uid,)]
        winners.add(twins[0].uid)

    # Nothing left behind: the registry's live rows are the winners', and so are the containers.
    assert await live_uids(cluster.database) == winners
    await nothing_left_behind(cluster.database, cluster.node_names)


# --- 3. the quota, across gateways ---------------------------------------------------------


async def test_the_quota_holds_for_creates_racing_through_both_gateways(cluster: Petri) -> None:
    project = new_project()
    attempts = 8
    results = await asyncio.gather(
        *(create(cluster.a if n % 2 else cluster.b, project) for n in range(attempts)),
        return_exceptions=True,
    )
    made = [result for result in results if isinstance(result, sandbox_pb2.Sandbox)]
    refused = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(made) == QUOTA and len(refused) == attempts - QUOTA, results
    for error in refused:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
        reason, metadata = quota_reason(error)
        assert reason == "QUOTA_EXCEEDED", error
        assert metadata == {"quota": "max_sandboxes_per_project", "limit": str(QUOTA)}
    assert sorted(await names_listed(cluster.b, project)) == sorted(s.name for s in made)
    await nothing_left_behind(cluster.database, cluster.node_names)
    # A slot freed through one gateway is taken through the other.
    await cluster.a.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made[0].name))
    again = await create(cluster.b, project)
    assert again.state == sandbox_pb2.Sandbox.RUNNING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await create(cluster.a, project)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value


# --- 4. List pages across gateways ----------------------------------------------------------


async def test_list_pages_continue_through_the_other_gateway(cluster: Petri) -> None:
    project = new_project()
    # One sandbox on each node (made there): the pages span all three.
    made = [await create(stub, project) for stub in cluster.node_stubs.values()]
    holders = {await holder(cluster.database, project, sandbox_id(s.name)) for s in made}
    assert holders == set(cluster.node_names)
    expected = sorted(s.name for s in made)
    for order_by, page_size in (("", 1), ("name desc", 1), ("create_time desc", 2)):
        seen: list[str] = []
        token = ""
        for page in range(len(made) + 1):
            stub = (cluster.a, cluster.b)[page % 2]  # each page through the other gateway
            listed = await stub.ListSandboxes(
                sandbox_pb2.ListSandboxesRequest(
                    parent=f"projects/{project}",
                    page_size=page_size,
                    page_token=token,
                    order_by=order_by,
                )
            )
            seen += [sandbox.name for sandbox in listed.sandboxes]
            token = listed.next_page_token
            if not token:
                break
        assert not token, (order_by, seen)
        assert len(seen) == len(set(seen)), (order_by, seen)  # no duplicates
        assert sorted(seen) == expected, (order_by, seen)  # no gaps
        if order_by == "name desc":
            assert seen == sorted(expected, reverse=True)


# --- 5. a gateway killed -------------------------------------------------------------------


async def test_a_gateway_killed_loses_nothing(e2e_config: Config, cluster: Petri) -> None:
    doomed = GatewayProcess(f"cl-doomed-{uuid.uuid4().hex[:6]}", e2e_config, cluster.database)
    project, request_id = new_project(), str(uuid.uuid4())
    try:
        await doomed.start()
        async with doomed.stub() as stub:
            made = await create(stub, project, request_id=request_id)
            assert await run(stub, made.name, "kept = 'yes'") is None
        await doomed.stop(signal.SIGKILL)

        got = await cluster.a.GetSandbox(sandbox_pb2.GetSandboxRequest(name=made.name))
        assert (got.uid, got.state) == (made.uid, sandbox_pb2.Sandbox.RUNNING)
        assert await run(cluster.b, made.name, "kept") == "'yes'"
        assert await names_listed(cluster.a, project) == [made.name]
        # The create's retry through another gateway gets the same sandbox.
        retried = await create(cluster.b, project, request_id=request_id)
        assert (retried.name, retried.uid) == (made.name, made.uid)
        await cluster.b.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name))
        assert await names_listed(cluster.a, project) == []
    finally:
        await doomed.stop(signal.SIGKILL)


# --- 7. drain ------------------------------------------------------------------------------


async def test_a_drained_node_gets_no_new_sandbox_and_serves_its_own(
    e2e_config: Config, cluster: Petri
) -> None:
    drained, *others = cluster.node_names
    kept = await create(cluster.node_stubs[drained], new_project())
    assert await run(cluster.a, kept.name, "y = 3") is None
    # The others hold more: placement would pick the drained node first, but for the drain.
    for node in others * 2:
        await create(cluster.node_stubs[node], new_project())
    await heartbeats_say(cluster, {drained: 1, **{node: 2 for node in others}})
    # A gateway started after the drain reads it before it serves: no wait on a refresh.
    fresh = GatewayProcess(f"cl-gwd-{uuid.uuid4().hex[:6]}", e2e_config, cluster.database)
    try:
        assert await drain(cluster.database, drained, "--no-wait") == f"node {drained}: draining"
        await fresh.start()
        async with fresh.stub() as stub:
            placed = []
            for _ in range(4):
                made = await create(stub, new_project())
                placed.append(
                    await holder(cluster.database, project_of(made.name), sandbox_id(made.name))
                )
            assert drained not in placed, placed
            assert await run(stub, kept.name, "y") == "3"  # its own moved, and still serves
            assert await run(cluster.b, kept.name, "y") == "3"

            assert await drain(cluster.database, drained, "--undo") == (
                f"node {drained}: no longer draining"
            )
            # The running gateway sees the undo by itself (its next read of the nodes): the
            # node, with the fewest sandboxes, gets placements again.
            deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
            while True:
                made = await create(stub, new_project())
                where = await holder(cluster.database, project_of(made.name), sandbox_id(made.name))
                if where == drained:
                    break
                await stub.DeleteSandbox(sandbox_pb2.DeleteSandboxRequest(name=made.name))
                assert asyncio.get_running_loop().time() < deadline, "never placed there again"
    finally:
        await drain(cluster.database, drained, "--undo")
        await fresh.stop()


# --- 8. placement spread -------------------------------------------------------------------


async def test_creates_spread_over_the_three_nodes(cluster: Petri) -> None:
    # The nodes start even: each says, in its heartbeat, that it holds nothing.
    await heartbeats_say(cluster, dict.fromkeys(cluster.node_names, 0))
    placed: Counter[str] = Counter({name: 0 for name in cluster.node_names})
    projects = [new_project() for _ in range(3)]
    for n in range(9):
        made = await create((cluster.a, cluster.b)[n % 2], projects[n // QUOTA])
        placed[await holder(cluster.database, project_of(made.name), sandbox_id(made.name))] += 1
    assert all(count >= 1 for count in placed.values()), f"spread: {dict(placed)}"


# --- 6. PostgreSQL restarting ----------------------------------------------------------------


def _calls(stub: Stub, made: Sequence[sandbox_pb2.Sandbox]) -> dict[str, Callable[[], Any]]:
    """A call of each kind (routed by the registry, any node, placed) with a deadline."""
    return {
        "GetSandbox": lambda: stub.GetSandbox(
            sandbox_pb2.GetSandboxRequest(name=made[0].name), timeout=CALL_DEADLINE
        ),
        "ExecuteCode": lambda: stub.ExecuteCode(
            sandbox_pb2.ExecuteCodeRequest(name=made[1].name, code="v"), timeout=CALL_DEADLINE
        ),
        "ListSandboxes": lambda: stub.ListSandboxes(
            sandbox_pb2.ListSandboxesRequest(parent="projects/pgr"), timeout=CALL_DEADLINE
        ),
        "CreateSandbox": lambda: stub.CreateSandbox(
            sandbox_pb2.CreateSandboxRequest(parent="projects/pgr"), timeout=CALL_DEADLINE
        ),
    }


async def _unavailable(method: str, call: Callable[[], Any]) -> None:
    """The call fails UNAVAILABLE, before its deadline."""
    began = asyncio.get_running_loop().time()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call()
    took = asyncio.get_running_loop().time() - began
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, (method, caught.value)
    assert took < CALL_DEADLINE - 5, (method, took)  # an answer, not the deadline's end


@pytest.mark.usefixtures("postgres_cluster")  # skipped, or failed, as PostgreSQL's tests are
async def test_postgres_restarting_is_unavailable_then_serves_again_by_itself(
    e2e_config: Config, module_podman: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A cluster of its own (its own PostgreSQL, two nodes, a gateway): stopping PostgreSQL
    for longer than the nodes' --node-timeout, then starting it again."""
    postgres = Postgres(tmp_path_factory.mktemp("pgr"))
    database = postgres.start()
    suffix = uuid.uuid4().hex[:6]
    nodes = [Node(f"pgr-{n}-{suffix}", e2e_config, database, module_podman) for n in range(2)]
    gateway = GatewayProcess(f"pgr-gw-{suffix}", e2e_config, database)
    try:
        await start_all(nodes)
        await gateway.start()
        async with gateway.stub() as stub, stubs_of(nodes) as node_stubs:
            made = [await create(node_stub, "pgr") for node_stub in node_stubs]  # one each
            for n, sandbox in enumerate(made):
                assert await run(stub, sandbox.name, f"v = {n} + 40") is None

            await asyncio.to_thread(postgres.stop)
            stopped = asyncio.get_running_loop().time()
            # Outage for longer than --node-timeout: no node's heartbeat is written meanwhile.
            while asyncio.get_running_loop().time() - stopped < 2 * NODE_TIMEOUT_SECONDS:
                await asyncio.gather(*(
                    _unavailable(method, call) for method, call in _calls(stub, made).items()
                ))  # fmt: skip
            assert containers_of(node.name for node in nodes).keys() == {s.uid for s in made}

            await asyncio.to_thread(postgres.start)  # the same directory: the same URL
            # The same processes serve again by themselves: wait for the first call to work.
            deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
            while True:
                try:
                    answer = await run(stub, made[0].name, "v")
                    break
                except grpc.aio.AioRpcError as error:
                    assert error.code() is grpc.StatusCode.UNAVAILABLE, error
                    assert asyncio.get_running_loop().time() < deadline, error
                    await asyncio.sleep(0.2)
            assert answer == "40"
            # Through a whole node timeout and sweeps after it, no node judged another dead
            # for the heartbeats the outage kept from being written.
            recovered = asyncio.get_running_loop().time()
            watch = NODE_TIMEOUT_SECONDS + 4 * REAP_SECONDS
            while asyncio.get_running_loop().time() - recovered < watch:
                for sandbox in made:
                    got = await stub.GetSandbox(sandbox_pb2.GetSandboxRequest(name=sandbox.name))
                    assert got.state == sandbox_pb2.Sandbox.RUNNING, got
                await asyncio.sleep(0.2)
            for n, sandbox in enumerate(made):
                assert await run(stub, sandbox.name, "v") == str(n + 40)
            after = await create(stub, "pgr")
            assert await run(stub, after.name, "1 + 1") == "2"
            assert sorted(await names_listed(stub, "pgr")) == sorted(s.name for s in [*made, after])
    finally:
        await gateway.stop()
        await asyncio.gather(*(node.stop(signal.SIGKILL) for node in nodes))
        remove_containers(node.name for node in nodes)
        await asyncio.to_thread(postgres.stop)


async def test_postgres_killed_while_sandboxes_start_leaves_nothing_stuck(
    e2e_config: Config, module_podman: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """PostgreSQL killed (-9) while two creates with request ids start on a node, then started
    again: each request's retry gets a sandbox that runs code (the rows the starts could not
    finish are discarded, not left PROVISIONING, where a retry waited for them for ever), the
    node did not judge itself dead for its heartbeat the outage held up, and no container is
    left without its row."""
    postgres = Postgres(tmp_path_factory.mktemp("pgk"))
    database = postgres.start()
    suffix = uuid.uuid4().hex[:6]
    node = Node(
        f"pgk-{suffix}",
        e2e_config,
        database,
        module_podman,
        {"PETRI_CONTAINER_CHECK_INTERVAL": "1s"},
    )
    gateway = GatewayProcess(f"pgk-gw-{suffix}", e2e_config, database)
    project = new_project()
    try:
        await start_all([node, gateway])
        async with gateway.stub() as stub:
            async with asyncio.timeout(WAIT_SECONDS):  # the gateway has read the node's heartbeat
                while True:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.ListImageProfiles(sandbox_pb2.ListImageProfilesRequest())
                        break
                    await asyncio.sleep(0.1)
            requests = [
                sandbox_pb2.CreateSandboxRequest(
                    parent=f"projects/{project}", request_id=str(uuid.uuid4())
                )
                for _ in range(2)
            ]
            first = [
                asyncio.ensure_future(stub.CreateSandbox(request, timeout=CALL_DEADLINE))
                for request in requests
            ]
            starting = f"SELECT count(*) FROM sandboxes WHERE state = {int(State.PROVISIONING)}"
            async with asyncio.timeout(WAIT_SECONDS):  # both rows in, their containers starting
                while True:
                    if (await rows(database, starting))[0] == (2,):
                        break
                    await asyncio.sleep(0.02)
            postmaster = int((postgres.directory / "postmaster.pid").read_text().split()[0])
            os.kill(postmaster, signal.SIGKILL)
            for answer in await asyncio.gather(*first, return_exceptions=True):
                if isinstance(answer, grpc.aio.AioRpcError):
                    assert answer.code() is grpc.StatusCode.UNAVAILABLE, answer
            await asyncio.to_thread(postgres.start)

            made = []
            for request in requests:
                async with asyncio.timeout(WAIT_SECONDS):
                    while True:
                        try:
                            made.append(await stub.CreateSandbox(request, timeout=5))
                            break
                        except grpc.aio.AioRpcError as error:
                            retry = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                            assert error.code() in retry, error
            for n, sandbox in enumerate(made):
                assert sandbox.state == sandbox_pb2.Sandbox.RUNNING, sandbox
                assert await run(stub, sandbox.name, f"{n} + 40") == str(n + 40)
            messages = await rows(database, "SELECT state_message FROM sandboxes")
            assert not [m for (m,) in messages if "stopped answering" in str(m)], messages
            assert containers_of([node.name]).keys() == await live_uids(database)
    finally:
        await gateway.stop()
        await node.stop(signal.SIGKILL)
        remove_containers([node.name])
        await asyncio.to_thread(postgres.stop)
