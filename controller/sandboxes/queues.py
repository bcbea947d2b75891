"""Each sandbox's queue: its executions, pauses, resumes and checkpoints run one at a time, in
arrival order, so a pause waits for the executions sent before it and a checkpoint never
saves a namespace in the middle of an execution."""

import asyncio


class Queues:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        # Sandboxes moved to another node (a drain), marked before their queue is let go: a
        # call that read one before the move reads it again in its turn, and is refused.
        self._moved: set[str] = set()

    def __repr__(self) -> str:
        return f"<Queues {len(self._locks)}>"

    def of(self, uid: str) -> asyncio.Lock:
        return self._locks.setdefault(uid, asyncio.Lock())

    def busy(self) -> list[str]:
        """The sandboxes whose queue something holds now (an execution, a pause...)."""
        return [uid for uid, lock in self._locks.items() if lock.locked()]

    def mark_moved(self, uid: str) -> None:
        self._moved.add(uid)

    def moved(self, uid: str) -> bool:
        return uid in self._moved

    def arrived(self, uid: str) -> None:
        """A sandbox taken over by this node (back, maybe, from another)."""
        self._moved.discard(uid)

    def forget(self, uid: str) -> None:
        """Drops the queue of a sandbox that is gone."""
        self._locks.pop(uid, None)
