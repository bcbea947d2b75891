"""What survives a controller that leaves its sandboxes running (keep_running_on_shutdown):
adoption at start by a second controller on the same state and the same containers, the warm
pool going with its controller, and the reaper's expiry. (By default a controller pauses its
sandboxes when it stops: test_service_hibernation.py.)"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

from controller.runtime.container import LABEL_MANAGED, LABEL_REGISTRY, ContainerSpec
from controller.sandboxes.warm_pool import PoolTarget
from petri.protocol import EXECUTOR_PROTOCOL
from petri.v1 import sandbox_pb2
from tests.unit.controller.fake_runtime import FakeContainer, FakeRuntime
from tests.unit.controller.inprocess import (
    PROFILE,
    expect,
    fast_config,
    fast_petri,
    serving,
    short_runtime_dir,
    wait_gone,
    wait_until,
)

RUNNING = sandbox_pb2.Sandbox.RUNNING
TERMINATED = sandbox_pb2.Sandbox.TERMINATED


async def test_a_restarted_controller_adopts_running_sandboxes_and_terminates_lost_ones(
    tmp_path: Path,
) -> None:
    with short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir, keep_running_on_shutdown=True)
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as first:
                alive = await first.create("alive")
                lost = await first.create("lost")
                exited = await first.create("exited")
                await first.execute(alive.name, "x = 1")
                registry_label = first.controller.manager.registry_label
            # While no controller runs: podman loses one container, another one stops, and
            # one appears that the registry never knew (a create that died with its controller).
            await runtime.vanish(lost.uid)
            await runtime.exit(exited.uid, exit_code=1)
            stray = ContainerSpec(
                "petri-stray",
                config.image_for(PROFILE),
                {LABEL_MANAGED: "true", LABEL_REGISTRY: registry_label},
                runtime_dir / "stray",
                1 << 20,
                1 << 20,
                64,
            )
            runtime.containers[stray.name] = FakeContainer(stray, None)

            async with serving(config, runtime) as second:
                seen = await second.get(alive.name)
                assert (seen.state, seen.uid, seen.execution_count) == (RUNNING, alive.uid, 1)
                # The same executor, reached with the key its container's label kept.
                again = await second.execute(alive.name, "x")
                assert again.execution_count == 2
                assert runtime.executor_of(alive.uid).refused_calls == 0
                seen = await second.get(lost.name)
                assert seen.state == TERMINATED
                assert seen.state_message == (
                    "found at controller start: its container is gone, and it had no checkpoint"
                )
                seen = await second.get(exited.name)
                assert seen.state == TERMINATED
                assert seen.state_message == (
                    "found at controller start: its container exited with status 1, and it had no "
                    "checkpoint"
                )
                assert "petri-stray" not in runtime.containers
                assert sorted(await second.names()) == sorted([alive.name, lost.name, exited.name])
        finally:
            await runtime.shutdown()


async def test_the_warm_pool_goes_with_its_controller(tmp_path: Path) -> None:
    with short_runtime_dir() as runtime_dir:
        config = fast_config(
            tmp_path / "state",
            runtime_dir,
            warm_pool=(PoolTarget(size=2),),
            keep_running_on_shutdown=True,
        )
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as petri:
                pool = petri.controller.manager.warm_pool
                await wait_until(lambda: len(pool.ready_uids()) == 2, "a full pool")
                kept = await petri.create("kept")
                await wait_until(lambda: len(pool.ready_uids()) == 2, "a refilled pool")
            # Only the claimed sandbox outlives the controller.
            assert runtime.uids() == {kept.uid}
        finally:
            await runtime.shutdown()


async def test_the_reaper_deletes_sandboxes_when_their_time_is_up_never_before(
    tmp_path: Path,
) -> None:
    async with fast_petri(tmp_path, reap_interval=timedelta(milliseconds=20)) as petri:
        short = sandbox_pb2.Sandbox()
        short.ttl.FromMilliseconds(300)
        extended = sandbox_pb2.Sandbox()
        extended.ttl.FromMilliseconds(100)
        kept = await petri.create("extended", ttl=extended.ttl)
        update = sandbox_pb2.UpdateSandboxRequest(sandbox=sandbox_pb2.Sandbox(name=kept.name))
        update.sandbox.ttl.FromSeconds(3600)
        update.update_mask.CopyFrom(field_mask_pb2.FieldMask(paths=["ttl"]))
        await petri.stub.UpdateSandbox(update)
        doomed = await petri.create("short", ttl=short.ttl)

        message = await wait_gone(petri, doomed.name)
        gone_at = datetime.now(UTC)
        assert gone_at >= doomed.expire_time.ToDatetime(tzinfo=UTC)
        assert f"sandbox {doomed.name} was expired at" in message
        assert petri.runtime.container_of(doomed.uid) is None
        # Its first expiry passed before the other one's: the update saved it.
        assert (await petri.get(kept.name)).state == RUNNING
        assert await petri.names() == [kept.name]
        await expect(petri.execute(doomed.name, "1"), grpc.StatusCode.NOT_FOUND, "was expired at")


async def test_an_executor_of_another_protocol_runs_nothing_and_says_why(tmp_path: Path) -> None:
    """The image and the controller ship together: a sandbox whose image is older than its
    controller (one that outlived an upgrade, or a stale image) is told apart from an executor
    that failed, before anything is sent to it."""
    with short_runtime_dir() as runtime_dir:
        config = fast_config(tmp_path / "state", runtime_dir, keep_running_on_shutdown=True)
        runtime = FakeRuntime({config.image_for(PROFILE)})
        try:
            async with serving(config, runtime) as first:
                adopted = await first.create("adopted")
            runtime.executor_of(adopted.uid).protocol = 0  # as an image before the upgrade
            async with serving(config, runtime) as second:
                await expect(
                    second.execute(adopted.name, "1"),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"speaks protocol version 0, this controller {EXECUTOR_PROTOCOL}",
                    "nothing ran",
                )
                assert runtime.executor_of(adopted.uid).executions == []
                runtime.executor_protocol = 0  # a stale image: no sandbox is made of it
                await expect(
                    second.create("stale"),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "Rebuild the image",
                )
                assert await second.names() == [adopted.name]
        finally:
            await runtime.shutdown()
