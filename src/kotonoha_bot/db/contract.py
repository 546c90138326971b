"""The storage contract every backend implements: ``DatabaseProtocol`` and its result types.

``DatabaseProtocol`` is the only way the layers above ``db/`` touch storage. Both
backends (``db/sqlite/``, ``db/postgres/``) pass the same contract suite
(``tests/db/test_contract.py``); where behaviour really differs a backend says so in
``capabilities`` instead of callers testing its name. The rules both backends apply to
their input live once, in :mod:`kotonoha_bot.db.checks`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

from kotonoha_bot.models import (
    BackupRecord,
    ChatSession,
    ChunkInfo,
    ChunkOrigin,
    DatabaseStats,
    EmbeddingConfig,
    GuildSummary,
    KnowledgeChunk,
    KnowledgeSource,
    Memory,
    MessageChange,
    PauseState,
    PendingChunk,
    SearchHit,
    SessionInfo,
    SourceSummary,
    UsageRecord,
    Vector,
    VectorIndexState,
)

#: Capabilities a backend may declare.
CAP_ANN_INDEX = "ann_index"  # approximate vector index (HNSW/IVFFlat)
CAP_MULTI_PROCESS = "multi_process"  # several bot processes may share the database
CAP_READ_REPLICA = "read_replica"  # searches may go to a read replica
CAP_SERVER = "server"  # a network server (restart/pool faults apply)


@dataclass(frozen=True, slots=True)
class ForgetResult:
    """What ``forget`` deleted.

    ``rearchive`` maps a session to stored ids of other people's messages that shared
    an archived window with what was forgotten: their chunks went too, and archiving
    them again rebuilds that knowledge without the forgotten messages.
    """

    messages: int
    sessions: int
    chunks: int
    sources: int
    memories: int = 0
    session_keys: tuple[str, ...] = ()
    rearchive: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReembedStatus:
    """Progress of a running re-embedding."""

    target: EmbeddingConfig
    done: int
    total: int


@runtime_checkable
class DatabaseProtocol(Protocol):
    """Async storage for sessions and the knowledge base."""

    backend_name: str
    capabilities: frozenset[str]

    @property
    def location(self) -> str:
        """Where the data lives, safe to print (no password)."""
        ...

    # lifecycle ---------------------------------------------------------------------
    async def initialize(self) -> None:
        """Connect and apply pending schema migrations."""
        ...

    async def close(self) -> None:
        """Release connections; idempotent."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def schema_version(self) -> int:
        """The highest applied migration."""
        ...

    async def stats(self) -> DatabaseStats:
        """Counts, schema version, embedding config, size on disk."""
        ...

    # sessions ----------------------------------------------------------------------
    async def save_session(self, session: ChatSession) -> None:
        """Insert or update; appends new messages only. Stale version -> SessionConflictError."""
        ...

    async def load_session(self, session_key: str) -> ChatSession | None:
        """The session with all its messages, or None."""
        ...

    async def delete_session(self, session_key: str) -> bool:
        """Delete a session and its messages; True when it existed."""
        ...

    async def list_sessions(
        self,
        *,
        guild_id: int | None = None,
        status: str | None = None,
        idle_before: datetime | None = None,
        limit: int | None = None,
    ) -> list[SessionInfo]:
        """Session headers, least recently active first."""
        ...

    async def forget(
        self, *, guild_id: int, user_id: int | None = None, channel_id: int | None = None
    ) -> ForgetResult:
        """Delete a user's messages, the bot's replies to them and every chunk built from
        them, and the user's memories; or (no user) all data of a channel or guild.

        With ``user_id``: the user's own sessions (``user_id`` on the session) go whole;
        in shared sessions their messages and the bot's replies of their turns go; every
        chunk built from a removed message or naming them as an author goes; their
        memories in the guild go. Without: every session, chunk and source of the
        channel (or guild), and for a whole guild its memories too.
        """
        ...

    # provenance: edits and deletes that follow Discord --------------------------------
    async def record_reply_parts(
        self,
        session_key: str,
        turn_id: int,
        channel_id: int,
        discord_message_ids: Sequence[int],
    ) -> int:
        """Link the Discord messages the bot sent as a turn's reply to the stored reply.

        Returns the links stored (0 when the reply of that turn is not stored).
        """
        ...

    async def edit_message(
        self, *, guild_id: int | None, discord_message_id: int, content: str
    ) -> MessageChange:
        """Replace the text of a stored message edited on Discord (same text: no change).

        Every chunk built from it is removed; ``rearchive`` lists what to archive again.
        ``guild_id`` None means a DM.
        """
        ...

    async def delete_messages(
        self, *, guild_id: int | None, discord_message_ids: Sequence[int]
    ) -> MessageChange:
        """Remove messages deleted on Discord: user messages, the bot's replies of their
        turns, the bot's own messages (by their reply parts), and every chunk built from
        any of them. Ids that are not stored are ignored. ``guild_id`` None means a DM.
        """
        ...

    async def delete_channel_messages(self, *, guild_id: int, channel_id: int) -> MessageChange:
        """A channel or thread was deleted: every session in it (its threads included)
        and every message posted in it go, with the knowledge built from them.
        Documents scoped to the channel stay."""
        ...

    async def chunk_origins(self, chunk_ids: Sequence[int]) -> dict[int, ChunkOrigin]:
        """Provenance of chunks: the stored messages each was built from and their links.

        Chunks without recorded messages (documents) are absent from the result.
        """
        ...

    # explicit memories ----------------------------------------------------------------
    async def add_memory(self, memory: Memory, *, max_per_user: int) -> Memory:
        """Store a memory; more than ``max_per_user`` in one scope raises InvalidInputError."""
        ...

    async def list_memories(
        self,
        *,
        guild_id: int | None,
        user_id: int | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[Memory]:
        """Memories of a guild (optionally one user's), newest first, paged by ``before_id``.

        ``guild_id`` None lists a user's DM memories; ``user_id`` is then required.
        """
        ...

    async def delete_memory(
        self, memory_id: int, *, guild_id: int | None, user_id: int | None
    ) -> bool:
        """Delete one memory of that scope (and that user unless ``user_id`` is None)."""
        ...

    # usage ----------------------------------------------------------------------------
    async def record_usage(self, record: UsageRecord) -> None:
        """Add one LLM call's reported tokens to its (day, guild, user, model) row."""
        ...

    async def list_usage(
        self,
        *,
        since: date,
        until: date,
        guild_id: int | None = None,
        user_id: int | None = None,
    ) -> list[UsageRecord]:
        """Usage rows from ``since`` to ``until`` (inclusive), by day, guild, user, model."""
        ...

    async def tokens_used(self, *, day: date, guild_id: int, user_id: int | None = None) -> int:
        """Input + output tokens of one guild (0 = DMs) on ``day``, optionally one user's."""
        ...

    # embeddings config ---------------------------------------------------------------
    async def get_embedding_config(self) -> EmbeddingConfig | None:
        """The recorded embedding model and dimension, None before the first write."""
        ...

    async def set_embedding_config(self, config: EmbeddingConfig) -> None:
        """Record on first use; same config is a no-op; another raises a mismatch error."""
        ...

    # knowledge -----------------------------------------------------------------------
    async def save_source(
        self, source: KnowledgeSource, chunks: Sequence[KnowledgeChunk]
    ) -> KnowledgeSource:
        """Upsert by (guild_id, uri), replacing its chunks, in one transaction."""
        ...

    async def ensure_source(self, source: KnowledgeSource) -> KnowledgeSource:
        """Return the source with this (guild_id, uri), creating it (no chunks) if missing.

        Unlike ``save_source`` it never replaces anything, so concurrent callers
        (two archivers) end up with one source and keep each other's chunks.
        """
        ...

    async def add_chunks(self, source_id: int, chunks: Sequence[KnowledgeChunk]) -> int:
        """Add chunks to a source; existing chunk_keys are skipped. Returns rows added."""
        ...

    async def set_source_hash(self, source_id: int, content_hash: str) -> bool:
        """Record a source's content hash once all its parts are stored; True when it exists.

        A large file is written as ``save_source`` (first part, empty hash) plus
        ``add_chunks`` (the rest); only this call, after the last part, makes the next
        ingest see it as unchanged, so an interrupted ingest is redone, never trusted.
        """
        ...

    async def get_source(self, source_id: int) -> KnowledgeSource | None:
        """A source by id."""
        ...

    async def find_source(self, guild_id: int, uri: str) -> KnowledgeSource | None:
        """A source by its (guild_id, uri)."""
        ...

    async def list_sources(
        self, *, guild_id: int | None = None, status: str | None = None
    ) -> list[KnowledgeSource]:
        """Sources, ordered by id."""
        ...

    async def delete_source(self, source_id: int) -> bool:
        """Delete a source and its chunks; True when it existed."""
        ...

    async def list_chunks(self, source_id: int) -> list[KnowledgeChunk]:
        """A source's chunks (with embeddings), ordered by chunk_index."""
        ...

    async def pending_chunks(self, limit: int = 100) -> list[PendingChunk]:
        """Chunks without an embedding; on servers each call claims distinct rows."""
        ...

    async def set_chunk_embeddings(self, items: Sequence[tuple[int, Vector]]) -> int:
        """Store embeddings; sources whose chunks are all embedded become ready."""
        ...

    async def similarity_search(
        self,
        query_embedding: Sequence[float] | Vector,
        *,
        guild_id: int,
        channel_id: int | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        min_similarity: float | None = None,
    ) -> list[SearchHit]:
        """Nearest chunks by cosine similarity within one guild (and channel), best first."""
        ...

    async def keyword_search(
        self,
        query: str,
        *,
        guild_id: int,
        channel_id: int | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
    ) -> list[SearchHit]:
        """Full-text matches (kotonoha_bot.text tokens) within one guild, best first."""
        ...

    # re-embedding --------------------------------------------------------------------
    async def begin_reembed(self, target: EmbeddingConfig) -> None:
        """Start (or resume) building vectors for another model; searches keep the old."""
        ...

    async def reembed_todo(self, limit: int = 100) -> list[PendingChunk]:
        """Chunks that have no vector for the re-embed target yet."""
        ...

    async def store_reembed(self, items: Sequence[tuple[int, Vector]]) -> int:
        """Store vectors for the re-embed target."""
        ...

    async def reembed_status(self) -> ReembedStatus | None:
        """Progress of the running re-embed, None when none runs."""
        ...

    async def finish_reembed(self) -> EmbeddingConfig:
        """Switch to the new vectors (all must be present) and record the new config."""
        ...

    async def abort_reembed(self) -> None:
        """Drop the partial new vectors."""
        ...

    # job leases ----------------------------------------------------------------------
    async def acquire_lease(self, name: str, owner: str, seconds: float) -> bool:
        """Take (or renew) the named lease for ``seconds``; False while another owner holds it.

        Background jobs (archiving a session) take a lease first, so two bot processes
        sharing one database never do the same work; an expired lease (a crashed
        process) can be taken over.
        """
        ...

    async def release_lease(self, name: str, owner: str) -> None:
        """Give a lease back early (only its owner can)."""
        ...

    # maintenance ---------------------------------------------------------------------
    async def rebuild_vector_index(self) -> None:
        """(Re)build the approximate index; a no-op where there is none."""
        ...

    # the operator's dashboard (every listing and delete is scoped to one guild) -------
    async def list_guilds(self) -> list[GuildSummary]:
        """Every guild with stored data (sessions, sources, memories or usage), by id."""
        ...

    async def source_summaries(self, guild_id: int) -> list[SourceSummary]:
        """A guild's sources with their chunk counts, most recently updated first."""
        ...

    async def list_chunk_page(
        self, source_id: int, *, guild_id: int, offset: int = 0, limit: int = 50
    ) -> list[ChunkInfo]:
        """One page of a source's chunks by chunk_index; empty when it is another guild's."""
        ...

    async def get_chunk(self, chunk_id: int, *, guild_id: int) -> ChunkInfo | None:
        """A chunk of this guild, or None (also when it belongs to another guild)."""
        ...

    async def delete_chunk(self, chunk_id: int, *, guild_id: int) -> bool:
        """Delete one chunk of this guild (a source left empty goes too); True when deleted."""
        ...

    async def find_sessions(
        self,
        *,
        guild_id: int,
        channel_id: int | None = None,
        user_id: int | None = None,
        offset: int = 0,
        limit: int = 50,
    ) -> list[SessionInfo]:
        """A guild's sessions, most recently active first.

        ``channel_id`` matches the channel or the thread; ``user_id`` the sessions the
        user owns or wrote in.
        """
        ...

    async def delete_conversation(self, session_key: str, *, guild_id: int) -> ForgetResult:
        """Delete a session of this guild, its messages and every chunk built from them."""
        ...

    async def pause_state(self) -> PauseState:
        """The bot's pause switch as stored (every process sharing the database sees it)."""
        ...

    async def set_paused(self, paused: bool, *, by: str = "") -> PauseState:
        """Pause (the bot answers nothing) or resume; returns the new state."""
        ...

    async def record_backup(self, record: BackupRecord) -> None:
        """Keep the latest backup outcome (one success and one failure are kept)."""
        ...

    async def last_backup(self, *, failed: bool = False) -> BackupRecord | None:
        """The latest successful backup (or, with ``failed``, the latest failure)."""
        ...

    async def vector_index_state(self) -> VectorIndexState:
        """What serves vector searches (index or cache) and whether it is built."""
        ...


class AsyncLifecycle:
    """``async with backend:`` initialises on enter and closes on exit (both backends)."""

    async def initialize(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.initialize()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
