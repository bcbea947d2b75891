"""The request budget: turns to read requests, and bytes in flight per caller and in all."""

import asyncio

import pytest

from controller.api.interceptors import BudgetLimits, RequestBudget
from controller.config import load_config
from controller.errors import ResourceExhausted

MiB = 1 << 20


def _budget() -> RequestBudget:
    return RequestBudget(
        BudgetLimits(
            receives=2,
            receives_per_caller=1,
            bytes_in_flight=30 * MiB,
            bytes_in_flight_per_caller=20 * MiB,
        )
    )


async def test_bytes_in_flight_are_bounded_per_caller_then_in_all() -> None:
    budget = _budget()
    budget.hold("alice", 15 * MiB)
    with pytest.raises(ResourceExhausted) as caught:
        budget.hold("alice", 6 * MiB)
    message = str(caught.value)
    assert "for alice" in message and "20.0 MiB per caller" in message
    assert "Nothing ran: retrying" in message
    budget.hold("bob", 15 * MiB)
    with pytest.raises(ResourceExhausted, match=r"server's limit of 30\.0 MiB"):
        budget.hold("carol", 1 * MiB)
    budget.release("alice", 15 * MiB)
    budget.hold("carol", 1 * MiB)  # room again once alice's call ended
    budget.release("bob", 15 * MiB)
    budget.release("carol", 1 * MiB)
    assert budget.held == 0


async def test_a_caller_waits_for_its_turn_to_send() -> None:
    budget = _budget()
    reading = asyncio.Event()
    done_reading = asyncio.Event()

    async def read(caller: str, started: asyncio.Event, until: asyncio.Event) -> None:
        mine, everyone = budget.turns_to_read(caller)
        async with mine, everyone:
            started.set()
            await until.wait()

    holder = asyncio.create_task(read("alice", reading, done_reading))
    await reading.wait()
    second_started, bob_started, free = asyncio.Event(), asyncio.Event(), asyncio.Event()
    free.set()
    second = asyncio.create_task(read("alice", second_started, free))
    await asyncio.sleep(0)  # lets it run up to its wait for a turn
    await read("bob", bob_started, free)  # another caller's turn is its own
    assert not second_started.is_set()  # alice has one turn at a time
    done_reading.set()
    await asyncio.gather(holder, second)
    assert second_started.is_set()


def test_the_limits_must_let_the_largest_request_through(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_config(["--max-request-bytes-in-flight-per-caller", "50MiB"], environ={})
    assert "at least 116391936" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config(["--max-concurrent-receives-per-caller", "5"], environ={})
    assert "at most max_concurrent_receives" in capsys.readouterr().err
