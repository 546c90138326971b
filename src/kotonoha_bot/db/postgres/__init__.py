"""The PostgreSQL backend (asyncpg + pgvector). Only this package imports asyncpg and pgvector."""

from kotonoha_bot.db.postgres.database import PostgreSQLDatabase

__all__ = ["PostgreSQLDatabase"]
