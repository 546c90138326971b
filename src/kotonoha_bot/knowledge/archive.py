"""Turn idle conversations into knowledge.

A session idle longer than ``ARCHIVE_IDLE_MINUTES`` has its messages after
``last_archived_message_index`` cut into speaker-labelled windows (``window``
messages, neighbours sharing ``overlap``), stored as chunks of the source
``session:{key}`` in the session's guild and channel. Chunk keys name the message
range, so archiving twice adds nothing. Sessions without a guild (DMs) are never
archived: a DM must not become knowledge another member could retrieve.

A live session is archived too, as soon as messages leave the history window the
model sees (:func:`archive_left_history`, ``upto`` = the last message no longer
sent): the same windows, the same keys, the same ``last_archived_message_index``,
so the idle pass later continues after them and writes nothing twice.

**Provenance.** Every chunk records the stored ids of the messages it was built from
(``KnowledgeChunk.message_ids``), so a message deleted or edited on Discord takes its
chunks with it. A session whose messages lack stored ids (an in-memory copy) is
reloaded from storage before it is archived: a chunk is never written without them.
When a delete or edit removed chunks that other messages shared, :func:`rearchive`
builds windows over those messages again (only what was archived before).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.errors import EmbeddingError, SessionConflictError
from kotonoha_bot.knowledge.embeddings.base import EmbeddingProvider, embedding_config
from kotonoha_bot.knowledge.ingest import embed_texts
from kotonoha_bot.models import ChatSession, KnowledgeChunk, KnowledgeSource, Message, utcnow
from kotonoha_bot.text import normalize_text, replace_nul

log = logging.getLogger("kotonoha_bot.knowledge")

#: Optional LLM summary of a window: messages -> one paragraph (or "" for none).
Summarizer = Callable[[Sequence[Message]], Awaitable[str]]

ASSISTANT_LABEL = "kotonoha"

#: Identifies this process in job leases (host, pid and a random part).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
#: How long an archiving lease lasts; a crashed process's lease expires after this.
ARCHIVE_LEASE_SECONDS = 600.0


@dataclass
class ArchiveReport:
    """What an archiving pass did."""

    sessions: list[str] = field(default_factory=list)
    chunks_added: int = 0
    skipped_dm: int = 0
    skipped_busy: int = 0
    pending_chunks: int = 0


def speaker(message: Message) -> str:
    """The label a window shows for a message's author."""
    if message.role == "assistant":
        return ASSISTANT_LABEL
    if message.author_name:
        return message.author_name
    return f"user {message.author_id}" if message.author_id is not None else message.role


def windows(
    messages: Sequence[Message], first_new: int, *, size: int, overlap: int
) -> list[tuple[int, int]]:
    """Inclusive (start, end) message ranges covering ``messages[first_new:]``."""
    if first_new >= len(messages):
        return []
    step = max(size - overlap, 1)
    start = max(first_new - overlap, 0)
    spans = []
    while True:
        end = min(start + size, len(messages)) - 1
        spans.append((start, end))
        if end >= len(messages) - 1:
            return spans
        start += step


def window_key(session_key: str, first: int, last: int, text: str) -> str:
    """Stable key of an archived window: its message range and a hash of its text.

    The hash matters after ``/kb forget``: deleting a user's messages renumbers the
    session, and a new window over the same range but other messages must not be
    mistaken for the old one (which would skip it silently).
    """
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"{session_key}:{first}-{last}:{digest}"


def window_text(messages: Sequence[Message]) -> str:
    """``speaker: text`` lines, normalised, NUL-free."""
    lines = []
    for m in messages:
        content, _ = replace_nul(normalize_text(m.content))
        lines.append(f"{speaker(m)}: {content}")
    return "\n".join(lines)


def span_windows(first: int, last: int, *, size: int, overlap: int) -> list[tuple[int, int]]:
    """Inclusive windows covering messages ``first``..``last`` exactly (for re-archiving)."""
    if last < first:
        return []
    step = max(size - overlap, 1)
    spans = []
    start = first
    while True:
        end = min(start + size - 1, last)
        spans.append((start, end))
        if end >= last:
            return spans
        start += step


