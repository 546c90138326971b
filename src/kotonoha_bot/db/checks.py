"""The rules both backends apply before they touch storage, written once.

Every check raises a typed :class:`~kotonoha_bot.errors.InvalidInputError` (or a
subclass) naming what and where, before anything is written, so hostile input fails the
same way on SQLite and PostgreSQL. Both backends call these; neither keeps a copy. A
backend-specific limit (pgvector's index dimensions) stays in that backend.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
    EmbeddingConfig,
    KnowledgeChunk,
    KnowledgeSource,
    Memory,
    SourceStatus,
    UsageRecord,
    Vector,
)
from kotonoha_bot.text import check_text

MAX_TOP_K = 1000
#: Longest listing of memories one call returns.
MAX_MEMORY_PAGE = 500
#: Longest page of chunks or sessions the dashboard's listings return.
MAX_DASHBOARD_PAGE = 500
_FILTER_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
Scalar = str | int | float | bool


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


def check_limit(limit: int, where: str) -> int:
    """A row limit of a listing: an integer, 0 or more (0 lists nothing).

    The same on both backends: SQLite would read a negative LIMIT as "no limit" and
    PostgreSQL refuses it, so a negative one is refused here, before either sees it.
    """
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InvalidInputError(f"{where}: limit must be an integer of 0 or more, got {limit!r}")
    return limit


def check_chunk_scope(guild_id: int, chunks: Sequence[KnowledgeChunk], where: str) -> None:
    """A chunk that names a guild names its source's: knowledge never crosses guilds."""
    for c in chunks:
        if c.guild_id is not None and c.guild_id != guild_id:
            raise InvalidInputError(
                f"{where} chunk {c.chunk_key!r}: guild_id {c.guild_id} differs from the"
                f" source's {guild_id}"
            )


def require_config(config: EmbeddingConfig | None, has_vectors: bool, where: str) -> None:
    """Vectors may be written only once the database records its embedding model."""
    if config is None and has_vectors:
        raise InvalidInputError(
            f"{where}: no embedding model recorded in this database yet;"
            " call set_embedding_config before writing vectors"
        )


def source_status(chunks: Iterable[KnowledgeChunk]) -> SourceStatus:
    """A source is ``ready`` when all its chunks have vectors, else ``pending``.

    The same rule in SQL, for sources whose chunks are already stored:
    :data:`kotonoha_bot.db.tables.SOURCE_STATUS_SQL`.
    """
    return "ready" if all(c.embedding is not None for c in chunks) else "pending"


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
