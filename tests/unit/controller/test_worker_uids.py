import os
import subprocess
import sys
from pathlib import Path

import pytest

from controller.errors import ResourceExhausted
from controller.sandboxes.worker_uids import FIRST, WorkerUids


def uids_in(directory: Path, size: int = 100, owner: str = "a") -> WorkerUids:
    uids = WorkerUids(FIRST + size, directory, owner)
    uids.open()
    return uids


def take_in_a_process_that_exits(directory: Path) -> int:
    """A controller that reserved a uid and died before its container was made."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from controller.sandboxes.worker_uids import FIRST, WorkerUids\n"
        "uids = WorkerUids(FIRST + 100, Path(sys.argv[1]), 'crashed')\nprint(uids.take())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_uids_are_unique_come_back_late_and_run_out_clearly(tmp_path: Path) -> None:
    uids = uids_in(tmp_path, size=3)
    uids.mark(FIRST + 1)  # a sandbox found at start
    first, second = uids.take(), uids.take()
    assert {first, second} == {FIRST, FIRST + 2}
    with pytest.raises(ResourceExhausted, match="all 3 sandbox uids are in use on this host"):
        uids.take()
    uids.release(first)
    assert uids.take() == first


def test_a_released_uid_is_not_the_next_one_handed_out(tmp_path: Path) -> None:
    uids = uids_in(tmp_path)
    taken = uids.take()
    uids.release(taken)
    assert uids.take() != taken


def test_two_controllers_on_one_host_never_share_a_uid(tmp_path: Path) -> None:
    one, other = uids_in(tmp_path, size=10, owner="one"), uids_in(tmp_path, size=10, owner="two")
    taken = [one.take(), other.take(), one.take(), other.take()]
    assert len(set(taken)) == 4
    other.release(taken[0])  # not its own: a release leaves another's reservation alone
    assert os.path.lexists(tmp_path / str(taken[0]))
    one.release(taken[0])
    assert not os.path.lexists(tmp_path / str(taken[0]))
    other.release(taken[1])
    rest = [one.take() for _ in range(8)]
    assert not set(rest) & {taken[2], taken[3]}
    with pytest.raises(ResourceExhausted):
        other.take()


def test_what_a_dead_controller_held_is_reclaimed_unless_a_container_has_it(
    tmp_path: Path,
) -> None:
    lost = take_in_a_process_that_exits(tmp_path)
    uids = uids_in(tmp_path)
    mine = uids.take()
    assert mine != lost
    stale = uids.stale()
    assert set(stale) == {str(lost)}  # this live process's own is not stale
    assert uids.reconcile(stale, in_containers={lost}) == 0  # its container still runs
    assert uids.reconcile(stale, in_containers=set()) == 1
    assert not os.path.lexists(tmp_path / str(lost))
    assert os.path.lexists(tmp_path / str(mine))


def test_a_reservation_made_again_since_it_was_found_stale_is_kept(tmp_path: Path) -> None:
    lost = take_in_a_process_that_exits(tmp_path)
    uids = uids_in(tmp_path, size=1)
    stale = uids.stale()
    assert uids.reconcile(stale, set()) == 1  # another reconcile got there first
    assert uids.take() == lost  # and a live controller took the uid again
    assert uids.reconcile(stale, set()) == 0
    assert os.path.lexists(tmp_path / str(lost))


def test_a_uid_a_container_carries_without_a_reservation_is_reserved_while_it_does(
    tmp_path: Path,
) -> None:
    uids = uids_in(tmp_path, size=2)
    uids.reconcile({}, in_containers={FIRST})  # made by a controller of an older petri
    assert uids.take() == FIRST + 1
    with pytest.raises(ResourceExhausted):
        uids.take()
    assert uids.reconcile(uids.stale(), in_containers={FIRST}) == 0
    assert uids.reconcile(uids.stale(), in_containers=set()) == 1  # the container is gone
    assert uids.take() == FIRST


def test_an_adopted_sandbox_s_uid_becomes_the_adopter_s(tmp_path: Path) -> None:
    lost = take_in_a_process_that_exits(tmp_path)
    uids = uids_in(tmp_path)
    uids.mark(lost)  # a restarted controller found its container
    assert uids.stale() == {}
    uids.release(lost)
    assert not os.path.lexists(tmp_path / str(lost))


def test_the_namespace_must_leave_room_for_them(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must exceed"):
        WorkerUids(FIRST, tmp_path, "a")
