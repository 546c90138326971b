"""SQLite: explicit memories (``/memory``) and LLM usage records.

Memories are owned by one user in one scope (a guild, or ``guild_id IS NULL`` for the
user's DMs); every query names the scope, so a memory never leaves it. Ids come from
AUTOINCREMENT and are never reused, so ``/memory delete id:`` cannot hit a newer memory
that took a deleted one's number.

Usage rows are counters keyed by (UTC day, guild, user, model), 0 standing for "no
guild" (DMs) and "no user" (the eavesdrop judgment): ``record_usage`` adds to them with
one upsert, so concurrent turns never lose a count.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import date
from typing import TYPE_CHECKING, Any

import aiosqlite

from kotonoha_bot.db.checks import check_ids, check_memory, check_memory_page, check_usage
from kotonoha_bot.db.sqlite.values import dt, ts
from kotonoha_bot.errors import MemoryLimitError
from kotonoha_bot.models import Memory, UsageRecord, utcnow


class SQLiteMemories:
    """Mixed into :class:`~kotonoha_bot.db.sqlite.SQLiteDatabase` (uses its connection)."""

    if TYPE_CHECKING:

        def _write(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
        def _read(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...

    # --- memories -------------------------------------------------------------------

    async def add_memory(self, memory: Memory, *, max_per_user: int) -> Memory:
        check_memory(memory)
        created = memory.created_at or utcnow()
        async with self._write(f"storing a memory of user {memory.user_id}") as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM memories WHERE guild_id IS ? AND user_id = ?",
                    (memory.guild_id, memory.user_id),
                )
            ).fetchone()
            if row is not None and int(row[0]) >= max_per_user:
                raise MemoryLimitError(
                    f"user {memory.user_id} already has {int(row[0])} memories here"
                    f" (at most {max_per_user}); delete one first"
                )
            cur = await conn.execute(
                "INSERT INTO memories (guild_id, user_id, content, created_at) VALUES (?, ?, ?, ?)",
                (memory.guild_id, memory.user_id, memory.content, ts(created)),
            )
            assert cur.lastrowid is not None
            memory_id = int(cur.lastrowid)
        return Memory(
            user_id=memory.user_id,
            content=memory.content,
            guild_id=memory.guild_id,
            memory_id=memory_id,
            created_at=dt(ts(created)),
        )

    async def list_memories(
        self,
        *,
        guild_id: int | None,
        user_id: int | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Memory]:
        check_ids("memories", guild_id, user_id, before_id)
        check_memory_page(guild_id, user_id, limit)
        sql = "SELECT id, guild_id, user_id, content, created_at FROM memories WHERE guild_id IS ?"
        params: list[Any] = [guild_id]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        if before_id is not None:
            sql += " AND id < ?"
            params.append(before_id)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        async with self._read("listing memories") as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [
            Memory(memory_id=r[0], guild_id=r[1], user_id=r[2], content=r[3], created_at=dt(r[4]))
            for r in rows
        ]

    async def delete_memory(
        self, memory_id: int, *, guild_id: int | None, user_id: int | None
    ) -> bool:
        check_ids("deleting a memory", memory_id, guild_id, user_id)
        sql = "DELETE FROM memories WHERE id = ? AND guild_id IS ?"
        params: list[Any] = [memory_id, guild_id]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        async with self._write(f"deleting memory {memory_id}") as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount > 0

    # --- usage ----------------------------------------------------------------------

    async def record_usage(self, record: UsageRecord) -> None:
        check_usage(record)
        async with self._write("recording LLM usage") as conn:
            await conn.execute(
                "INSERT INTO llm_usage (day, guild_id, user_id, model, calls, input_tokens,"
                " output_tokens) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (day, guild_id, user_id, model) DO UPDATE SET"
                " calls = calls + excluded.calls,"
                " input_tokens = input_tokens + excluded.input_tokens,"
                " output_tokens = output_tokens + excluded.output_tokens",
                (
                    record.day.isoformat(),
                    record.guild_id,
                    record.user_id,
                    record.model,
                    record.calls,
                    record.input_tokens,
                    record.output_tokens,
                ),
            )

    async def list_usage(
        self,
        *,
        since: date,
        until: date,
        guild_id: int | None = None,
        user_id: int | None = None,
    ) -> list[UsageRecord]:
        check_ids("usage", guild_id, user_id)
        sql = (
            "SELECT day, guild_id, user_id, model, calls, input_tokens, output_tokens"
            " FROM llm_usage WHERE day >= ? AND day <= ?"
        )
        params: list[Any] = [since.isoformat(), until.isoformat()]
        if guild_id is not None:
            sql += " AND guild_id = ?"
            params.append(guild_id)
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        sql += " ORDER BY day, guild_id, user_id, model"
        async with self._read("reading LLM usage") as conn:
            rows = await (await conn.execute(sql, params)).fetchall()
        return [
            UsageRecord(
                day=date.fromisoformat(r[0]),
                guild_id=r[1],
                user_id=r[2],
                model=r[3],
                calls=r[4],
                input_tokens=r[5],
                output_tokens=r[6],
            )
            for r in rows
        ]

    async def tokens_used(self, *, day: date, guild_id: int, user_id: int | None = None) -> int:
        check_ids("usage", guild_id, user_id)
        sql = (
            "SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM llm_usage"
            " WHERE day = ? AND guild_id = ?"
        )
        params: list[Any] = [day.isoformat(), guild_id]
        if user_id is not None:
            sql += " AND user_id = ?"
            params.append(user_id)
        async with self._read("reading LLM usage") as conn:
            row = await (await conn.execute(sql, params)).fetchone()
        return int(row[0]) if row else 0