async def _window_chunks(
    embedder: EmbeddingProvider | None,
    session: ChatSession,
    spans: Sequence[tuple[int, int]],
    batch_size: int,
) -> list[KnowledgeChunk]:
    """The chunks of ``spans`` (embedded when the embedder answers, else pending)."""
    key = session.session_key
    chunks_text = [window_text(session.messages[a : b + 1]) for a, b in spans]
    vectors = None
    if embedder is not None and chunks_text:
        try:
            vectors = await embed_texts(embedder, chunks_text, batch_size)
        except EmbeddingError as exc:
            log.warning("embedding archive of %s failed, stored as pending: %s", key, exc)
    rows = []
    for i, ((a, b), text) in enumerate(zip(spans, chunks_text, strict=True)):
        part = session.messages[a : b + 1]
        authors = sorted({m.author_id for m in part if m.author_id is not None})
        rows.append(
            KnowledgeChunk(
                chunk_key=window_key(key, a, b, text),
                content=text,
                chunk_index=a,
                embedding=None if vectors is None else vectors[i],
                metadata={
                    "kind": "conversation",
                    "session_key": key,
                    "first_index": a,
                    "last_index": b,
                    "author_ids": authors,
                    "start_time": part[0].timestamp.isoformat(),
                    "end_time": part[-1].timestamp.isoformat(),
                    **({"thread_id": session.thread_id} if session.thread_id else {}),
                },
                message_ids=tuple(m.stored_id for m in part if m.stored_id is not None),
            )
        )
    return rows


async def _conversation_source(db: DatabaseProtocol, session: ChatSession) -> int:
    assert session.guild_id is not None
    key = session.session_key
    source = await db.ensure_source(
        KnowledgeSource(
            guild_id=session.guild_id,
            channel_id=session.channel_id,
            uri=f"session:{key}",
            title=f"conversation {key}",
            source_type="conversation",
            session_key=key,
            metadata={"session_key": key, "kind": "conversation"},
        )
    )
    assert source.source_id is not None
    return source.source_id


async def archive_session(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    session: ChatSession,
    *,
    window: int = 8,
    overlap: int = 2,
    summarizer: Summarizer | None = None,
    batch_size: int = 64,
    upto: int | None = None,
) -> int:
    """Archive one session's not-yet-archived messages (up to index ``upto``); chunks added."""
    if session.guild_id is None:
        return 0
    if any(m.stored_id is None for m in session.messages):
        # Provenance needs stored ids: archive what storage holds.
        fresh = await db.load_session(session.session_key)
        if fresh is None:
            return 0
        session = fresh
    end = len(session.messages) if upto is None else min(upto + 1, len(session.messages))
    first_new = session.last_archived_message_index + 1
    spans = windows(
        session.messages[:end], first_new, size=window, overlap=min(overlap, window - 1)
    )
    if not spans:
        return 0
    key = session.session_key
    rows = await _window_chunks(embedder, session, spans, batch_size)
    if summarizer is not None:
        new_messages = session.messages[first_new:end]
        try:
            summary = normalize_text(await summarizer(new_messages))
        except Exception as exc:  # a summary is optional; the plain windows stand alone
            log.warning("summary of %s failed: %s", key, type(exc).__name__)
            summary = ""
        if summary:
            vec = None
            if embedder is not None:
                try:
                    vec = (await embedder.embed([summary]))[0]
                except EmbeddingError:
                    vec = None
            rows.append(
                KnowledgeChunk(
                    chunk_key=f"{key}:summary:{first_new}-{end - 1}",
                    content=summary,
                    chunk_index=first_new,
                    embedding=vec,
                    metadata={
                        "kind": "summary",
                        "session_key": key,
                        "first_index": first_new,
                        "last_index": end - 1,
                        "author_ids": sorted(
                            {m.author_id for m in new_messages if m.author_id is not None}
                        ),
                    },
                    message_ids=tuple(m.stored_id for m in new_messages if m.stored_id),
                )
            )
    added = await db.add_chunks(await _conversation_source(db, session), rows)
    # Record progress; a concurrent writer (the bot appending a turn) wins and we retry
    # on a fresh copy — the chunks above are idempotent, so a retry adds nothing.
    last = end - 1
    for _ in range(5):
        session.last_archived_message_index = max(session.last_archived_message_index, last)
        try:
            await db.save_session(session)
            break
        except SessionConflictError:
            fresh = await db.load_session(key)
            if fresh is None:
                break
            session = fresh
    return added


