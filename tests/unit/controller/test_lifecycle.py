"""The lifecycle's transitions and the warm pool's claims, on a real registry and a container
runtime that starts nothing (docs/lifecycle.md is the diagram they follow)."""

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from controller.config import Config
from controller.errors import ResourceExhausted
from controller.metrics import Metrics
from controller.pool_targets import PoolTarget
from controller.records import POOL_PROJECT, Resources, Runtime, SandboxRecord, Spec, State
from controller.runtime.container import (
    ContainerEvents,
    ContainerSpec,
    ContainerStatus,
    HostCapabilities,
    ImageInfo,
)
from controller.sandboxes.images import ImageCatalogue
from controller.sandboxes.lifecycle import Lifecycle
from controller.sandboxes.provisioner import Provisioner
from controller.sandboxes.quotas import Quotas
from controller.sandboxes.specs import SpecPolicy
from controller.sandboxes.warm_pool import WarmPool
from controller.store.checkpoints import CheckpointStore
from controller.store.registry import Registry
from tests.unit.controller.test_registry import T0, record
from tests.unit.controller.test_warm_pool import until


class FakeContainers:
    """A container runtime whose containers all exist and run, and which records removals."""

    def __init__(self) -> None:
        self.removed: list[str] = []

    async def check(self) -> HostCapabilities:
        return HostCapabilities("v2", memory=True, cpu=True, pids=True)

    async def image_exists(self, image: str) -> bool:
        return True

    async def list_images(self, repository: str) -> list[ImageInfo]:
        return []

    async def start(self, spec: ContainerSpec) -> None:
        raise AssertionError("these tests start no container")

    async def status(self, name: str) -> ContainerStatus | None:
        return ContainerStatus(name, True, None, False, {})

    async def remove(self, name: str) -> None:
        self.removed.append(name)

    async def list_managed(self, registry_label: str | None) -> list[ContainerStatus]:
        return []

    async def events(self, registry_label: str) -> ContainerEvents:
        raise AssertionError("these tests watch no container")

    async def logs_tail(self, name: str, lines: int) -> str:
        return ""

    async def close(self) -> None:
        pass


class AnsweringProvisioner(Provisioner):
    """Every executor answers."""

    async def check_answers(self, record: SandboxRecord, timeout: float) -> None:
        pass


class InstantPool(WarmPool):
    """Members appear POOLED at once: what a start and a preload end with."""

    async def _start_member(self, spec: Spec) -> SandboxRecord:
        uid = secrets.token_hex(4)
        member = record(uid, uid=uid, project=POOL_PROJECT, spec=spec, state=State.WARMING)
        await self._lifecycle.warm(member)
        await self._lifecycle.pool(member)
        return member


@dataclass
class Parts:
    registry: Registry
    containers: FakeContainers
    lifecycle: Lifecycle
    pool: InstantPool
    spec: Spec


@pytest.fixture
async def parts(registry: Registry, tmp_path: Path) -> AsyncIterator[Parts]:
    config = replace(
        Config(),
        state_dir=tmp_path,
        runtime_dir=tmp_path / "run",
        warm_pool=(PoolTarget(size=1),),
    )
    containers = FakeContainers()
    policy = SpecPolicy(config, gvisor_available=False)
    policy.host = await containers.check()
    provisioner = AnsweringProvisioner(config, containers, None, policy)
    quotas = Quotas(1, 100, 4)
    lifecycle = Lifecycle(
        registry, provisioner, quotas, lambda: T0, CheckpointStore(tmp_path / "checkpoints")
    )
    images = ImageCatalogue(config, containers)
    pool = InstantPool(
        config, registry, policy, images, provisioner, lifecycle, quotas, lambda: T0, Metrics()
    )
    spec = Spec(
        config.default_image_profile,
        Runtime.RUNC,
        policy.effective_resources(Resources(), Runtime.RUNC),
    )
    yield Parts(registry, containers, lifecycle, pool, spec)
    await pool.close()


def wanted(parts: Parts, sandbox_id: str) -> SandboxRecord:
    """What a CreateSandbox of the pool's spec asks for."""
    return record(sandbox_id, spec=parts.spec, state=State.PROVISIONING)


