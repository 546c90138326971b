"""PostgreSQL: the embedding configuration and the ANN index it types.

The vector column is typed by the recorded dimension; the HNSW/IVFFlat index is
created when the model is recorded (or trained once IVFFlat has rows) and rebuilt on
request; a dimension pgvector cannot index is refused before anything is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kotonoha_bot.db.checks import (
    check_embedding_config,
)
from kotonoha_bot.db.postgres.connection import (
    IVFFLAT_MIN_ROWS,
    MAINTENANCE_TIMEOUT_SECONDS,
    Conn,
    PostgresConnection,
)
from kotonoha_bot.db.postgres.schema import (
    ANN_INDEX_NAME,
    HALFVEC_INDEX_MAX_DIM,
    SCHEMA_LOCK_KEY,
)
from kotonoha_bot.db.postgres.search_plan import (
    IndexPlan,
)
from kotonoha_bot.errors import (
    UnsupportedDimensionError,
)
from kotonoha_bot.models import (
    EmbeddingConfig,
)

if TYPE_CHECKING:
    pass


class PostgresIndex(PostgresConnection):
    """Mixed into :class:`~kotonoha_bot.db.postgres.database.PostgreSQLDatabase`."""

    # --- embedding configuration ----------------------------------------------

    async def get_embedding_config(self) -> EmbeddingConfig | None:
        self._config = await self._run("reading the embedding configuration", self._read_config)
        return self._config

    async def set_embedding_config(self, config: EmbeddingConfig) -> None:
        check_embedding_config(None, config)

        async def body(conn: Conn) -> None:
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            recorded = await self._read_config(conn)
            if not check_embedding_config(recorded, config):
                return
            self._check_indexable(config)
            await self._set_meta(
                conn,
                {
                    "embedding_model": config.model,
                    "embedding_dimension": str(config.dimension),
                },
            )
            await conn.execute(f"DROP INDEX IF EXISTS {ANN_INDEX_NAME}")
            await conn.execute(
                "ALTER TABLE knowledge_chunks ALTER COLUMN embedding"
                f" TYPE vector({int(config.dimension)})"
            )
            await self._create_ann_index(conn, config.dimension)

        await self._run("recording the embedding configuration", body, write=True)
        self._config = config
        await self._after_schema_change()

    @staticmethod
    def _check_indexable(config: EmbeddingConfig) -> None:
        if config.dimension > HALFVEC_INDEX_MAX_DIM:
            raise UnsupportedDimensionError(
                f"embedding model {config.model!r} has {config.dimension} dimensions; pgvector"
                f" indexes at most {HALFVEC_INDEX_MAX_DIM} (as halfvec). Use a smaller model or"
                " request shortened embeddings (e.g. OpenAI `dimensions`), or use SQLite"
            )

    async def _create_ann_index(
        self,
        conn: Conn,
        dimension: int,
        *,
        concurrently: bool = False,
        name: str = ANN_INDEX_NAME,
    ) -> bool:
        """Create the configured approximate index; False when IVFFlat has too few rows."""
        lists = 0
        if self._index_type == "ivfflat":
            rows = int(
                await conn.fetchval(
                    "SELECT count(*) FROM knowledge_chunks WHERE embedding IS NOT NULL"
                )
            )
            if rows < IVFFLAT_MIN_ROWS:
                return False
            lists = self._settings.ivfflat_lists or max(10, rows // 1000)
        s = self._settings
        plan = IndexPlan.for_dimension(
            dimension,
            self._index_type,
            self._index_precision,
            m=s.hnsw_m,
            ef_construction=s.hnsw_ef_construction,
            lists=lists or 100,
        )
        await conn.execute(
            plan.ddl(name, concurrently=concurrently), timeout=MAINTENANCE_TIMEOUT_SECONDS
        )
        self._live_precision = None  # re-read with the next scope count
        return True

    async def _after_schema_change(self) -> None:
        """Column types changed: drop cached statements everywhere in our pools."""
        self._scope_sizes.clear()
        for pool in (self._pool, self._read_pool):
            if pool is not None:
                await pool.expire_connections()

    async def _current_config(self, conn: Conn) -> EmbeddingConfig | None:
        """The recorded config; cached once known (it changes only through this class)."""
        if self._config is None:
            self._config = await self._read_config(conn)
        return self._config

    # --- maintenance ----------------------------------------------------------

    async def rebuild_vector_index(self) -> None:
        """(Re)build the configured ANN index without blocking searches (CONCURRENTLY)."""
        building = ANN_INDEX_NAME + "_new"

        async def body(conn: Conn) -> None:
            config = await self._read_config(conn)
            if config is None:
                return
            # Session-level lock: CREATE INDEX CONCURRENTLY cannot run in a transaction.
            await conn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK_KEY)
            try:
                await conn.execute(f"DROP INDEX IF EXISTS {building}")
                built = await self._create_ann_index(
                    conn, config.dimension, concurrently=True, name=building
                )
                async with conn.transaction():
                    await conn.execute(f"DROP INDEX IF EXISTS {ANN_INDEX_NAME}")
                    if built:
                        await conn.execute(f"ALTER INDEX {building} RENAME TO {ANN_INDEX_NAME}")
            except BaseException:
                if not conn.is_closed():
                    await conn.execute(f"DROP INDEX IF EXISTS {building}")
                raise
            finally:
                if not conn.is_closed():
                    await conn.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK_KEY)

        await self._run("rebuilding the vector index", body)

    async def _maybe_build_ivfflat(self) -> None:
        """IVFFlat needs rows to train on: build it once there are enough."""
        if self._index_type != "ivfflat" or self._config is None:
            return

        async def missing(conn: Conn) -> bool:
            exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ANN_INDEX_NAME)
            if exists:
                return False
            rows = await conn.fetchval(
                "SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks WHERE embedding IS NOT NULL"
                " LIMIT $1) AS s",
                IVFFLAT_MIN_ROWS,
            )
            return bool(rows >= IVFFLAT_MIN_ROWS)

        if await self._run("checking the vector index", missing):
            await self.rebuild_vector_index()
