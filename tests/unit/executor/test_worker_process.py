"""Starting a worker: one that dies before it is ready says why."""

import sys
from pathlib import Path

import pytest

from executor.worker_process import ExecutorBroken, WorkerProcess


async def test_a_worker_that_dies_starting_passes_on_its_last_words(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An "interpreter" that cannot run the worker's command line and says so on stderr, as a
    # worker that cannot start (a process limit, a broken import) does.
    monkeypatch.setattr(sys, "executable", "/bin/sh")
    with pytest.raises(ExecutorBroken) as caught:
        await WorkerProcess.start(tmp_path)
    message = str(caught.value)
    assert message.startswith("the worker exited before it was ready: ")
    assert "cannot open executor.worker" in message  # sh's complaint, passed on
