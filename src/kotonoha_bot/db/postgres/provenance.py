"""PostgreSQL: what follows Discord — forget, edits, deletes, reply links and chunk provenance.

The same rules as the SQLite backend (see :mod:`kotonoha_bot.db.sqlite.provenance`):
stored messages and every chunk whose ``chunk_messages`` rows name one of them are
removed in one transaction; touched sessions get a new ``version`` and correct
counters, the archived boundary kept by ``seq``. The sessions are locked first
(``FOR UPDATE``, in key order), so a concurrent ``save_session`` waits and then sees a
new version instead of writing into a half-removed session. The foreign keys of
``chunk_messages`` close the last race: an archiver adding a chunk of a message that a
delete removed concurrently fails (and retries later) instead of storing it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from kotonoha_bot.db.checks import check_discord_id, check_ids
from kotonoha_bot.db.contract import ForgetResult
from kotonoha_bot.models import ChunkOrigin, KnowledgeChunk, MessageChange, MessageLink
from kotonoha_bot.text import check_text

T = TypeVar("T")
Conn = Any  # asyncpg.Connection


@dataclass
class _Removal:
    messages: int = 0
    chunks: list[int] = field(default_factory=list)
    sources: int = 0
    sessions_deleted: int = 0
    touched: tuple[str, ...] = ()
    rearchive: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def change(self) -> MessageChange:
        return MessageChange(
            messages=self.messages,
            chunks=len(self.chunks),
            sessions=self.touched,
            rearchive=self.rearchive,
        )


class PostgresProvenance:
    """Mixed into :class:`~kotonoha_bot.db.postgres.PostgreSQLDatabase` (uses its pool)."""

    if TYPE_CHECKING:
        _scope_sizes: dict[tuple[Any, ...], tuple[float, int, int]]

        async def _run(
            self,
            what: str,
            body: Callable[[Conn], Awaitable[T]],
            *,
            write: bool = False,
            read_replica: bool = False,
        ) -> T: ...

        @staticmethod
        async def _refresh_status(conn: Conn, source_ids: Sequence[int]) -> None: ...

    # --- forget ---------------------------------------------------------------------

    async def forget(
        self, *, guild_id: int, user_id: int | None = None, channel_id: int | None = None
    ) -> ForgetResult:
        check_ids("forget", guild_id, user_id, channel_id)
        scope = "guild_id = $1" + (" AND channel_id = $2" if channel_id is not None else "")
        scope_params: list[Any] = [guild_id] + ([channel_id] if channel_id is not None else [])

        async def body(conn: Conn) -> tuple[_Removal, int]:
            if user_id is None:
                removal = await self._forget_scope(conn, scope, scope_params)
                memories = 0
                if channel_id is None:
                    status = await conn.execute(
                        "DELETE FROM memories WHERE guild_id = $1", guild_id
                    )
                    memories = int(status.split()[-1])
                return removal, memories
            removal = await self._forget_user(conn, scope, scope_params, user_id)
            memories = 0
            if channel_id is None:
                status = await conn.execute(
                    "DELETE FROM memories WHERE guild_id = $1 AND user_id = $2", guild_id, user_id
                )
                memories = int(status.split()[-1])
            return removal, memories

        removal, memories = await self._run(
            f"forgetting data of guild {guild_id}", body, write=True
        )
        self._scope_sizes.clear()
        return ForgetResult(
            messages=removal.messages,
            sessions=removal.sessions_deleted,
            chunks=len(removal.chunks),
            sources=removal.sources,
            memories=memories,
            session_keys=removal.touched,
            rearchive=removal.rearchive,
        )

    async def _forget_scope(self, conn: Conn, scope: str, scope_params: list[Any]) -> _Removal:
        nxt = f"${len(scope_params) + 1}"
        keys = [
            r["session_key"]
            for r in await conn.fetch(
                f"SELECT session_key FROM sessions WHERE {scope} ORDER BY session_key FOR UPDATE",
                *scope_params,
            )
        ]
        n_messages = int(
            await conn.fetchval(
                "SELECT count(*) FROM messages WHERE session_key = ANY($1::text[])", keys
            )
        )
        status = await conn.execute(f"DELETE FROM sessions WHERE {scope}", *scope_params)
        n_sessions = int(status.split()[-1])
        removed = await conn.fetch(
            f"DELETE FROM knowledge_chunks WHERE {scope} RETURNING id, source_id", *scope_params
        )
        touched = sorted({int(r["source_id"]) for r in removed})
        deleted = await conn.fetch(
            f"DELETE FROM knowledge_sources s WHERE ({scope} OR id = ANY({nxt}::bigint[]))"
            " AND NOT EXISTS (SELECT 1 FROM knowledge_chunks c WHERE c.source_id = s.id)"
            " RETURNING id",
            *scope_params,
            touched,
        )
        await self._refresh_status(conn, touched)
        return _Removal(
            messages=n_messages,
            chunks=[int(r["id"]) for r in removed],
            sources=len(deleted),
            sessions_deleted=n_sessions,
            touched=tuple(keys),
        )

    async def _forget_user(
        self, conn: Conn, scope: str, scope_params: list[Any], user_id: int
    ) -> _Removal:
        s_scope = scope.replace("guild_id", "s.guild_id").replace("channel_id", "s.channel_id")
        nxt = len(scope_params) + 1
        own = [
            r["session_key"]
            for r in await conn.fetch(
                f"SELECT s.session_key FROM sessions s WHERE {s_scope} AND s.user_id = ${nxt}",
                *scope_params,
                user_id,
            )
        ]
        gone = [
            int(r["id"])
            for r in await conn.fetch(
                "SELECT m.id FROM messages m JOIN sessions s ON s.session_key = m.session_key"
                f" WHERE {s_scope} AND (m.author_id = ${nxt} OR s.user_id = ${nxt})",
                *scope_params,
                user_id,
            )
        ]
        author = json.dumps({"author_ids": [user_id]})
        extra = [
            int(r["id"])
            for r in await conn.fetch(
                f"SELECT id FROM knowledge_chunks WHERE {scope} AND metadata @> ${nxt}::jsonb",
                *scope_params,
                author,
            )
        ]
        extra += await self._session_chunks(conn, own, scope_params[0])
        return await self._remove(conn, gone, replies=True, extra_chunks=extra, whole=own)

    # --- reply links ----------------------------------------------------------------

    async def record_reply_parts(
        self,
        session_key: str,
        turn_id: int,
        channel_id: int,
        discord_message_ids: Sequence[int],
    ) -> int:
        check_ids("reply parts", turn_id, channel_id)
        check_text(session_key, "session_key")
        for value in (turn_id, channel_id, *discord_message_ids):
            check_discord_id(value, f"reply of turn {turn_id}")
        ids = [int(d) for d in discord_message_ids]

        async def body(conn: Conn) -> int:
            message_id = await conn.fetchval(
                "SELECT id FROM messages WHERE session_key = $1 AND turn_id = $2"
                " AND role = 'assistant' ORDER BY seq DESC LIMIT 1",
                session_key,
                turn_id,
            )
            if message_id is None:
                return 0
            rows = await conn.fetch(
                "INSERT INTO message_refs (discord_message_id, message_id, channel_id)"
                " SELECT d, $2, $3 FROM unnest($1::bigint[]) AS d"
                " ON CONFLICT DO NOTHING RETURNING 1",
                ids,
                message_id,
                channel_id,
            )
            return len(rows)

        return await self._run(f"linking the reply of turn {turn_id}", body, write=True)

    # --- edits and deletes ----------------------------------------------------------

    async def edit_message(
        self, *, guild_id: int | None, discord_message_id: int, content: str
    ) -> MessageChange:
        check_ids("edited message", guild_id, discord_message_id)
        check_text(content, f"edit of message {discord_message_id}")
        check_discord_id(discord_message_id, "edited message")

        async def body(conn: Conn) -> _Removal:
            row = await conn.fetchrow(
                "SELECT m.id, m.session_key, m.content FROM messages m JOIN sessions s"
                " ON s.session_key = m.session_key WHERE m.discord_message_id = $1"
                " AND s.guild_id IS NOT DISTINCT FROM $2 AND m.role = 'user'"
                " ORDER BY m.id LIMIT 1",
                discord_message_id,
                guild_id,
            )
            if row is None or row["content"] == content:
                return _Removal()
            key = row["session_key"]
            await conn.execute("UPDATE messages SET content = $1 WHERE id = $2", content, row["id"])
            # The bot's reply answered the old words (and may repeat them): it goes. The
            # edited message stays and is archived again with its new text.
            replies = [
                int(r["id"])
                for r in await conn.fetch(
                    "SELECT r.id FROM messages r JOIN messages u ON u.session_key = r.session_key"
                    " AND u.turn_id = r.turn_id WHERE u.id = $1 AND r.role = 'assistant'",
                    row["id"],
                )
            ]
            own = await self._chunks_of(conn, [int(row["id"])], ())
            removal = await self._remove(
                conn, replies, replies=False, extra_chunks=own, touch=[key]
            )
            removal.messages += 1
            return removal

        removal = await self._run(f"editing message {discord_message_id}", body, write=True)
        if removal.chunks:
            self._scope_sizes.clear()
        return removal.change()

    async def delete_messages(
        self, *, guild_id: int | None, discord_message_ids: Sequence[int]
    ) -> MessageChange:
        check_ids("deleted messages", guild_id)
        ids = sorted({int(i) for i in discord_message_ids})
        for value in ids:
            check_discord_id(value, "deleted message")
        if not ids:
            return MessageChange()

        async def body(conn: Conn) -> _Removal:
            gone = [
                int(r["id"])
                # Two index lookups (a member's message by its id, the bot's by its reply
                # parts), not one OR that would scan every message.
                for r in await conn.fetch(
                    "SELECT m.id FROM messages m JOIN sessions s ON s.session_key = m.session_key"
                    " WHERE m.discord_message_id = ANY($1::bigint[])"
                    " AND s.guild_id IS NOT DISTINCT FROM $2"
                    " UNION SELECT m.id FROM message_refs r JOIN messages m ON m.id = r.message_id"
                    " JOIN sessions s ON s.session_key = m.session_key"
                    " WHERE r.discord_message_id = ANY($1::bigint[])"
                    " AND s.guild_id IS NOT DISTINCT FROM $2",
                    ids,
                    guild_id,
                )
            ]
            return await self._remove(conn, gone, replies=True)

        removal = await self._run(f"deleting {len(ids)} message(s)", body, write=True)
        if removal.chunks:
            self._scope_sizes.clear()
        return removal.change()

    async def delete_channel_messages(self, *, guild_id: int, channel_id: int) -> MessageChange:
        check_ids("deleted channel", guild_id, channel_id)
        check_discord_id(channel_id, "deleted channel")

        async def body(conn: Conn) -> _Removal:
            whole = [
                r["session_key"]
                for r in await conn.fetch(
                    "SELECT session_key FROM sessions WHERE guild_id = $1"
                    " AND (channel_id = $2 OR thread_id = $2)",
                    guild_id,
                    channel_id,
                )
            ]
            gone = [
                int(r["id"])
                for r in await conn.fetch(
                    "SELECT m.id FROM messages m JOIN sessions s ON s.session_key = m.session_key"
                    " WHERE s.guild_id = $1 AND (m.channel_id = $2 OR s.channel_id = $2"
                    " OR s.thread_id = $2)",
                    guild_id,
                    channel_id,
                )
            ]
            extra = await self._session_chunks(conn, whole, guild_id)
            return await self._remove(conn, gone, replies=True, extra_chunks=extra, whole=whole)

        removal = await self._run(
            f"deleting the messages of channel {channel_id}", body, write=True
        )
        self._scope_sizes.clear()
        return removal.change()

    # --- provenance -----------------------------------------------------------------

    async def chunk_origins(self, chunk_ids: Sequence[int]) -> dict[int, ChunkOrigin]:
        check_ids("chunk provenance", *chunk_ids)
        wanted = sorted({int(c) for c in chunk_ids})

        async def body(conn: Conn) -> list[Any]:
            return list(
                await conn.fetch(
                    "SELECT cm.chunk_id, m.id, m.discord_message_id, m.channel_id, s.guild_id,"
                    " r.discord_message_id AS ref_id, r.channel_id AS ref_channel"
                    " FROM chunk_messages cm JOIN messages m ON m.id = cm.message_id"
                    " JOIN sessions s ON s.session_key = m.session_key"
                    " LEFT JOIN LATERAL (SELECT discord_message_id, channel_id FROM message_refs"
                    "   WHERE message_id = m.id ORDER BY discord_message_id LIMIT 1) r ON true"
                    " WHERE cm.chunk_id = ANY($1::bigint[]) ORDER BY cm.chunk_id, m.seq",
                    wanted,
                )
            )

        rows = await self._run("reading chunk provenance", body) if wanted else []
        found: dict[int, list[tuple[int, MessageLink | None]]] = defaultdict(list)
        for r in rows:
            link = None
            if r["discord_message_id"] is not None and r["channel_id"] is not None:
                link = MessageLink(r["guild_id"], r["channel_id"], r["discord_message_id"])
            elif r["ref_id"] is not None:
                link = MessageLink(r["guild_id"], r["ref_channel"], r["ref_id"])
            found[int(r["chunk_id"])].append((int(r["id"]), link))
        return {
            cid: ChunkOrigin(
                chunk_id=cid,
                message_ids=tuple(m for m, _ in items),
                links=tuple(link for _, link in items if link is not None),
            )
            for cid, items in found.items()
        }

    async def _chunk_message_ids(
        self, conn: Conn, chunk_ids: Sequence[int]
    ) -> dict[int, tuple[int, ...]]:
        out: dict[int, list[int]] = defaultdict(list)
        for r in await conn.fetch(
            "SELECT chunk_id, message_id FROM chunk_messages WHERE chunk_id = ANY($1::bigint[])"
            " ORDER BY chunk_id, message_id",
            list(chunk_ids),
        ):
            out[int(r["chunk_id"])].append(int(r["message_id"]))
        return {k: tuple(v) for k, v in out.items()}

    async def _missing_messages(self, conn: Conn, chunks: Sequence[KnowledgeChunk]) -> set[int]:
        wanted = sorted({m for c in chunks for m in c.message_ids})
        if not wanted:
            return set()
        present = {
            int(r["id"])
            for r in await conn.fetch(
                "SELECT id FROM messages WHERE id = ANY($1::bigint[])", wanted
            )
        }
        return set(wanted) - present

    async def _link_chunks(
        self, conn: Conn, source_id: int, chunks: Sequence[KnowledgeChunk]
    ) -> None:
        keys: list[str] = []
        mids: list[int] = []
        for c in chunks:
            for m in c.message_ids:
                keys.append(c.chunk_key)
                mids.append(int(m))
        if not keys:
            return
        await conn.execute(
            "INSERT INTO chunk_messages (chunk_id, message_id)"
            " SELECT c.id, x.mid FROM unnest($2::text[], $3::bigint[]) AS x(key, mid)"
            " JOIN knowledge_chunks c ON c.source_id = $1 AND c.chunk_key = x.key"
            " ORDER BY c.id, x.mid ON CONFLICT DO NOTHING",
            source_id,
            keys,
            mids,
        )

    # --- the removal machinery (inside one write transaction) ------------------------

    async def _chunks_of(self, conn: Conn, gone: Sequence[int], extra: Iterable[int]) -> list[int]:
        rows = await conn.fetch(
            "SELECT DISTINCT chunk_id FROM chunk_messages WHERE message_id = ANY($1::bigint[])",
            list(gone),
        )
        return sorted({int(r["chunk_id"]) for r in rows} | {int(c) for c in extra})

    async def _survivors(
        self, conn: Conn, chunks: Sequence[int], gone: Sequence[int]
    ) -> dict[str, tuple[int, ...]]:
        if not chunks:
            return {}
        rows = await conn.fetch(
            "SELECT DISTINCT m.session_key, m.id, m.seq FROM chunk_messages cm"
            " JOIN messages m ON m.id = cm.message_id WHERE cm.chunk_id = ANY($1::bigint[])"
            " AND NOT (m.id = ANY($2::bigint[])) ORDER BY m.session_key, m.seq",
            list(chunks),
            list(gone),
        )
        out: dict[str, list[int]] = defaultdict(list)
        for r in rows:
            out[r["session_key"]].append(int(r["id"]))
        return {k: tuple(v) for k, v in out.items()}

    async def _remove(
        self,
        conn: Conn,
        gone: Sequence[int],
        *,
        replies: bool,
        extra_chunks: Iterable[int] = (),
        whole: Sequence[str] = (),
        touch: Sequence[str] = (),
    ) -> _Removal:
        """Delete messages ``gone`` (and the replies of their turns) and their chunks.

        ``touch`` names sessions changed otherwise (an edit) that need a new version.
        """
        ids = set(gone)
        keys = (
            {
                r["session_key"]
                for r in await conn.fetch(
                    "SELECT DISTINCT session_key FROM messages WHERE id = ANY($1::bigint[])",
                    sorted(ids),
                )
            }
            | set(whole)
            | set(touch)
        )
        # Lock first, in a fixed order: concurrent removals never deadlock.
        await conn.execute(
            "SELECT 1 FROM (SELECT session_key FROM sessions WHERE session_key = ANY($1::text[])"
            " ORDER BY session_key FOR UPDATE) AS locked",
            sorted(keys),
        )
        if replies and ids:
            ids |= {
                int(r["id"])
                for r in await conn.fetch(
                    "SELECT r.id FROM messages r JOIN messages u ON u.session_key = r.session_key"
                    " AND u.turn_id = r.turn_id WHERE u.id = ANY($1::bigint[])"
                    " AND u.role = 'user' AND r.role = 'assistant'",
                    sorted(ids),
                )
            }
        gone_ids = sorted(ids)
        chunks = await self._chunks_of(conn, gone_ids, extra_chunks)
        survivors = await self._survivors(conn, chunks, gone_ids)
        for key in whole:
            survivors.pop(key, None)
        kept = sorted(keys - set(whole))
        boundaries = {
            r["session_key"]: r["seq"]
            for r in await conn.fetch(
                "SELECT s.session_key, (SELECT m.seq FROM messages m"
                "  WHERE m.session_key = s.session_key ORDER BY m.seq"
                "  OFFSET s.last_archived_message_index LIMIT 1) AS seq"
                " FROM sessions s WHERE s.session_key = ANY($1::text[])"
                " AND s.last_archived_message_index >= 0",
                kept,
            )
        }
        removed = await conn.fetch(
            "DELETE FROM knowledge_chunks WHERE id = ANY($1::bigint[]) RETURNING source_id",
            chunks,
        )
        n_sources = await self._drop_emptied(conn, {int(r["source_id"]) for r in removed})
        status = await conn.execute("DELETE FROM messages WHERE id = ANY($1::bigint[])", gone_ids)
        n_messages = int(status.split()[-1])
        status = await conn.execute(
            "DELETE FROM sessions WHERE session_key = ANY($1::text[])", list(whole)
        )
        n_sessions = int(status.split()[-1])
        if kept:
            await conn.execute(
                "UPDATE sessions s SET version = s.version + 1, message_count = n.count,"
                " last_archived_message_index = CASE WHEN b.seq IS NULL"
                "  THEN LEAST(s.last_archived_message_index, n.count - 1)"
                "  ELSE (SELECT count(*) FROM messages m WHERE m.session_key = s.session_key"
                "        AND m.seq <= b.seq) - 1 END"
                " FROM (SELECT k.key, (SELECT count(*) FROM messages m"
                "       WHERE m.session_key = k.key) AS count"
                "       FROM unnest($1::text[]) AS k(key)) AS n"
                " LEFT JOIN unnest($2::text[], $3::int[]) AS b(key, seq) ON b.key = n.key"
                " WHERE s.session_key = n.key",
                kept,
                list(boundaries),
                [boundaries[k] for k in boundaries],
            )
        return _Removal(
            messages=n_messages,
            chunks=chunks,
            sources=n_sources,
            sessions_deleted=n_sessions,
            touched=tuple(sorted(keys)),
            rearchive=survivors,
        )

    async def _session_chunks(
        self, conn: Conn, session_keys: Sequence[str], guild_id: int
    ) -> list[int]:
        """Every chunk of the conversation sources of these sessions (they go whole)."""
        rows = await conn.fetch(
            "SELECT c.id FROM knowledge_chunks c JOIN knowledge_sources k"
            " ON k.id = c.source_id WHERE k.session_key = ANY($1::text[]) AND k.guild_id = $2",
            list(session_keys),
            guild_id,
        )
        return [int(r["id"]) for r in rows]

    async def _drop_emptied(self, conn: Conn, source_ids: set[int]) -> int:
        """Delete sources left without chunks; refresh the others' status."""
        if not source_ids:
            return 0
        ids = sorted(source_ids)
        deleted = await conn.fetch(
            "DELETE FROM knowledge_sources s WHERE id = ANY($1::bigint[]) AND NOT EXISTS"
            " (SELECT 1 FROM knowledge_chunks c WHERE c.source_id = s.id) RETURNING id",
            ids,
        )
        await self._refresh_status(conn, ids)
        return len(deleted)
