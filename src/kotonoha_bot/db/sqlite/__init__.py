"""The SQLite backend (aiosqlite), the embedded default. Only this package imports aiosqlite.

- ``database.py`` :class:`SQLiteDatabase` (the mixins below): sessions, config, leases, stats
- ``connection.py`` the one connection, its lock and transactions, the vector cache's lifecycle
- ``schema.py`` the migrations; ``files.py`` opening, classifying and translating file errors
- ``knowledge.py`` sources, chunks, re-embedding; ``search.py`` vector and keyword search
- ``provenance.py`` edits/deletes that follow Discord, forget; ``memories.py`` memories, usage
- ``dashboard.py`` the operator's guild-scoped listings, deletes, pause switch, backup records
- ``vector_cache.py`` the in-memory compact vectors per scope; ``vector_codecs.py`` their codes;
  ``vector_kernels.py`` the scoring kernels
- ``rows.py`` raw rows for the transfer tool; ``values.py`` the stored time format
"""

from kotonoha_bot.db.sqlite.database import SQLiteDatabase

__all__ = ["SQLiteDatabase"]
