"""Moves of sandboxes between nodes sharing the PostgreSQL registry (a draining node's).

A move is one row: the sandbox's uid, the node it leaves (the source), the node it goes to (the
target), whether the target resumes it, and the SHA-256 of a one-time random token that the
source sends the target with the checkpoint. The target takes the sandbox over only with the
token of a move to itself, and only in one transaction that also consumes the move: the row of
the sandbox names the target from then on if, and only if, it still named the source and was
PAUSED (a compare-and-set). A source that gives a move up deletes the move's row first: from
then on the target cannot take the sandbox over, so the source may resume it as its own.
"""

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from controller.listing import micros_since_epoch
from controller.records import State
from controller.store.postgres import PostgresRegistry

# A move older than this is void: a target that receives its checkpoint later refuses it.
MOVE_VALID_FOR = timedelta(minutes=30)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Move:
    uid: str
    source: str
    target: str
    resume: bool  # it was RUNNING before the move: the target resumes it


class PostgresMoves:
    """Moves on the PostgreSQL registry's database: shares `registry`'s connections."""

    def __init__(self, registry: PostgresRegistry) -> None:
        self._registry = registry

    def __repr__(self) -> str:
        return f"<PostgresMoves {self._registry!r}>"

    async def begin(self, uid: str, source: str, target: str, resume: bool, token: str) -> None:
        """Records a move (replacing any earlier one of the sandbox: one move at a time), and
        deletes the void ones (left by a node that stopped mid-move)."""
        async with self._registry.connection() as conn:
            await conn.execute(
                "DELETE FROM moves WHERE create_time <= now() - %s", (MOVE_VALID_FOR,)
            )
            await conn.execute(
                "INSERT INTO moves (uid, source, target, token_hash, resume) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (uid) DO UPDATE SET "
                "source = excluded.source, target = excluded.target, "
                "token_hash = excluded.token_hash, resume = excluded.resume, create_time = now()",
                (uid, source, target, token_hash(token), resume),
            )

    async def find(self, uid: str, token: str, target: str) -> Move | None:
        """The move of sandbox `uid` to `target` that `token` is the token of, if it is not
        void; None otherwise (no such move, another token, another target, too old)."""
        async with self._registry.connection() as conn:
            cursor = await conn.execute(
                "SELECT source, resume FROM moves WHERE uid = %s AND token_hash = %s "
                "AND target = %s AND create_time > now() - %s",
                (uid, token_hash(token), target, MOVE_VALID_FOR),
            )
            row = await cursor.fetchone()
        return None if row is None else Move(uid, str(row[0]), target, bool(row[1]))

    async def take_over(self, uid: str, token: str, target: str, now: datetime) -> bool:
        """In one transaction: consumes the move (its token is good once) and, if the sandbox's
        row still names the move's source and is PAUSED, makes it name `target`. False, and
        nothing changed but the move consumed, when either is not so."""
        async with self._registry.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "DELETE FROM moves WHERE uid = %s AND token_hash = %s AND target = %s "
                "AND create_time > now() - %s RETURNING source",
                (uid, token_hash(token), target, MOVE_VALID_FOR),
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            switched = await conn.execute(
                f"UPDATE sandboxes SET node = %s, update_time = %s WHERE uid = %s AND node = %s "
                f"AND state = {int(State.PAUSED)}",
                (target, micros_since_epoch(now), uid, str(row[0])),
            )
            return bool(switched.rowcount == 1)

    async def give_up(self, uid: str, token: str) -> bool:
        """Deletes the move, so that no target can take the sandbox over with its token any
        more; False when it was gone already (consumed by the target's take_over, or void)."""
        async with self._registry.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM moves WHERE uid = %s AND token_hash = %s", (uid, token_hash(token))
            )
            return bool(cursor.rowcount == 1)
