"""Rows the storage contract reads and writes.

Datetimes are always timezone-aware UTC. Discord ids are Python ints (snowflakes
up to 2**63-1). Vectors are 1-d ``numpy.float32`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
Role = Literal["user", "assistant", "system"]
SessionType = Literal["mention", "thread", "eavesdrop", "dm"]
SessionStatus = Literal["active", "archived", "closed"]
SourceType = Literal["document", "conversation"]
SourceStatus = Literal["pending", "ready", "failed"]

ROLES: tuple[str, ...] = ("user", "assistant", "system")
SESSION_TYPES: tuple[str, ...] = ("mention", "thread", "eavesdrop", "dm")
SESSION_STATUSES: tuple[str, ...] = ("active", "archived", "closed")
SOURCE_TYPES: tuple[str, ...] = ("document", "conversation")
SOURCE_STATUSES: tuple[str, ...] = ("pending", "ready", "failed")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC, truncated to microseconds (both backends keep µs)."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """Return ``value`` in UTC; naive datetimes are rejected (ambiguous)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: timezone-aware UTC required")
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a conversation.

    Provenance: ``discord_message_id`` and ``channel_id`` say where the message is on
    Discord (the channel or thread it was posted in). ``turn_id`` is the Discord id of
    the last user message of the turn it belongs to, on the user messages *and* on the
    bot's reply, so deleting a user message can find the reply written to it.
    ``stored_id`` is the database row id: set by ``load_session``, None for a message
    not stored yet (it is ignored by ``save_session``).
    """

    role: Role
    content: str
    timestamp: datetime = field(default_factory=utcnow)
    author_id: int | None = None
    author_name: str | None = None
    discord_message_id: int | None = None
    channel_id: int | None = None
    turn_id: int | None = None
    stored_id: int | None = None


@dataclass(slots=True)
class ChatSession:
    """A persistent conversation. ``messages`` is append-only for ``save_session``.

    ``version`` is the stored version this object is based on (0 = never saved);
    ``save_session`` bumps it on success. ``last_archived_message_index`` is the index
    of the last message already turned into knowledge, -1 when none.
    """

    session_key: str
    session_type: SessionType
    messages: list[Message] = field(default_factory=list)
    status: SessionStatus = "active"
    guild_id: int | None = None
    channel_id: int | None = None
    thread_id: int | None = None
    user_id: int | None = None
    version: int = 0
    last_archived_message_index: int = -1
    created_at: datetime = field(default_factory=utcnow)
    last_active_at: datetime = field(default_factory=utcnow)

    def add_message(self, message: Message) -> None:
        """Append a turn and touch ``last_active_at``."""
        self.messages.append(message)
        self.last_active_at = max(self.last_active_at, message.timestamp)


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """A session's header without its messages (for listings)."""

    session_key: str
    session_type: SessionType
    status: SessionStatus
    guild_id: int | None
    channel_id: int | None
    thread_id: int | None
    user_id: int | None
    version: int
    message_count: int
    last_archived_message_index: int
    created_at: datetime
    last_active_at: datetime


@dataclass(frozen=True, slots=True)
class KnowledgeSource:
    """A document or archived conversation the knowledge base was built from.

    ``uri`` identifies it within its guild (a file path, ``session:{key}``...);
    saving a source with an existing (guild_id, uri) replaces the old one.
    """

    guild_id: int
    uri: str
    title: str
    source_type: SourceType = "document"
    channel_id: int | None = None
    content_hash: str = ""
    status: SourceStatus = "pending"
    metadata: dict[str, Any] = field(default_factory=dict)
    session_key: str | None = None
    source_id: int | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class KnowledgeChunk:
    """A piece of a source, with its embedding once computed (``None`` = pending).

    ``chunk_key`` is stable for the same content in the same place, so adding the
    same chunk twice is a no-op. ``guild_id``/``channel_id`` default to the source's.
    """

    chunk_key: str
    content: str
    chunk_index: int = 0
    embedding: Vector | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    guild_id: int | None = None
    channel_id: int | None = None
    chunk_id: int | None = None
    source_id: int | None = None
    #: Provenance: stored ids (``Message.stored_id``) of the messages a conversation
    #: chunk was built from. A chunk whose messages are gone when it is added is skipped.
    message_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PendingChunk:
    """A chunk that still needs an embedding (for the embed-pending and re-embed jobs)."""

    chunk_id: int
    source_id: int
    content: str


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One search result. ``similarity`` is cosine (1 = identical) for vector hits.

    Keyword hits carry ``coverage``: the IDF-weighted share (0..1) of the query's
    informative terms the chunk contains (see ``kotonoha_bot.text.keyword_plan``).
    """

    chunk_id: int
    source_id: int
    content: str
    score: float
    guild_id: int
    channel_id: int | None
    metadata: dict[str, Any]
    chunk_index: int = 0
    similarity: float | None = None
    source_title: str = ""
    source_uri: str = ""
    coverage: float | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingConfig:
    """The embedding model and dimension a database was built with."""

    model: str
    dimension: int


@dataclass(frozen=True, slots=True)
class DatabaseStats:
    """What ``db status`` shows. ``details`` holds backend-specific facts."""

    backend: str
    location: str
    schema_version: int
    sessions: int
    messages: int
    sources: int
    chunks: int
    pending_chunks: int
    embedding: EmbeddingConfig | None
    size_bytes: int
    details: dict[str, Any] = field(default_factory=dict)


# --- provenance, explicit memories, usage ---------------------------------------------


@dataclass(frozen=True, slots=True)
class MessageLink:
    """Where a message is on Discord; ``url`` is its jump link."""

    guild_id: int | None
    channel_id: int
    message_id: int

    @property
    def url(self) -> str:
        """``https://discord.com/channels/<guild>/<channel>/<message>`` (``@me`` in a DM)."""
        guild = "@me" if self.guild_id is None else str(self.guild_id)
        return f"https://discord.com/channels/{guild}/{self.channel_id}/{self.message_id}"


