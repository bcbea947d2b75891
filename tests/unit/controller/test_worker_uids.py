import pytest

from controller.errors import ResourceExhausted
from controller.worker_uids import FIRST, WorkerUids


def test_uids_are_unique_come_back_late_and_run_out_clearly() -> None:
    uids = WorkerUids(FIRST + 3)
    uids.mark(FIRST + 1)  # a sandbox found at start
    first, second = uids.take(), uids.take()
    assert {first, second} == {FIRST, FIRST + 2}
    with pytest.raises(ResourceExhausted, match="all 3 sandbox uids are in use"):
        uids.take()
    uids.release(first)
    assert uids.take() == first


def test_a_released_uid_is_not_the_next_one_handed_out() -> None:
    uids = WorkerUids(FIRST + 100)
    taken = uids.take()
    uids.release(taken)
    assert uids.take() != taken


def test_the_namespace_must_leave_room_for_them() -> None:
    with pytest.raises(ValueError, match="must exceed"):
        WorkerUids(FIRST)
