"""Storage: one async contract, two backends chosen by URL scheme.

Only the chosen backend's module is imported, so SQLite users never load asyncpg.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from kotonoha_bot.db.contract import DatabaseProtocol
from kotonoha_bot.db.url import DatabaseURL
from kotonoha_bot.errors import ConfigError

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

__all__ = [
    "DatabaseProtocol",
    "DatabaseURL",
    "open_database",
    "parse_database_url",
    "sqlite_path_from_url",
]

#: Backend (DatabaseURL.backend) -> "module:Class" (imported lazily).
BACKENDS: dict[str, str] = {
    "sqlite": "kotonoha_bot.db.sqlite.database:SQLiteDatabase",
    "postgresql": "kotonoha_bot.db.postgres.database:PostgreSQLDatabase",
}


def sqlite_path_from_url(url: str | DatabaseURL) -> Path:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    parsed = DatabaseURL.parse(url)
    if parsed.path is None:
        raise ConfigError(
            f"{parsed.display()} is not a SQLite URL: use sqlite:///relative.db or"
            " sqlite:////absolute/path.db"
        )
    return parsed.path


def parse_database_url(url: str | DatabaseURL) -> str:
    """The backend of ``url`` (``sqlite`` or ``postgresql``), or raise ``ConfigError``."""
    return DatabaseURL.parse(url).backend


def open_database(
    target: str | DatabaseURL | Settings | None = None, *, settings: Settings | None = None
) -> DatabaseProtocol:
    """Create (not yet connect) the backend for a URL or Settings.

    Use it as ``async with open_database(url) as db:`` — entering initialises.
    """
    from kotonoha_bot.config import Settings as _Settings
    from kotonoha_bot.config import load_settings

    if isinstance(target, _Settings):
        settings = target
        target = None
    if settings is None:
        settings = load_settings()
    url = DatabaseURL.parse(target if target is not None else settings.database_location())
    module_name, _, class_name = BACKENDS[url.backend].partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    db: DatabaseProtocol = cls(url, settings=settings)
    return db
