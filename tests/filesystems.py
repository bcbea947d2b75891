"""A small filesystem for tests that need a disk to fill up, made without privileges."""

import contextlib
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def small_filesystem(size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "1m"): mounted in a user and mount namespace of our own,
    reached through the /proc root of the process that holds it."""
    holder = subprocess.Popen(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            f"mount -t tmpfs -o size={size} tmpfs /mnt && echo ready && exec sleep 600",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield Path(f"/proc/{holder.pid}/root/mnt")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
