import asyncio
import hashlib
from pathlib import Path

import pytest

from controller.api.auth import TokenTable
from controller.api.transport import tokens_for
from controller.config import load_config
from controller.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from controller.sandboxes.quotas import CreateSlots, Quotas


def tokens_file(tmp_path: Path) -> Path:
    digest = hashlib.sha256(b"secret-a").hexdigest()
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[tokens]]\nname = "agent-a"\nsha256 = "{digest}"\nprojects = ["alpha"]\n'
        f'[[tokens]]\nname = "ops"\nsha256 = "{hashlib.sha256(b"root").hexdigest()}"\n'
        'projects = ["*"]\n'
    )
    return path


def test_a_known_token_is_its_principal_and_sees_only_its_projects(tmp_path: Path) -> None:
    table = TokenTable.load(tokens_file(tmp_path))
    agent = table.authenticate([("authorization", "Bearer secret-a")])
    assert agent.name == "agent-a"
    agent.check_project("alpha")
    with pytest.raises(PermissionDenied, match="agent-a may not use project 'beta'"):
        agent.check_project("beta")
    table.authenticate([("authorization", "bearer root")]).check_project("anything")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing credentials"),
        ([("authorization", "Basic xyz")], "Bearer <token>"),
        ([("authorization", "Bearer ")], "Bearer <token>"),
        ([("authorization", "Bearer wrong")], "unknown or revoked"),
    ],
)
def test_bad_credentials_are_unauthenticated(
    tmp_path: Path, metadata: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(Unauthenticated, match=message):
        TokenTable.load(tokens_file(tmp_path)).authenticate(metadata)


def test_a_broken_tokens_file_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text('[[tokens]]\nname = "x"\nsha256 = "short"\nprojects = ["a"]\n')
    with pytest.raises(ValueError, match="64 hex digits"):
        TokenTable.load(path)


def test_no_auth_is_refused_beyond_loopback_unless_asked_for() -> None:
    assert tokens_for(load_config(["--listen", "127.0.0.1:0"], environ={})) is None
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0:50051"):
        tokens_for(load_config(["--listen", "0.0.0.0:50051"], environ={}))
    insecure = load_config(["--listen", "0.0.0.0:50051", "--insecure-no-auth"], environ={})
    assert insecure.insecure_no_auth and tokens_for(insecure) is None


def test_sandbox_quota_names_the_limit() -> None:
    quotas = Quotas(2, 10, 1)
    quotas.check_sandbox_count("alpha", 1)
    with pytest.raises(ResourceExhausted, match="quota of 2"):
        quotas.check_sandbox_count("alpha", 2)


def test_execute_rate_is_per_project_over_a_sliding_minute() -> None:
    now = [0.0]
    quotas = Quotas(10, 3, 1, clock=lambda: now[0])
    for _ in range(3):
        quotas.count_execute("alpha")
    with pytest.raises(ResourceExhausted, match="quota of 3 per minute"):
        quotas.count_execute("alpha")
    quotas.count_execute("beta")
    now[0] = 61.0
    quotas.count_execute("alpha")


async def test_starts_beyond_the_limit_wait_their_turn_first_come_first_served() -> None:
    slots = CreateSlots(1)
    assert await slots.take(None) == 0.0
    order: list[str] = []

    async def start(name: str, refill: bool = False) -> None:
        await slots.take(None, refill=refill)
        order.append(name)

    waiters = [asyncio.ensure_future(start("refill", refill=True))]
    await until_waiting(slots, 1)
    for name in ("a", "b", "c"):
        waiters.append(asyncio.ensure_future(start(name)))
        await until_waiting(slots, len(waiters))
    for _ in waiters:
        slots.release()
        await asyncio.sleep(0)  # the one it went to runs
    await asyncio.gather(*waiters)
    assert order == ["a", "b", "c", "refill"]  # users first, each in arrival order
    assert slots.taken == 1 and slots.waiting == 0


async def test_a_refill_waits_while_any_users_start_is_under_way_even_with_slots_free() -> None:
    slots = CreateSlots(4)
    await slots.take(None, project="p")  # a user's cold start, three slots free
    refill = asyncio.ensure_future(slots.take(None, refill=True))
    await until_waiting(slots, 1)  # it waits although slots are free: the user's start runs
    await slots.take(None, project="q")  # a user still goes straight in
    slots.release()
    await asyncio.sleep(0)
    assert not refill.done()  # one user's start is still under way
    slots.release()
    assert await refill == pytest.approx(0.0, abs=1.0)
    assert slots.taken == 1 and slots.waiting == 0
    # A user arriving while the refill holds a slot goes in at once; a second refill then
    # waits for that user, and a refill's slot handed to a waiting user counts as a user's.
    await slots.take(None, project="p")
    second = asyncio.ensure_future(slots.take(None, refill=True))
    await until_waiting(slots, 1)
    slots.release(refill=True)  # the first refill's
    await asyncio.sleep(0)
    assert not second.done()
    slots.release()  # the user's
    await second
    slots.release(refill=True)
    assert slots.taken == 0


async def test_a_waiter_that_leaves_loses_nobodys_slot() -> None:
    slots = CreateSlots(1)
    await slots.take(None)
    leaving = asyncio.ensure_future(slots.take(None))
    staying = asyncio.ensure_future(slots.take(None))
    await until_waiting(slots, 2)
    leaving.cancel()  # cancelled while waiting: it leaves the line
    await asyncio.sleep(0)
    assert slots.waiting == 1
    slots.release()
    assert await staying >= 0.0
    with pytest.raises(TimeoutError):
        await slots.take(0.01)  # its timeout passes in line: nothing taken
    assert slots.waiting == 0
    # Granted and cancelled at once: the slot goes on to the next in line.
    granted = asyncio.ensure_future(slots.take(None))
    after = asyncio.ensure_future(slots.take(None))
    await until_waiting(slots, 2)
    slots.release()
    granted.cancel()
    await asyncio.sleep(0)
    await after
    assert granted.cancelled() and slots.taken == 1 and slots.waiting == 0
    slots.release()
    assert slots.taken == 0


async def until_waiting(slots: CreateSlots, count: int) -> None:
    async with asyncio.timeout(5):
        while True:
            if slots.waiting == count:
                return
            await asyncio.sleep(0)
