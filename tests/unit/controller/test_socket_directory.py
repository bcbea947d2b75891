"""A deleted sandbox's socket directory goes without entering its user namespace when the
executor's stop left it empty (the usual case), and through `podman unshare` otherwise."""

import os
from pathlib import Path

from controller.sandboxes.provisioner import _remove_tree


def _recording_podman(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in for the podman binary that records its arguments and removes nothing."""
    calls = tmp_path / "calls"
    podman = tmp_path / "podman"
    podman.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    podman.chmod(0o755)
    return podman, calls


def test_an_empty_directory_the_controller_cannot_read_goes_without_podman(
    tmp_path: Path,
) -> None:
    podman, calls = _recording_podman(tmp_path)
    directory = tmp_path / "runtime" / "uid"
    directory.mkdir(parents=True)
    directory.chmod(0o111)  # as the sandbox's root leaves it: searchable, not readable by us
    _remove_tree(str(directory), str(podman))
    assert not directory.exists()
    assert not calls.exists()


def test_a_directory_with_something_left_in_it_goes_through_podman_unshare(
    tmp_path: Path,
) -> None:
    podman, calls = _recording_podman(tmp_path)
    directory = tmp_path / "runtime" / "uid"
    directory.mkdir(parents=True)
    (directory / "executor.sock").write_text("")  # a daemon killed before its stop
    directory.chmod(0o311)  # writable but not readable: rmtree cannot list it
    try:
        _remove_tree(str(directory), str(podman))
        assert calls.read_text().split() == [
            *("unshare", "rm", "-rf", "--one-file-system", "--", str(directory))
        ]
    finally:
        directory.chmod(0o700)
    assert os.listdir(directory) == ["executor.sock"]  # the stand-in removed nothing
