"""The storage contract every backend implements, and the checks they share.

``DatabaseProtocol`` is the only way the layers above ``db/`` touch storage. Both
backends (``SQLiteDatabase``, ``PostgreSQLDatabase``) pass the same contract suite
(``tests/db/test_contract.py``); where behaviour really differs a backend says so in
``capabilities`` instead of callers testing its name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np

from kotonoha_bot.errors import (
    DimensionMismatchError,
    EmbeddingModelMismatchError,
    InvalidInputError,
    InvalidVectorError,
)
from kotonoha_bot.models import (
    ROLES,
    SESSION_STATUSES,
    SESSION_TYPES,
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
from kotonoha_bot.text import check_text

#: Capabilities a backend may declare.
CAP_ANN_INDEX = "ann_index"  # approximate vector index (HNSW/IVFFlat)
CAP_MULTI_PROCESS = "multi_process"  # several bot processes may share the database
CAP_READ_REPLICA = "read_replica"  # searches may go to a read replica
CAP_SERVER = "server"  # a network server (restart/pool faults apply)

MAX_TOP_K = 1000
_FILTER_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
Scalar = str | int | float | bool


#: Longest listing of memories one call returns.
MAX_MEMORY_PAGE = 500
#: Longest page of chunks or sessions the dashboard's listings return.
MAX_DASHBOARD_PAGE = 500


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


# --- shared checks (used by both backends so the rules are identical) ------------------


def config_from_meta(meta: Mapping[str, str], prefix: str) -> EmbeddingConfig | None:
    """``{prefix}_model``/``{prefix}_dimension`` rows of kotonoha_meta as a config, or None.

    ``prefix`` is ``embedding`` (the recorded model) or ``reembed`` (a running re-embed).
    """
    if f"{prefix}_model" not in meta:
        return None
    return EmbeddingConfig(meta[f"{prefix}_model"], int(meta[f"{prefix}_dimension"]))


def check_vector(value: Sequence[float] | Vector, expected_dim: int | None, where: str) -> Vector:
    """Return a contiguous float32 copy, or raise a typed error naming ``where``."""
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidVectorError(f"{where}: not a numeric vector ({exc})") from None
    if arr.ndim != 1:
        raise InvalidVectorError(f"{where}: expected a 1-d vector, got {arr.ndim} dimensions")
    if expected_dim is not None and arr.shape[0] != expected_dim:
        raise DimensionMismatchError(
            f"{where}: vector has {arr.shape[0]} dimensions but the database was built"
            f" with {expected_dim}"
        )
    if arr.shape[0] == 0:
        raise InvalidVectorError(f"{where}: empty vector")
    if not np.isfinite(arr).all():
        raise InvalidVectorError(f"{where}: vector contains NaN or infinity")
    if not np.any(arr):
        raise InvalidVectorError(f"{where}: vector is all zeros (no direction)")
    return np.ascontiguousarray(arr)


def check_embedding_config(recorded: EmbeddingConfig | None, wanted: EmbeddingConfig) -> bool:
    """True when ``wanted`` must be recorded; raise when it contradicts ``recorded``."""
    if wanted.dimension < 1:
        raise InvalidInputError(f"embedding dimension must be positive, got {wanted.dimension}")
    check_text(wanted.model, "embedding model")
    if recorded is None:
        return True
    if recorded != wanted:
        raise EmbeddingModelMismatchError(
            f"this database was built with embedding model {recorded.model!r}"
            f" ({recorded.dimension} dimensions), but {wanted.model!r}"
            f" ({wanted.dimension} dimensions) is configured; run `kotonoha kb reembed`"
            " to rebuild the vectors, or configure the recorded model"
        )
    return False


def check_filters(filters: Mapping[str, Any] | None) -> dict[str, list[Scalar]]:
    """Normalise metadata filters to {key: [allowed values]} (one value = equality)."""
    if not filters:
        return {}
    out: dict[str, list[Scalar]] = {}
    for key, value in filters.items():
        if not isinstance(key, str) or not _FILTER_KEY_RE.match(key):
            raise InvalidInputError(
                f"metadata filter key {key!r}: use letters, digits, '_', '-', '.' (max 64)"
            )
        values = list(value) if isinstance(value, list | tuple | set | frozenset) else [value]
        if not values:
            raise InvalidInputError(f"metadata filter {key!r}: empty list matches nothing")
        for v in values:
            if not isinstance(v, str | int | float | bool) or (
                isinstance(v, float) and not math.isfinite(v)
            ):
                raise InvalidInputError(
                    f"metadata filter {key!r}: values must be strings, numbers or booleans,"
                    f" got {type(v).__name__}"
                )
            if isinstance(v, str):
                check_text(v, f"metadata filter {key!r}")
        out[key] = values
    return out


def check_top_k(top_k: int) -> int:
    """Reject nonsensical result sizes."""
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise InvalidInputError(f"top_k must be an integer from 1 to {MAX_TOP_K}, got {top_k!r}")
    return top_k


def check_session(session: ChatSession) -> None:
    """Reject a session the contract cannot store, before anything is written."""
    check_text(session.session_key, "session_key")
    if not session.session_key:
        raise InvalidInputError("session_key must not be empty")
    if session.session_type not in SESSION_TYPES:
        raise InvalidInputError(
            f"session {session.session_key!r}: unknown session_type {session.session_type!r}"
        )
    if session.status not in SESSION_STATUSES:
        raise InvalidInputError(
            f"session {session.session_key!r}: unknown status {session.status!r}"
        )
    for name in ("created_at", "last_active_at"):
        if getattr(session, name).tzinfo is None:
            raise InvalidInputError(f"session {session.session_key!r}: {name} is naive")
    for i, msg in enumerate(session.messages):
        where = f"session {session.session_key!r} message {i}"
        if msg.role not in ROLES:
            raise InvalidInputError(f"{where}: unknown role {msg.role!r}")
        check_text(msg.content, where)
        if msg.author_name is not None:
            check_text(msg.author_name, f"{where} author_name")
        if msg.timestamp.tzinfo is None:
            raise InvalidInputError(f"{where}: timestamp is naive")
    check_ids(
        session.session_key,
        session.guild_id,
        session.channel_id,
        session.thread_id,
        session.user_id,
    )


def check_ids(where: str, *ids: int | None) -> None:
    """Discord ids and row ids are 64-bit signed integers, 0 or more, on both backends.

    Checked at the contract, on every path that takes one (writes, searches, listings,
    deletes), so a hostile ``--guild 9223372036854775808`` is a typed error on SQLite
    and PostgreSQL alike instead of a driver overflow.
    """
    for value in ids:
        if value is not None and (
            isinstance(value, bool | np.bool_)
            or not isinstance(value, int | np.integer)
            or not 0 <= int(value) < 2**63
        ):
            raise InvalidInputError(
                f"{where}: id {value!r} is not a 64-bit integer from 0 to 2^63-1"
            )


def check_metadata(metadata: Mapping[str, Any], where: str) -> None:
    """Metadata must be JSON-serialisable with text keys and no NUL anywhere."""
    import json

    try:
        encoded = json.dumps(metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"{where}: metadata is not JSON-serialisable ({exc})") from None
    if "\\u0000" in encoded or "\x00" in encoded:
        raise InvalidInputError(f"{where}: metadata contains a NUL character")


def check_discord_id(value: int | None, where: str) -> None:
    """A Discord snowflake (or None): a 64-bit non-negative integer."""
    check_ids(where, value)


def check_memory(memory: Memory, *, max_chars: int | None = None) -> None:
    """A memory the contract can store: an owner, non-empty NUL-free text."""
    where = f"memory of user {memory.user_id}"
    check_ids(where, memory.user_id, memory.guild_id)
    check_text(memory.content, where)
    if not memory.content.strip():
        raise InvalidInputError(f"{where}: text must not be empty")
    if max_chars is not None and len(memory.content) > max_chars:
        raise InvalidInputError(
            f"{where}: {len(memory.content)} characters, at most {max_chars} are kept"
        )


def check_memory_page(guild_id: int | None, user_id: int | None, limit: int) -> None:
    """DM memories are listed per user only; pages are bounded."""
    if guild_id is None and user_id is None:
        raise InvalidInputError("DM memories are private: list them for one user_id")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_MEMORY_PAGE:
        raise InvalidInputError(f"limit must be an integer from 1 to {MAX_MEMORY_PAGE}")


def check_usage(record: UsageRecord) -> None:
    """Token counts are non-negative integers; the model is named."""
    where = f"usage of {record.model!r} on {record.day}"
    check_text(record.model, where)
    if not record.model:
        raise InvalidInputError(f"{where}: model must be named")
    check_ids(where, record.guild_id, record.user_id)
    for name in ("calls", "input_tokens", "output_tokens"):
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
            raise InvalidInputError(f"{where}: {name} must be a non-negative integer")


def check_source(
    source: KnowledgeSource, chunks: Sequence[KnowledgeChunk], dim: int | None
) -> None:
    """Validate a source and its chunks (text, ids, metadata, vectors) before writing."""
    where = f"source {source.uri!r}"
    check_text(source.uri, where)
    check_text(source.title, f"{where} title")
    if not source.uri:
        raise InvalidInputError("source uri must not be empty")
    check_ids(where, source.guild_id, source.channel_id)
    if source.guild_id is None:
        raise InvalidInputError(f"{where}: guild_id is required (every knowledge row is scoped)")
    check_metadata(source.metadata, where)
    check_chunks(chunks, dim, where)


def check_chunks(chunks: Sequence[KnowledgeChunk], dim: int | None, where: str) -> None:
    """Validate chunks; vectors must match ``dim`` (None = not recorded yet)."""
    seen: set[str] = set()
    first_dim = dim
    for chunk in chunks:
        cw = f"{where} chunk {chunk.chunk_index} ({chunk.chunk_key!r})"
        check_text(chunk.chunk_key, cw)
        check_text(chunk.content, cw)
        if chunk.chunk_key in seen:
            raise InvalidInputError(f"{cw}: duplicate chunk_key")
        seen.add(chunk.chunk_key)
        check_metadata(chunk.metadata, cw)
        check_ids(cw, chunk.guild_id, chunk.channel_id, *chunk.message_ids)
        if chunk.embedding is not None:
            vec = check_vector(chunk.embedding, first_dim, cw)
            first_dim = vec.shape[0]


def check_page(offset: int, limit: int) -> None:
    """A dashboard page: offset from 0, at most ``MAX_DASHBOARD_PAGE`` rows."""
    for name, value, low in (("offset", offset, 0), ("limit", limit, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer of at least {low}")
    if limit > MAX_DASHBOARD_PAGE:
        raise InvalidInputError(f"limit must be at most {MAX_DASHBOARD_PAGE}")
    if offset >= 2**62:
        raise InvalidInputError("offset is too large")


def check_backup_record(record: BackupRecord) -> None:
    """A backup outcome the contract can store: aware time, NUL-free texts."""
    if record.at.tzinfo is None:
        raise InvalidInputError("backup record: time is naive")
    for name in ("path", "method", "error"):
        check_text(getattr(record, name), f"backup record {name}")
