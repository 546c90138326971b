"""PostgreSQL: explicit memories (``/memory``) and LLM usage records.

The same rules as :mod:`kotonoha_bot.db.sqlite.memories`. The per-user limit is
checked under a transaction-scoped advisory lock on (scope, user), so two
``/memory add`` at once cannot both pass the count; usage is one upsert per call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import date
from typing import TYPE_CHECKING, Any, TypeVar

from kotonoha_bot.db.checks import check_ids, check_memory, check_memory_page, check_usage
from kotonoha_bot.db.postgres.sql import Params
from kotonoha_bot.errors import MemoryLimitError
from kotonoha_bot.models import Memory, UsageRecord, utcnow

T = TypeVar("T")
Conn = Any  # asyncpg.Connection

#: Advisory lock class for "one user's memories in one scope" (ASCII "memo").
_MEMORY_LOCK = 0x6D656D6F


def _memory(r: Any) -> Memory:
    return Memory(
        memory_id=r["id"],
        guild_id=r["guild_id"],
        user_id=r["user_id"],
        content=r["content"],
        created_at=r["created_at"],
    )


class PostgresMemories:
    """Mixed into :class:`~kotonoha_bot.db.postgres.PostgreSQLDatabase` (uses its pool)."""

    if TYPE_CHECKING:

        async def _run(
            self,
            what: str,
            body: Callable[[Conn], Awaitable[T]],
            *,
            write: bool = False,
            read_replica: bool = False,
        ) -> T: ...

    # --- memories -------------------------------------------------------------------

    async def add_memory(self, memory: Memory, *, max_per_user: int) -> Memory:
        check_memory(memory)
        created = memory.created_at or utcnow()

        async def body(conn: Conn) -> Memory:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))",
                _MEMORY_LOCK,
                f"{memory.guild_id}:{memory.user_id}",
            )
            count = int(
                await conn.fetchval(
                    "SELECT count(*) FROM memories WHERE guild_id IS NOT DISTINCT FROM $1"
                    " AND user_id = $2",
                    memory.guild_id,
                    memory.user_id,
                )
            )
            if count >= max_per_user:
                raise MemoryLimitError(
                    f"user {memory.user_id} already has {count} memories here"
                    f" (at most {max_per_user}); delete one first"
                )
            row = await conn.fetchrow(
                "INSERT INTO memories (guild_id, user_id, content, created_at)"
                " VALUES ($1, $2, $3, $4) RETURNING id, guild_id, user_id, content, created_at",
                memory.guild_id,
                memory.user_id,
                memory.content,
                created,
            )
            return _memory(row)

        return await self._run(f"storing a memory of user {memory.user_id}", body, write=True)

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
        params = Params()
        sql = (
            "SELECT id, guild_id, user_id, content, created_at FROM memories"
            f" WHERE guild_id IS NOT DISTINCT FROM {params.add(guild_id)}"
        )
        if user_id is not None:
            sql += f" AND user_id = {params.add(user_id)}"
        if before_id is not None:
            sql += f" AND id < {params.add(before_id)}"
        sql += f" ORDER BY id DESC LIMIT {params.add(limit)}"

        async def body(conn: Conn) -> list[Memory]:
            return [_memory(r) for r in await conn.fetch(sql, *params)]

        return await self._run("listing memories", body)

    async def delete_memory(
        self, memory_id: int, *, guild_id: int | None, user_id: int | None
    ) -> bool:
        check_ids("deleting a memory", memory_id, guild_id, user_id)
        sql = "DELETE FROM memories WHERE id = $1 AND guild_id IS NOT DISTINCT FROM $2"
        params: list[Any] = [memory_id, guild_id]
        if user_id is not None:
            params.append(user_id)
            sql += " AND user_id = $3"

        async def body(conn: Conn) -> bool:
            status = await conn.execute(sql, *params)
            return bool(status != "DELETE 0")

        return await self._run(f"deleting memory {memory_id}", body, write=True)

    # --- usage ----------------------------------------------------------------------

    async def record_usage(self, record: UsageRecord) -> None:
        check_usage(record)

        async def body(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO llm_usage AS u (day, guild_id, user_id, model, calls,"
                " input_tokens, output_tokens) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT (day, guild_id, user_id, model) DO UPDATE SET"
                " calls = u.calls + EXCLUDED.calls,"
                " input_tokens = u.input_tokens + EXCLUDED.input_tokens,"
                " output_tokens = u.output_tokens + EXCLUDED.output_tokens",
                record.day,
                record.guild_id,
                record.user_id,
                record.model,
                record.calls,
                record.input_tokens,
                record.output_tokens,
            )

        await self._run("recording LLM usage", body, write=True)

    async def list_usage(
        self,
        *,
        since: date,
        until: date,
        guild_id: int | None = None,
        user_id: int | None = None,
    ) -> list[UsageRecord]:
        check_ids("usage", guild_id, user_id)
        params = Params()
        sql = (
            "SELECT day, guild_id, user_id, model, calls, input_tokens, output_tokens"
            f" FROM llm_usage WHERE day >= {params.add(since)} AND day <= {params.add(until)}"
        )
        if guild_id is not None:
            sql += f" AND guild_id = {params.add(guild_id)}"
        if user_id is not None:
            sql += f" AND user_id = {params.add(user_id)}"
        sql += " ORDER BY day, guild_id, user_id, model"

        async def body(conn: Conn) -> list[UsageRecord]:
            return [
                UsageRecord(
                    day=r["day"],
                    guild_id=r["guild_id"],
                    user_id=r["user_id"],
                    model=r["model"],
                    calls=r["calls"],
                    input_tokens=r["input_tokens"],
                    output_tokens=r["output_tokens"],
                )
                for r in await conn.fetch(sql, *params)
            ]

        return await self._run("reading LLM usage", body)

    async def tokens_used(self, *, day: date, guild_id: int, user_id: int | None = None) -> int:
        check_ids("usage", guild_id, user_id)
        sql = (
            "SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM llm_usage"
            " WHERE day = $1 AND guild_id = $2"
        )
        params: list[Any] = [day, guild_id]
        if user_id is not None:
            params.append(user_id)
            sql += " AND user_id = $3"

        async def body(conn: Conn) -> int:
            return int(await conn.fetchval(sql, *params))

        return await self._run("reading LLM usage", body)
