"""Files in /workspace: inputs staged then put in place, changes detected, outputs read back.

Inputs are received into a private staging directory on the same filesystem and only moved
into place (rename) once all of them arrived and every target was checked, so a refused
request writes nothing. Nothing here follows a symlink: a target whose path crosses one is
refused, and symlinks are never returned as outputs.

    inputs.py    InputStager: input files staged, then committed (or discarded)
    scan.py      snapshots of /workspace, bounded, and the changes between two
    beneath.py   opening and reading beneath /workspace without following a symlink
    archive.py   the whole workspace as a tar archive (GNU tar, as user code's uid): checkpoints
"""

from executor.workspace.beneath import NotAFile, open_directory_beneath, read_chunks
from executor.workspace.inputs import STAGING_PREFIX, InputStager, InputTooLarge, WorkspaceFull
from executor.workspace.scan import (
    MAX_SCAN_DEPTH,
    MAX_SCAN_PROBLEMS,
    MAX_SCANNED_ENTRIES,
    SCAN_SECONDS,
    ChangedFile,
    Snapshot,
    Unscanned,
    changed_files,
    display_path,
    scan_problems,
    snapshot,
)

__all__ = [
    "MAX_SCANNED_ENTRIES",
    "MAX_SCAN_DEPTH",
    "MAX_SCAN_PROBLEMS",
    "SCAN_SECONDS",
    "STAGING_PREFIX",
    "ChangedFile",
    "InputStager",
    "InputTooLarge",
    "NotAFile",
    "Snapshot",
    "Unscanned",
    "WorkspaceFull",
    "changed_files",
    "display_path",
    "open_directory_beneath",
    "read_chunks",
    "scan_problems",
    "snapshot",
]