async def archive_left_history(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    session_key: str,
    *,
    upto: int,
    window: int = 8,
    overlap: int = 2,
) -> int:
    """Archive a live session's messages up to ``upto`` (they left the history window).

    Takes the session's archiving lease like the idle pass, so two processes never
    archive one session at once; returns chunks added (0 when busy or nothing new).
    """
    lease = f"archive:{session_key}"
    if not await db.acquire_lease(lease, WORKER_ID, ARCHIVE_LEASE_SECONDS):
        return 0
    try:
        session = await db.load_session(session_key)
        if session is None or upto <= session.last_archived_message_index:
            return 0
        return await archive_session(
            db, embedder, session, window=window, overlap=overlap, upto=upto
        )
    finally:
        await db.release_lease(lease, WORKER_ID)


async def rearchive(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    session_key: str,
    message_ids: Sequence[int],
    *,
    window: int = 8,
    overlap: int = 2,
    batch_size: int = 64,
) -> int:
    """Archive again the already-archived messages ``message_ids`` of a session.

    After a delete or edit removed the chunks they shared with the changed message:
    windows over the span they cover (as stored now) are built and added. Messages not
    archived yet are left to the idle pass. Returns chunks added.
    """
    session = await db.load_session(session_key)
    if session is None or session.guild_id is None:
        return 0
    wanted = set(message_ids)
    positions = [i for i, m in enumerate(session.messages) if m.stored_id in wanted]
    last_archived = session.last_archived_message_index
    positions = [i for i in positions if i <= last_archived]
    if not positions:
        return 0
    # Contiguous runs only: messages between two runs kept their own chunks.
    runs: list[list[int]] = [[positions[0]]]
    for i in positions[1:]:
        if i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    spans = [
        span
        for run in runs
        for span in span_windows(run[0], run[-1], size=window, overlap=min(overlap, window - 1))
    ]
    rows = await _window_chunks(embedder, session, spans, batch_size)
    return await db.add_chunks(await _conversation_source(db, session), rows)


async def archive_idle_sessions(
    db: DatabaseProtocol,
    embedder: EmbeddingProvider | None,
    *,
    idle_minutes: float,
    window: int = 8,
    overlap: int = 2,
    now: datetime | None = None,
    summarizer: Summarizer | None = None,
) -> ArchiveReport:
    """Archive every active session idle longer than ``idle_minutes``."""
    if embedder is not None:
        await db.set_embedding_config(embedding_config(embedder))
    cutoff = (now or utcnow()) - timedelta(minutes=idle_minutes)
    report = ArchiveReport()
    for info in await db.list_sessions(status="active", idle_before=cutoff):
        if info.guild_id is None:
            report.skipped_dm += 1
            continue
        if info.message_count - 1 <= info.last_archived_message_index:
            continue
        # Another bot process sharing this database may be archiving the same session:
        # whoever holds the lease does it, the other skips (no duplicated embedding work).
        lease = f"archive:{info.session_key}"
        if not await db.acquire_lease(lease, WORKER_ID, ARCHIVE_LEASE_SECONDS):
            report.skipped_busy += 1
            continue
        try:
            session = await db.load_session(info.session_key)
            if session is None:
                continue
            added = await archive_session(
                db, embedder, session, window=window, overlap=overlap, summarizer=summarizer
            )
        finally:
            await db.release_lease(lease, WORKER_ID)
        if added:
            report.sessions.append(info.session_key)
            report.chunks_added += added
    return report
