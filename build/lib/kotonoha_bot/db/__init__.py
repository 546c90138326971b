"""Storage: one async contract, two backends chosen by URL scheme.

Only the chosen backend's module is imported, so SQLite users never load asyncpg.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from kotonoha_bot.db.base import DatabaseProtocol
from kotonoha_bot.errors import ConfigError
from kotonoha_bot.redact import safe_url

if TYPE_CHECKING:
    from kotonoha_bot.config import Settings

__all__ = ["DatabaseProtocol", "open_database", "parse_database_url", "sqlite_path_from_url"]

#: URL scheme -> "module:Class" (imported lazily).
BACKENDS: dict[str, str] = {
    "sqlite": "kotonoha_bot.db.sqlite:SQLiteDatabase",
    "postgresql": "kotonoha_bot.db.postgres:PostgreSQLDatabase",
    "postgres": "kotonoha_bot.db.postgres:PostgreSQLDatabase",
}


def sqlite_path_from_url(url: str) -> Path:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs/x.db`` -> ``/abs/x.db``."""
    if not url.startswith("sqlite:///"):
        raise ConfigError(
            f"invalid SQLite URL {safe_url(url)!r}: use sqlite:///relative.db or"
            " sqlite:////absolute/path.db"
        )
    rest = url[len("sqlite:///") :].split("?", 1)[0]
    if not rest or rest == ":memory:":
        raise ConfigError("a SQLite URL must name a file (in-memory databases are not kept)")
    return Path(rest)


def parse_database_url(url: str) -> str:
    """Return the backend scheme of ``url`` or raise ``ConfigError``."""
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    scheme = scheme.split("+", 1)[0]
    if scheme not in BACKENDS:
        known = ", ".join(sorted({"sqlite", "postgresql"}))
        raise ConfigError(f"unsupported database URL {safe_url(url)!r}: scheme must be {known}")
    return scheme


def open_database(
    target: str | Settings | None = None, *, settings: Settings | None = None
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
    url = target if target is not None else settings.database_location()
    scheme = parse_database_url(url)
    module_name, _, class_name = BACKENDS[scheme].partition(":")
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    db: DatabaseProtocol = cls(url, settings=settings)
    return db
