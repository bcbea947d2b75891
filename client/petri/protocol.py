"""The version of the controller <-> executor protocol (petri.v1.Executor), shared by both sides.

The executor reports it (ExecutorStatus.protocol); the controller talks only to an executor of
its own version: the image and the controller ship together, and a sandbox that outlived an
upgrade of its controller, or a stale image, must be told apart from an executor that failed.
"""

# 1: every execution on one Session call (request, file chunks, EndOfInputs). Images built
# before it report 0 (they have no such field).
# 2: Checkpoint and Restore (a checkpoint is only ever restored by an executor of its version).
# 3: ListFiles, ReadFile, WriteFile and DeleteFile (the files API outside executions).
EXECUTOR_PROTOCOL = 3

# What a Checkpoint call streams (the namespace's and the archive's encodings), named by the
# executor protocol that last changed it. A checkpoint is restored only by executors of the same
# version: protocol 3 added calls and left checkpoints as 2 wrote them, so they still restore
# after an upgrade.
CHECKPOINT_VERSION = 2

# The most bytes of namespace or workspace in one CheckpointChunk.
CHECKPOINT_CHUNK_BYTES = 1024 * 1024
