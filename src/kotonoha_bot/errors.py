"""Typed errors. Every failure the library reports is a ``KotonohaError``.

Drivers' own exceptions (sqlite3, asyncpg, openai, anthropic) are translated into
these at the edge where they occur, with messages that never contain secrets.
"""

from __future__ import annotations


class KotonohaError(Exception):
    """Base class of every error kotonoha-bot raises on purpose."""


class ConfigError(KotonohaError):
    """A setting is missing or invalid."""


class InvalidDatabaseURLError(ConfigError):
    """A database URL could not be parsed; the message quotes it with the password masked."""


class DatabaseError(KotonohaError):
    """The database failed to do what was asked; the transaction was rolled back."""


class DatabaseUnavailableError(DatabaseError):
    """The database cannot be reached (connection refused, server down, file unreadable)."""


class PoolTimeoutError(DatabaseUnavailableError):
    """No pooled connection became free within the acquire timeout."""


class SchemaError(DatabaseError):
    """The database schema is newer than this code or otherwise unusable."""


class CorruptDatabaseError(DatabaseError):
    """The database file failed an integrity check."""


class ForeignDatabaseError(DatabaseError):
    """The file is not kotonoha's (another program's, or not SQLite at all); left unchanged."""


class LegacyDatabaseError(SchemaError):
    """The file is a legacy (pre-ADR-0007) kotonoha database; `kotonoha db upgrade` converts it."""


class DiskFullError(DatabaseError):
    """The disk holding the database (or a file being written) is full; the write was undone."""


class ReadOnlyDatabaseError(DatabaseUnavailableError):
    """The database file or its directory cannot be written (permissions, read-only mount)."""


class DatabaseLockedError(DatabaseError):
    """Another process held the database's write lock for longer than the busy timeout."""


class SessionConflictError(DatabaseError):
    """A session was saved from a stale version; reload it and apply the change again."""


class NotFoundError(DatabaseError):
    """The requested row does not exist."""


class InvalidInputError(KotonohaError):
    """Input was rejected before anything was written."""


class DimensionMismatchError(InvalidInputError):
    """A vector's dimension differs from the one the database was built with."""


class EmbeddingModelMismatchError(InvalidInputError):
    """The configured embedding model differs from the one the database was built with."""


class InvalidVectorError(InvalidInputError):
    """A vector holds NaN/Inf, is all zeros, or is not one-dimensional."""


class InvalidTextError(InvalidInputError):
    """Text holds a NUL character (U+0000) or is otherwise unstorable."""


class MemoryLimitError(InvalidInputError):
    """The user already keeps as many memories in this scope as allowed."""


class UnsupportedDimensionError(InvalidInputError):
    """The backend cannot index vectors of this dimension."""


class EmbeddingError(KotonohaError):
    """The embedding provider failed (after its retries)."""


class LLMError(KotonohaError):
    """The chat model failed (after its retries)."""


class MigrationError(KotonohaError):
    """Moving data between databases failed; the message says what state the target is in."""
