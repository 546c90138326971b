"""The PostgreSQL backend (asyncpg + pgvector). Only this package imports asyncpg and pgvector.

- ``database.py`` :class:`PostgreSQLDatabase` (the mixins below): sessions, re-embed, stats
- ``connection.py`` pools, connection setup, retry, typed errors; ``schema.py`` the migrations
- ``index.py`` the embedding config and the ANN index; ``search_plan.py`` exact vs approximate
- ``sql.py`` statement text and its parameters (:class:`~kotonoha_bot.db.postgres.sql.Params`)
- ``knowledge.py`` sources, chunks, pending claims; ``search.py`` vector and keyword search
- ``provenance.py`` edits/deletes that follow Discord, forget; ``memories.py`` memories, usage
- ``dashboard.py`` the operator's guild-scoped listings, deletes, pause switch, backup records
- ``rows.py`` raw rows (COPY, snapshots) for the transfer tool
"""

from kotonoha_bot.db.postgres.database import PostgreSQLDatabase

__all__ = ["PostgreSQLDatabase"]
