"""The SQLite backend (aiosqlite), the embedded default. Only this package imports sqlite."""

from kotonoha_bot.db.sqlite.database import SQLiteDatabase

__all__ = ["SQLiteDatabase"]
