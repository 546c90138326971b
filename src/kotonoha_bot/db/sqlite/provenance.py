"""SQLite: what follows Discord — forget, edits, deletes, reply links and chunk provenance.

Every operation here removes or changes stored messages *and* everything built from
them in one write transaction: the chunks whose ``chunk_messages`` rows name a removed
message go with it, so no deleted text survives in knowledge. The sessions touched get
a new ``version`` (a cached copy elsewhere then conflicts and reloads) and a correct
``message_count`` and ``last_archived_message_index``: the archived boundary is kept by
message ``seq``, so deleting an archived message never makes an unarchived one look
archived (it would never become knowledge).

Sets of message ids live in a temporary table for the duration of one transaction, so a
user's thousands of messages never hit SQLite's parameter limit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiosqlite

from kotonoha_bot.db.checks import check_discord_id, check_ids
from kotonoha_bot.db.contract import ForgetResult
from kotonoha_bot.models import ChunkOrigin, KnowledgeChunk, MessageChange, MessageLink
from kotonoha_bot.text import check_text

#: Ids per IN (...) list when a set is small enough to pass as parameters.
_IN_BATCH = 500

_GONE = "temp.kotonoha_gone"
_GONE_CHUNKS = "temp.kotonoha_gone_chunks"


@dataclass
class _Removal:
    """What one removal did (inside the transaction)."""

    messages: int = 0
    chunks: list[int] | None = None
    sources: int = 0
    sessions_deleted: int = 0
    touched: tuple[str, ...] = ()
    rearchive: dict[str, tuple[int, ...]] | None = None


class SQLiteProvenance:
    """Mixed into :class:`~kotonoha_bot.db.sqlite.SQLiteDatabase` (uses its connection)."""

    if TYPE_CHECKING:

        def _write(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
        def _read(self, what: str) -> AbstractAsyncContextManager[aiosqlite.Connection]: ...
        def _cache_remove(self, chunk_ids: Iterable[int]) -> None: ...

    # --- forget ---------------------------------------------------------------------

    async def forget(
        self, *, guild_id: int, user_id: int | None = None, channel_id: int | None = None
    ) -> ForgetResult:
        check_ids("forget", guild_id, user_id, channel_id)
        scope_sql = "guild_id = ?" + (" AND channel_id = ?" if channel_id is not None else "")
        scope = [guild_id] + ([channel_id] if channel_id is not None else [])
        async with self._write(f"forgetting data of guild {guild_id}") as conn:
            if user_id is None:
                removal = await self._forget_scope(conn, scope_sql, scope)
                memories = 0
                if channel_id is None:
                    cur = await conn.execute("DELETE FROM memories WHERE guild_id = ?", (guild_id,))
                    memories = cur.rowcount
            else:
                removal = await self._forget_user(conn, scope_sql, scope, user_id)
                memories = 0
                if channel_id is None:
                    cur = await conn.execute(
                        "DELETE FROM memories WHERE guild_id = ? AND user_id = ?",
                        (guild_id, user_id),
                    )
                    memories = cur.rowcount
        self._cache_remove(removal.chunks or [])
        return ForgetResult(
            messages=removal.messages,
            sessions=removal.sessions_deleted,
            chunks=len(removal.chunks or []),
            sources=removal.sources,
            memories=memories,
            session_keys=removal.touched,
            rearchive=removal.rearchive or {},
        )

    async def _forget_scope(
        self, conn: aiosqlite.Connection, scope_sql: str, scope: list[Any]
    ) -> _Removal:
        """Everything of a channel or guild: sessions, chunks and sources."""
        keys = [
            r[0]
            for r in await (
                await conn.execute(f"SELECT session_key FROM sessions WHERE {scope_sql}", scope)
            ).fetchall()
        ]
        n_msg = await self._count_messages(conn, keys)
        cur = await conn.execute(f"DELETE FROM sessions WHERE {scope_sql}", scope)
        n_sessions = cur.rowcount
        rows = await (
            await conn.execute(
                f"SELECT id, source_id FROM knowledge_chunks WHERE {scope_sql}", scope
            )
        ).fetchall()
        removed = [int(r[0]) for r in rows]
        await self._delete_chunks(conn, removed)
        n_sources = await self._delete_emptied_sources(conn, {int(r[1]) for r in rows})
        cur = await conn.execute(f"DELETE FROM knowledge_sources WHERE {scope_sql}", scope)
        return _Removal(
            messages=n_msg,
            chunks=removed,
            sources=n_sources + cur.rowcount,
            sessions_deleted=n_sessions,
            touched=tuple(keys),
            rearchive={},
        )

    async def _forget_user(
        self, conn: aiosqlite.Connection, scope_sql: str, scope: list[Any], user_id: int
    ) -> _Removal:
        """A user's own sessions whole, their messages and the bot's replies elsewhere."""
        s_scope = scope_sql.replace("guild_id", "s.guild_id").replace("channel_id", "s.channel_id")
        own = [
            r[0]
            for r in await (
                await conn.execute(
                    f"SELECT session_key FROM sessions s WHERE {s_scope} AND s.user_id = ?",
                    [*scope, user_id],
                )
            ).fetchall()
        ]
        await self._fill_gone(
            conn,
            "SELECT m.id FROM messages m JOIN sessions s ON s.session_key = m.session_key"
            f" WHERE {s_scope} AND (m.author_id = ? OR s.user_id = ?)",
            [*scope, user_id, user_id],
            replies=True,
        )
        # Chunks naming the user as an author (also those archived before provenance
        # was recorded), and every chunk of their own sessions' conversation sources.
        extra = [
            int(r[0])
            for r in await (
                await conn.execute(
                    f"SELECT id FROM knowledge_chunks WHERE {scope_sql} AND EXISTS"
                    " (SELECT 1 FROM json_each(knowledge_chunks.metadata, '$.author_ids')"
                    "  WHERE json_each.type = 'integer' AND json_each.value = ?)",
                    [*scope, user_id],
                )
            ).fetchall()
        ]
        extra += await self._session_chunks(conn, own, scope[0])
        return await self._remove_gone(conn, extra_chunks=extra, delete_sessions=own)

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
        async with self._write(f"linking the reply of turn {turn_id}") as conn:
            row = await (
                await conn.execute(
                    "SELECT id FROM messages WHERE session_key = ? AND turn_id = ?"
                    " AND role = 'assistant' ORDER BY seq DESC LIMIT 1",
                    (session_key, turn_id),
                )
            ).fetchone()
            if row is None:
                return 0
            cur = await conn.executemany(
                "INSERT OR IGNORE INTO message_refs (discord_message_id, message_id, channel_id)"
                " VALUES (?, ?, ?)",
                [(int(d), int(row[0]), channel_id) for d in discord_message_ids],
            )
            return max(cur.rowcount, 0)

    # --- edits and deletes ----------------------------------------------------------

    async def edit_message(
        self, *, guild_id: int | None, discord_message_id: int, content: str
    ) -> MessageChange:
        check_ids("edited message", guild_id, discord_message_id)
        check_text(content, f"edit of message {discord_message_id}")
        check_discord_id(discord_message_id, "edited message")
        async with self._write(f"editing message {discord_message_id}") as conn:
            row = await (
                await conn.execute(
                    "SELECT m.id, m.session_key, m.content FROM messages m JOIN sessions s"
                    " ON s.session_key = m.session_key WHERE m.discord_message_id = ?"
                    " AND s.guild_id IS ? AND m.role = 'user' ORDER BY m.id LIMIT 1",
                    (discord_message_id, guild_id),
                )
            ).fetchone()
            if row is None or row[2] == content:
                return MessageChange()
            message_id, key = int(row[0]), str(row[1])
            await conn.execute(
                "UPDATE messages SET content = ? WHERE id = ?", (content, message_id)
            )
            # The bot's reply answered the old words (and may repeat them): it goes. The
            # edited message stays and is archived again with its new text.
            await self._fill_gone(conn, "SELECT ?", [message_id], replies=True)
            own = [
                int(r[0])
                for r in await (
                    await conn.execute(
                        "SELECT chunk_id FROM chunk_messages WHERE message_id = ?", (message_id,)
                    )
                ).fetchall()
            ]
            await conn.execute(f"DELETE FROM {_GONE} WHERE id = ?", (message_id,))
            removal = await self._remove_gone(conn, extra_chunks=own, touch=[key])
        self._cache_remove(removal.chunks or [])
        return MessageChange(
            messages=removal.messages + 1,
            chunks=len(removal.chunks or []),
            sessions=removal.touched,
            rearchive=removal.rearchive or {},
        )

    async def delete_messages(
        self, *, guild_id: int | None, discord_message_ids: Sequence[int]
    ) -> MessageChange:
        check_ids("deleted messages", guild_id)
        ids = sorted({int(i) for i in discord_message_ids})
        for value in ids:
            check_discord_id(value, "deleted message")
        if not ids:
            return MessageChange()
        async with self._write(f"deleting {len(ids)} message(s)") as conn:
            await conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS kotonoha_ids (id INTEGER PRIMARY KEY)"
            )
            await conn.execute("DELETE FROM temp.kotonoha_ids")
            await conn.executemany(
                "INSERT OR IGNORE INTO temp.kotonoha_ids (id) VALUES (?)", [(i,) for i in ids]
            )
            # Two index lookups (a member's message by its id, the bot's by its reply
            # parts), not one OR that would scan every message.
            await self._fill_gone(
                conn,
                "SELECT m.id FROM messages m JOIN sessions s ON s.session_key = m.session_key"
                " WHERE m.discord_message_id IN (SELECT id FROM temp.kotonoha_ids)"
                " AND s.guild_id IS ?"
                " UNION SELECT m.id FROM messages m JOIN sessions s"
                " ON s.session_key = m.session_key WHERE m.id IN (SELECT r.message_id"
                " FROM message_refs r WHERE r.discord_message_id IN"
                " (SELECT id FROM temp.kotonoha_ids)) AND s.guild_id IS ?",
                [guild_id, guild_id],
                replies=True,
            )
            removal = await self._remove_gone(conn)
        self._cache_remove(removal.chunks or [])
        return MessageChange(
            messages=removal.messages,
            chunks=len(removal.chunks or []),
            sessions=removal.touched,
            rearchive=removal.rearchive or {},
        )

    async def delete_channel_messages(self, *, guild_id: int, channel_id: int) -> MessageChange:
        check_ids("deleted channel", guild_id, channel_id)
        check_discord_id(channel_id, "deleted channel")
        async with self._write(f"deleting the messages of channel {channel_id}") as conn:
            whole = [
                r[0]
                for r in await (
                    await conn.execute(
                        "SELECT session_key FROM sessions WHERE guild_id = ?"
                        " AND (channel_id = ? OR thread_id = ?)",
                        (guild_id, channel_id, channel_id),
                    )
                ).fetchall()
            ]
            await self._fill_gone(
                conn,
                "SELECT m.id FROM messages m JOIN sessions s ON s.session_key = m.session_key"
                " WHERE s.guild_id = ? AND (m.channel_id = ? OR s.channel_id = ?"
                " OR s.thread_id = ?)",
                [guild_id, channel_id, channel_id, channel_id],
                replies=True,
            )
            extra = await self._session_chunks(conn, whole, guild_id)
            removal = await self._remove_gone(conn, extra_chunks=extra, delete_sessions=whole)
        self._cache_remove(removal.chunks or [])
        return MessageChange(
            messages=removal.messages,
            chunks=len(removal.chunks or []),
            sessions=removal.touched,
            rearchive=removal.rearchive or {},
        )

    # --- provenance -----------------------------------------------------------------

    async def chunk_origins(self, chunk_ids: Sequence[int]) -> dict[int, ChunkOrigin]:
        check_ids("chunk provenance", *chunk_ids)
        wanted = sorted({int(c) for c in chunk_ids})
        found: dict[int, list[tuple[int, MessageLink | None]]] = defaultdict(list)
        async with self._read("reading chunk provenance") as conn:
            for start in range(0, len(wanted), _IN_BATCH):
                part = wanted[start : start + _IN_BATCH]
                rows = await (
                    await conn.execute(
                        "SELECT cm.chunk_id, m.id, m.discord_message_id, m.channel_id,"
                        " s.guild_id, (SELECT min(r.discord_message_id) FROM message_refs r"
                        "  WHERE r.message_id = m.id),"
                        " (SELECT r.channel_id FROM message_refs r WHERE r.message_id = m.id"
                        "  ORDER BY r.discord_message_id LIMIT 1)"
                        " FROM chunk_messages cm JOIN messages m ON m.id = cm.message_id"
                        " JOIN sessions s ON s.session_key = m.session_key"
                        f" WHERE cm.chunk_id IN ({','.join('?' * len(part))})"
                        " ORDER BY cm.chunk_id, m.seq",
                        part,
                    )
                ).fetchall()
                for chunk_id, mid, discord_id, channel, guild, ref_id, ref_channel in rows:
                    link = None
                    if discord_id is not None and channel is not None:
                        link = MessageLink(guild, int(channel), int(discord_id))
                    elif ref_id is not None and ref_channel is not None:
                        link = MessageLink(guild, int(ref_channel), int(ref_id))
                    found[int(chunk_id)].append((int(mid), link))
        return {
            cid: ChunkOrigin(
                chunk_id=cid,
                message_ids=tuple(m for m, _ in items),
                links=tuple(link for _, link in items if link is not None),
            )
            for cid, items in found.items()
        }

    async def _chunk_message_ids(
        self, conn: aiosqlite.Connection, chunk_ids: Sequence[int]
    ) -> dict[int, tuple[int, ...]]:
        """Stored message ids per chunk (for ``list_chunks``)."""
        out: dict[int, list[int]] = defaultdict(list)
        for start in range(0, len(chunk_ids), _IN_BATCH):
            part = list(chunk_ids[start : start + _IN_BATCH])
            rows = await (
                await conn.execute(
                    "SELECT chunk_id, message_id FROM chunk_messages"
                    f" WHERE chunk_id IN ({','.join('?' * len(part))})"
                    " ORDER BY chunk_id, message_id",
                    part,
                )
            ).fetchall()
            for cid, mid in rows:
                out[int(cid)].append(int(mid))
        return {k: tuple(v) for k, v in out.items()}

    async def _missing_messages(
        self, conn: aiosqlite.Connection, chunks: Sequence[KnowledgeChunk]
    ) -> set[int]:
        """Message ids named by chunks that are no longer stored."""
        wanted = sorted({m for c in chunks for m in c.message_ids})
        present: set[int] = set()
        for start in range(0, len(wanted), _IN_BATCH):
            part = wanted[start : start + _IN_BATCH]
            rows = await (
                await conn.execute(
                    f"SELECT id FROM messages WHERE id IN ({','.join('?' * len(part))})", part
                )
            ).fetchall()
            present.update(int(r[0]) for r in rows)
        return set(wanted) - present

    async def _link_chunk(
        self, conn: aiosqlite.Connection, chunk_id: int, message_ids: Sequence[int]
    ) -> None:
        await conn.executemany(
            "INSERT OR IGNORE INTO chunk_messages (chunk_id, message_id) VALUES (?, ?)",
            [(chunk_id, int(m)) for m in message_ids],
        )

    # --- the removal machinery (inside one write transaction) ------------------------

    async def _fill_gone(
        self, conn: aiosqlite.Connection, select_sql: str, params: Sequence[Any], *, replies: bool
    ) -> None:
        """Put the stored ids of the messages to remove into the temporary table.

        With ``replies`` the bot's replies of the removed user messages' turns join
        them: a reply may repeat what the user said.
        """
        for table in (_GONE, _GONE_CHUNKS):
            await conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {table.split('.')[1]} (id INTEGER PRIMARY KEY)"
            )
            await conn.execute(f"DELETE FROM {table}")
        await conn.execute(f"INSERT OR IGNORE INTO {_GONE} (id) {select_sql}", list(params))
        if replies:
            await conn.execute(
                f"INSERT OR IGNORE INTO {_GONE} (id) SELECT r.id FROM messages r JOIN messages u"
                " ON u.session_key = r.session_key AND u.turn_id = r.turn_id"
                f" WHERE u.id IN (SELECT id FROM {_GONE}) AND u.role = 'user'"
                " AND r.role = 'assistant'"
            )

    async def _chunks_of_gone(self, conn: aiosqlite.Connection) -> list[int]:
        await conn.execute(
            f"INSERT OR IGNORE INTO {_GONE_CHUNKS} (id) SELECT chunk_id FROM chunk_messages"
            f" WHERE message_id IN (SELECT id FROM {_GONE})"
        )
        rows = await (await conn.execute(f"SELECT id FROM {_GONE_CHUNKS} ORDER BY id")).fetchall()
        return [int(r[0]) for r in rows]

    async def _survivors(
        self, conn: aiosqlite.Connection, chunks: Sequence[int], *, keep_gone: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """Messages still stored that shared a removed chunk, per session, in order."""
        if not chunks:
            return {}
        rows = await (
            await conn.execute(
                "SELECT DISTINCT m.session_key, m.id, m.seq FROM chunk_messages cm"
                f" JOIN messages m ON m.id = cm.message_id WHERE cm.chunk_id IN"
                f" (SELECT id FROM {_GONE_CHUNKS})"
                + ("" if keep_gone else f" AND m.id NOT IN (SELECT id FROM {_GONE})")
                + " ORDER BY m.session_key, m.seq"
            )
        ).fetchall()
        out: dict[str, list[int]] = defaultdict(list)
        for key, mid, _seq in rows:
            out[str(key)].append(int(mid))
        return {k: tuple(v) for k, v in out.items()}

    async def _remove_gone(
        self,
        conn: aiosqlite.Connection,
        *,
        extra_chunks: Sequence[int] = (),
        delete_sessions: Sequence[str] = (),
        touch: Sequence[str] = (),
    ) -> _Removal:
        """Delete the messages in the temporary table and every chunk built from them.

        ``touch`` names sessions changed otherwise (an edit) that need a new version.
        """
        if extra_chunks:
            await conn.executemany(
                f"INSERT OR IGNORE INTO {_GONE_CHUNKS} (id) VALUES (?)",
                [(int(c),) for c in extra_chunks],
            )
        chunks = await self._chunks_of_gone(conn)
        survivors = await self._survivors(conn, chunks)
        for key in delete_sessions:
            survivors.pop(key, None)
        sources = await self._sources_of(conn, chunks)
        touched = [
            str(r[0])
            for r in await (
                await conn.execute(
                    "SELECT DISTINCT session_key FROM messages"
                    f" WHERE id IN (SELECT id FROM {_GONE})"
                )
            ).fetchall()
        ]
        touched = sorted(set(touched) | set(delete_sessions) | set(touch))
        kept = [k for k in touched if k not in set(delete_sessions)]
        # The archived boundary of each kept session, by seq (see the module doc).
        boundaries: dict[str, int | None] = {}
        for key in kept:
            head = await (
                await conn.execute(
                    "SELECT last_archived_message_index FROM sessions WHERE session_key = ?",
                    (key,),
                )
            ).fetchone()
            row = None
            if head is not None and int(head[0]) >= 0:
                row = await (
                    await conn.execute(
                        "SELECT seq FROM messages WHERE session_key = ?"
                        " ORDER BY seq LIMIT 1 OFFSET ?",
                        (key, int(head[0])),
                    )
                ).fetchone()
            boundaries[key] = None if row is None else int(row[0])
        await self._delete_chunks(conn, chunks)
        n_sources = await self._delete_emptied_sources(conn, sources)
        n_msg = int(
            (await (await conn.execute(f"SELECT count(*) FROM {_GONE}")).fetchone() or (0,))[0]
        )
        await conn.execute(f"DELETE FROM messages WHERE id IN (SELECT id FROM {_GONE})")
        n_sessions = 0
        for key in delete_sessions:
            cur = await conn.execute("DELETE FROM sessions WHERE session_key = ?", (key,))
            n_sessions += cur.rowcount
        for key in kept:
            boundary = boundaries[key]
            await conn.execute(
                "UPDATE sessions SET version = version + 1, message_count ="
                " (SELECT count(*) FROM messages WHERE session_key = ?),"
                " last_archived_message_index = CASE WHEN ? IS NULL THEN"
                "  min(last_archived_message_index,"
                "      (SELECT count(*) FROM messages WHERE session_key = ?) - 1)"
                "  ELSE (SELECT count(*) FROM messages WHERE session_key = ? AND seq <= ?) - 1 END"
                " WHERE session_key = ?",
                (key, boundary, key, key, boundary, key),
            )
        return _Removal(
            messages=n_msg,
            chunks=chunks,
            sources=n_sources,
            sessions_deleted=n_sessions,
            touched=tuple(touched),
            rearchive=survivors,
        )

    async def _session_chunks(
        self, conn: aiosqlite.Connection, session_keys: Sequence[str], guild_id: int
    ) -> list[int]:
        """Every chunk of the conversation sources of these sessions (they go whole)."""
        out: list[int] = []
        for key in session_keys:
            rows = await (
                await conn.execute(
                    "SELECT c.id FROM knowledge_chunks c JOIN knowledge_sources k"
                    " ON k.id = c.source_id WHERE k.session_key = ? AND k.guild_id = ?",
                    (key, guild_id),
                )
            ).fetchall()
            out += [int(r[0]) for r in rows]
        return out

    async def _sources_of(self, conn: aiosqlite.Connection, chunks: Sequence[int]) -> set[int]:
        if not chunks:
            return set()
        rows = await (
            await conn.execute(
                "SELECT DISTINCT source_id FROM knowledge_chunks"
                f" WHERE id IN (SELECT id FROM {_GONE_CHUNKS})"
            )
        ).fetchall()
        return {int(r[0]) for r in rows}

    async def _delete_chunks(self, conn: aiosqlite.Connection, chunks: Sequence[int]) -> None:
        await conn.executemany(
            "DELETE FROM knowledge_chunks WHERE id = ?", [(int(c),) for c in chunks]
        )

    async def _delete_emptied_sources(
        self, conn: aiosqlite.Connection, source_ids: Iterable[int]
    ) -> int:
        n = 0
        for sid in sorted(source_ids):
            cur = await conn.execute(
                "DELETE FROM knowledge_sources WHERE id = ? AND NOT EXISTS"
                " (SELECT 1 FROM knowledge_chunks WHERE source_id = ?)",
                (sid, sid),
            )
            n += cur.rowcount
        return n

    async def _count_messages(self, conn: aiosqlite.Connection, keys: Sequence[str]) -> int:
        total = 0
        for start in range(0, len(keys), _IN_BATCH):
            part = list(keys[start : start + _IN_BATCH])
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM messages"
                    f" WHERE session_key IN ({','.join('?' * len(part))})",
                    part,
                )
            ).fetchone()
            total += int(row[0]) if row else 0
        return total
