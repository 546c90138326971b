"""One end of a transfer, per backend: what the tool may ask of a database below the contract.

The transfer steps (copy, verify, upgrade, backup, restore) never test a URL's scheme
and never reach into a backend: they ask :func:`endpoint_for` for the URL's
:class:`Endpoint` and call its methods. Each backend registers its endpoint in
:data:`ENDPOINTS` (``transfer/sqlite.py``, ``transfer/postgres.py``), imported lazily
like the runtime backends, so a SQLite user never loads asyncpg.

Where the backends really differ, an endpoint says so as a capability, not a name:
``file`` (the one file that holds the database: legacy upgrades and file copies apply),
``accepts_archives`` (pg_dump archives restore into it), ``check_can_index`` (the
largest vector its ANN index takes).

Invariants: raw row access (:class:`RowStore`) is in each backend's own ``rows`` module;
a reader never creates or migrates anything; a writer sets the migration marker before
the first row.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kotonoha_bot.db.tables import META, Row, TableSpec
from kotonoha_bot.db.url import DatabaseURL

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings
    from kotonoha_bot.models import EmbeddingConfig
    from kotonoha_bot.transfer.quarantine import Quarantine
    from kotonoha_bot.transfer.reports import (
        BackupResult,
        MigrationReport,
        RestoreResult,
        TransferProgress,
    )

#: Backend (DatabaseURL.backend) -> "module:Class" of its transfer endpoint.
ENDPOINTS: dict[str, str] = {
    "sqlite": "kotonoha_bot.transfer.sqlite:SQLiteEndpoint",
    "postgresql": "kotonoha_bot.transfer.postgres:PostgresEndpoint",
}


class RowStore(Protocol):
    """Raw row access to one database (``db/sqlite/rows.py``, ``db/postgres/rows.py``)."""

    @property
    def location(self) -> str: ...

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def read_all(self, spec: TableSpec) -> list[tuple[Any, ...]]: ...
    def batches(
        self, spec: TableSpec, *, after: int | None, size: int
    ) -> AsyncIterator[list[tuple[Any, ...]]]: ...
    async def keys(self, spec: TableSpec, upto: int | None = None) -> list[int]: ...
    async def fetch(self, spec: TableSpec, keys: Sequence[int]) -> list[tuple[Any, ...]]: ...
    async def max_key(self, spec: TableSpec) -> int | None: ...
    async def count(self, spec: TableSpec) -> int: ...
    async def sequence_marks(self) -> dict[str, int]: ...
    async def insert(self, spec: TableSpec, rows: Sequence[Row]) -> list[tuple[Row, str]]: ...
    async def set_meta(self, key: str, value: str) -> None: ...
    async def delete_meta(self, key: str) -> None: ...
    async def fix_message_counts(self) -> int: ...
    async def set_sequences(self, marks: dict[str, int]) -> None: ...
    async def wipe(self) -> None: ...
    async def analyze(self) -> None: ...
    async def integrity(self) -> dict[str, int]: ...


@dataclass
class Source:
    """An opened source: a snapshot reader, what it was, and a name safe to store."""

    store: RowStore
    kind: str  # sqlite | legacy | postgresql
    identity: str


@dataclass
class Target:
    """An opened migration target: its writer and, where it has one, its index rebuild."""

    store: RowStore
    #: Builds the ANN index once after a bulk load (None where there is none to build).
    rebuild_index: Callable[[], Awaitable[None]] | None = None


@dataclass
class TargetInfo:
    """What a database holds, read without creating or migrating anything."""

    kind: str  # missing | empty | current | legacy | unknown | postgresql
    has_schema: bool
    counts: dict[str, int]
    meta: dict[str, str]
    schema_version: int = 0
    server_version_num: int = 0

    @property
    def data_rows(self) -> int:
        return sum(n for t, n in self.counts.items() if t != META.name)


class Endpoint(Protocol):
    """One database as the transfer tool sees it (one implementation per backend)."""

    url: DatabaseURL
    settings: Settings
    #: The one file holding the database (SQLite), None for a server.
    file: Path | None
    #: pg_dump archives can be restored into it.
    accepts_archives: bool

    async def inspect(self) -> TargetInfo:
        """What it holds, read without creating anything."""
        ...

    def source(
        self,
        *,
        timezone: tzinfo,
        backup_dir: Path | None,
        quarantine: Quarantine,
        report: MigrationReport | None,
        progress: TransferProgress,
    ) -> AbstractAsyncContextManager[Source]:
        """Checked (and backed up, converted) as a migration source: a snapshot reader."""
        ...

    def reader(self, role: str) -> AbstractAsyncContextManager[RowStore]:
        """A read-only snapshot reader of a current-schema database (never migrated)."""
        ...

    def writer(
        self, embedding: EmbeddingConfig | None, marker: str, mode: str
    ) -> AbstractAsyncContextManager[Target]:
        """The schema created, the marker set first, the embedding model recorded."""
        ...

    def check_can_index(self, embedding: EmbeddingConfig | None) -> None:
        """Raise MigrationError when its vector index cannot hold ``embedding``."""
        ...

    async def wipe(self) -> None:
        """Delete every row (the schema stays)."""
        ...

    async def backup(
        self, label: str, output: str | Path | None, progress: TransferProgress | None
    ) -> BackupResult:
        """Write a verified backup named ``label`` (rotated unless ``output`` is a file)."""
        ...

    async def check_archive(self, path: Path) -> None:
        """Refuse a pg_dump archive that cannot be restored; nothing is touched."""
        ...

    async def restore_archive(self, path: Path, started: float, wiped: bool) -> RestoreResult:
        """Restore a pg_dump archive and verify it against its manifest."""
        ...


def endpoint_for(url: str | DatabaseURL, settings: Settings) -> Endpoint:
    """The registered endpoint of ``url``'s backend (its module imported on first use)."""
    parsed = DatabaseURL.parse(url)
    module_name, _, class_name = ENDPOINTS[parsed.backend].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    endpoint: Endpoint = cls(parsed, settings)
    return endpoint


def identity(url: str | DatabaseURL) -> str:
    """A stable name for a database, safe to store and print (no password)."""
    return DatabaseURL.parse(url).identity


def display_url(url: str | DatabaseURL) -> str:
    """A URL fit for printing (no password)."""
    return DatabaseURL.parse(url).display()


def small_pool(settings: Settings) -> Settings:
    """The settings a tool connection uses: a pool of 1-2, no replica, long statements.

    One rule for every step (the copy, backups, restores): a bulk statement may run far
    longer than a bot's query.
    """
    return settings.model_copy(
        update={
            "database_pool_min_size": 1,
            "database_pool_max_size": 2,
            "database_read_url": None,
            "database_command_timeout": max(settings.database_command_timeout, 3600.0),
        }
    )


async def table_counts(url: str, settings: Settings) -> dict[str, int]:
    """Rows per table, read without creating anything (empty dict: no database)."""
    info = await endpoint_for(url, settings).inspect()
    return dict(info.counts) if info.has_schema else {}


async def wipe(url: str, settings: Settings) -> None:
    """Delete every row of a kotonoha database (the schema stays)."""
    await endpoint_for(url, settings).wipe()