@dataclass(frozen=True, slots=True)
class ChunkOrigin:
    """The stored messages a chunk was built from, and their Discord links, oldest first."""

    chunk_id: int
    message_ids: tuple[int, ...]
    links: tuple[MessageLink, ...]

    @property
    def first_link(self) -> MessageLink | None:
        """The link a search hit shows (the oldest message of the chunk on Discord)."""
        return self.links[0] if self.links else None


@dataclass(frozen=True, slots=True)
class MessageChange:
    """What an edit or delete that followed Discord changed.

    ``rearchive`` maps a session to the stored ids of the messages that are still
    there but whose chunks were removed (they shared a window with the changed
    message): archiving them again rebuilds that knowledge without it.
    """

    messages: int = 0
    chunks: int = 0
    sessions: tuple[str, ...] = ()
    rearchive: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Memory:
    """Something a user asked the bot to remember (``/memory add``).

    ``guild_id`` is the guild it belongs to; None means the user's direct messages
    (private to the DM). It is only ever put into that user's own turns there.
    """

    user_id: int
    content: str
    guild_id: int | None = None
    memory_id: int | None = None
    created_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """Tokens the LLM reported for one (UTC day, guild, user, model); 0 = no guild/user.

    ``record_usage`` adds one call's numbers to its row; listings return the sums.
    """

    day: date
    model: str
    guild_id: int = 0
    user_id: int = 0
    calls: int = 1
    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input plus output tokens (what the daily budgets count)."""
        return self.input_tokens + self.output_tokens


# --- the operator's dashboard -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GuildSummary:
    """A guild with stored data, and how much of each kind (the dashboard's guild list)."""

    guild_id: int
    sessions: int = 0
    sources: int = 0
    chunks: int = 0
    memories: int = 0
    last_active_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SourceSummary:
    """A knowledge source with its chunk counts (``pending``: chunks without a vector)."""

    source: KnowledgeSource
    chunks: int
    pending: int


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """A chunk as an operator sees it: text, place, whether it has a vector, provenance.

    Unlike :class:`KnowledgeChunk` it never carries the vector itself (pages of
    chunks stay small); ``message_ids`` are the stored messages it was built from.
    """

    chunk_id: int
    source_id: int
    guild_id: int
    channel_id: int | None
    chunk_index: int
    content: str
    metadata: dict[str, Any]
    embedded: bool
    message_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PauseState:
    """The bot's pause switch: while ``paused`` it answers nothing (set by the dashboard)."""

    paused: bool
    since: datetime | None = None
    by: str | None = None


@dataclass(frozen=True, slots=True)
class BackupRecord:
    """The outcome of one backup, kept in the database so every process can show it."""

    at: datetime
    ok: bool
    path: str = ""
    method: str = ""
    size_bytes: int = 0
    error: str = ""


@dataclass(frozen=True, slots=True)
class VectorIndexState:
    """What serves vector searches and whether it is usable now.

    ``state``: ``ready``; ``building`` (``progress`` 0..1 when the server reports it);
    ``cold`` (SQLite: the in-memory cache loads on the first search); ``missing``
    (searches are exact until it exists); ``invalid`` (an interrupted build).
    """

    kind: str
    state: str
    detail: str = ""
    progress: float | None = None