async def test_deprovisioning_removes_the_container_and_leaves_a_deleted_tombstone(
    parts: Parts,
) -> None:
    sandbox = record("a")
    await parts.registry.insert(sandbox)
    await parts.lifecycle.deprovision(sandbox, "expired")
    await parts.lifecycle.deprovision(sandbox, "deleted")  # a second one finds it gone
    assert parts.containers.removed == [sandbox.container_name]
    assert await parts.registry.get_live("p", "a") is None
    tombstone = await parts.registry.get_latest_tombstone("p", "a")
    assert tombstone is not None and tombstone.state is State.DELETED
    assert tombstone.delete_reason == "expired" and tombstone.delete_time == T0


async def test_terminating_keeps_the_row_and_says_why(parts: Parts) -> None:
    sandbox = record("a")
    await parts.registry.insert(sandbox)
    await parts.lifecycle.terminate(sandbox, "its container was killed by signal 9")
    found = await parts.registry.get_live("p", "a")
    assert found is not None and found.state is State.TERMINATED
    assert found.state_message == "its container was killed by signal 9"
    assert parts.containers.removed == []


async def test_terminating_spares_a_sandbox_being_deleted(parts: Parts) -> None:
    """A container check that read the sandbox RUNNING before a delete began must not write
    TERMINATED over DEPROVISIONING: a controller stopping then would keep a dead row instead
    of finishing the delete at its next start."""
    sandbox = record("a")
    await parts.registry.insert(sandbox)
    assert await parts.registry.set_fields(sandbox.uid, state=State.DEPROVISIONING)
    await parts.lifecycle.terminate(sandbox, "its container is gone")
    current = await parts.registry.get_live("p", "a")
    assert current is not None and current.state is State.DEPROVISIONING
    assert current.state_message == ""


async def test_a_claimed_member_is_running_and_a_stale_report_of_its_death_spares_it(
    parts: Parts,
) -> None:
    parts.pool.start()
    await until(lambda: len(parts.pool.ready_uids()) == 1)
    (snapshot,) = await parts.registry.list_live()  # what the reaper or the check read
    assert snapshot.state is State.POOLED
    claimed = await parts.pool.claim(wanted(parts, "mine"))
    assert claimed is not None and claimed.uid == snapshot.uid
    # Reported dead (or expired) from the snapshot taken before the claim: it is the
    # caller's sandbox now, not the pool's to discard.
    await parts.pool.remove(snapshot, "it died")
    assert parts.containers.removed == []
    found = await parts.registry.get_live("p", "mine")
    assert found is not None and found.uid == snapshot.uid and found.state is State.RUNNING


async def test_a_member_reported_dead_is_discarded_without_a_tombstone_and_replaced(
    parts: Parts,
) -> None:
    parts.pool.start()
    await until(lambda: len(parts.pool.ready_uids()) == 1)
    (snapshot,) = await parts.registry.list_live()
    await parts.pool.remove(snapshot, "it died")
    assert parts.containers.removed == [snapshot.container_name]
    await until(lambda: len(parts.pool.ready_uids()) == 1)
    assert snapshot.uid not in parts.pool.ready_uids()
    assert snapshot.uid not in {r.uid for r in await parts.registry.list_live()}


async def test_a_claim_over_quota_gives_the_member_back(parts: Parts) -> None:
    await parts.registry.insert(record("first"))  # the project's quota is 1
    parts.pool.start()
    await until(lambda: len(parts.pool.ready_uids()) == 1)
    ready = parts.pool.ready_uids()
    with pytest.raises(ResourceExhausted, match="quota of 1"):
        await parts.pool.claim(wanted(parts, "second"))
    assert ready <= parts.pool.ready_uids()  # (a refill may have started meanwhile)
    (member,) = [r for r in await parts.registry.list_live() if r.uid in ready]
    assert member.state is State.POOLED and member.project == POOL_PROJECT


async def test_closing_the_pool_discards_its_members(parts: Parts) -> None:
    parts.pool.start()
    await until(lambda: len(parts.pool.ready_uids()) == 1)
    (member,) = await parts.registry.list_live()
    await parts.pool.close()
    assert parts.containers.removed == [member.container_name]
    assert await parts.registry.list_live() == []
