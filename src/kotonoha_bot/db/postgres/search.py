"""PostgreSQL search: exact or approximate (pgvector) vector search, full-text keyword search.

The plan (``search_plan.py``) chooses exact search for small scopes and the ANN index
otherwise, with candidates re-sorted by exact float32 distance; statements are built
by ``sql.py``. Keyword search scores GIN-indexed candidates by the BM25 and coverage
rule shared with SQLite (``kotonoha_bot.text``). Every query names its guild.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kotonoha_bot.db.checks import (
    check_filters,
    check_ids,
    check_top_k,
    check_vector,
)
from kotonoha_bot.db.postgres.connection import (
    SCOPE_SIZE_CACHE_MAX,
    SCOPE_SIZE_TTL_SECONDS,
    Conn,
    PostgresConnection,
)
from kotonoha_bot.db.postgres.schema import (
    ANN_INDEX_NAME,
)
from kotonoha_bot.db.postgres.search_plan import (
    IndexPlan,
    exact_max_rows,
    filtered_exact_max_rows,
    use_exact,
)
from kotonoha_bot.db.postgres.sql import HIT_COLS, Params, exact_search_sql, scope_sql, vector_scope
from kotonoha_bot.db.tables import canonical_json
from kotonoha_bot.errors import (
    DatabaseError,
    DimensionMismatchError,
)
from kotonoha_bot.models import (
    EmbeddingConfig,
    SearchHit,
    Vector,
)
from kotonoha_bot.text import (
    BM25_B,
    BM25_K1,
    check_text,
    df_cap,
    keyword_plan,
    query_terms,
)

if TYPE_CHECKING:
    pass


def _tsquery_lexeme(token: str) -> str:
    return "'" + token.replace("\\", "\\\\").replace("'", "''") + "'"


def _hit(r: Any, score: float, *, similarity: bool) -> SearchHit:
    return SearchHit(
        chunk_id=r["id"],
        source_id=r["source_id"],
        content=r["content"],
        score=score,
        guild_id=r["guild_id"],
        channel_id=r["channel_id"],
        metadata=json.loads(r["metadata"]),
        chunk_index=r["chunk_index"],
        similarity=score if similarity else None,
        source_title=r["title"],
        source_uri=r["uri"],
    )


class PostgresSearch(PostgresConnection):
    """Mixed into :class:`~kotonoha_bot.db.postgres.database.PostgreSQLDatabase`."""

    # --- search ---------------------------------------------------------------

    async def similarity_search(
        self,
        query_embedding: Sequence[float] | Vector,
        *,
        guild_id: int,
        channel_id: int | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
        min_similarity: float | None = None,
    ) -> list[SearchHit]:
        check_ids("similarity_search", guild_id, channel_id)
        check_top_k(top_k)
        wanted = check_filters(filters)
        for attempt in (1, 2):
            if self._config is None:
                self._config = await self._run(
                    "reading the embedding configuration", self._read_config
                )
            config = self._config
            try:
                query = check_vector(query_embedding, config.dimension if config else None, "query")
            except DimensionMismatchError:
                # The cached model may be stale (another process finished a re-embed):
                # read it again once before refusing the query.
                if attempt == 2 or config is None:
                    raise
                self._config = None
                continue
            if config is None:
                return []
            try:
                rows = await self._search_rows(config, query, guild_id, channel_id, top_k, wanted)
                break
            except DatabaseError:
                # Another process may have switched models (finish_reembed). The recorded
                # config, not the driver's wording, decides: when it changed, the query is
                # checked against it again (a query of the old size is then a typed
                # DimensionMismatchError); when it did not, the error stands.
                fresh = await self._run("reading the embedding configuration", self._read_config)
                if attempt == 2 or fresh == config:
                    raise
                self._config = fresh
        hits = [_hit(r, 1.0 - float(r["dist"]), similarity=True) for r in rows]
        if min_similarity is not None:
            hits = [h for h in hits if h.score >= min_similarity]
        return hits

    async def _search_rows(
        self,
        config: EmbeddingConfig,
        query: Vector,
        guild_id: int,
        channel_id: int | None,
        top_k: int,
        wanted: Mapping[str, list[Any]],
    ) -> list[Any]:
        scope, params = vector_scope(query, guild_id, channel_id, wanted)
        # The count takes the same scope without the query vector: built again with its
        # own parameters (never renumbered).
        count_params = Params()
        count_scope = scope_sql(count_params, guild_id, channel_id, wanted, vectors=True)
        size_key = (guild_id, channel_id, canonical_json(wanted))
        setting = self._settings.exact_search_max_rows
        dim = config.dimension
        # Counted up to the larger (filtered) threshold; which one applies is decided below.
        bound = max(filtered_exact_max_rows(dim, setting), exact_max_rows(dim, setting), top_k)
        limit_ref = count_params.add(bound + 1)
        index_ref = count_params.add(ANN_INDEX_NAME)

        async def body(conn: Conn) -> list[Any]:
            conn.session_untouched()  # SELECTs and SET LOCAL only
            size = self._cached_scope_size(size_key, bound)
            if size is None:
                # The index's definition and the table's size ride along: searches follow
                # the index that exists, and ef_search follows the graph's size.
                row = await conn.fetchrow(
                    "SELECT (SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks c WHERE"
                    f" {count_scope} LIMIT {limit_ref}) AS s) AS size,"
                    " (SELECT reltuples FROM pg_class"
                    "  WHERE oid = 'knowledge_chunks'::regclass) AS table_rows,"
                    f" pg_get_indexdef(to_regclass({index_ref})) AS indexdef",
                    *count_params,
                )
                size = int(row["size"])
                await self._follow_table_size(max(int(row["table_rows"] or 0), size))
                self._live_precision = IndexPlan.precision_of(row["indexdef"])
                self._remember_scope_size(size_key, bound, size)
            if size == 0:
                return []
            if size > top_k and not use_exact(size, self._table_rows, dim, setting):
                guc, sql, limit = self.ann_statements(config.dimension, scope, len(params), top_k)
                if self._needs_local_settings(limit, conn.ef_search):
                    self.search_counts["approximate_set_local"] += 1
                    async with conn.transaction(readonly=True):
                        await conn.execute(guc)
                        rows = list(await conn.fetch(sql, *params, limit, top_k))
                else:
                    rows = list(await conn.fetch(sql, *params, limit, top_k))
                if len(rows) >= top_k:
                    self.search_counts["approximate"] += 1
                    return rows
                self.search_counts["exact_fallback"] += 1
            else:
                self.search_counts["exact"] += 1
            return list(await conn.fetch(exact_search_sql(scope, len(params) + 1), *params, top_k))

        return await self._run("searching knowledge", body, read_replica=True)

    def _needs_local_settings(self, limit: int, connection_ef: int | None = -1) -> bool:
        """True when the connection defaults do not fit this search (SET LOCAL needed).

        ``connection_ef`` is the ef_search the search's connection was opened with
        (``SearchConnection.ef_search``; None: unknown); left out, the pools' current
        default.
        """
        if self._pgvector_version < (0, 8):
            return True  # no iterative scan: the connection defaults mean nothing
        if self._index_type != "hnsw":
            return False
        if connection_ef == -1:
            connection_ef = self._default_ef_search()
        return self._ef_search(limit) != connection_ef

    def _live_plan(self, dimension: int) -> IndexPlan:
        """The plan of the index searches should use: the existing one, else the configured."""
        return IndexPlan.for_dimension(
            dimension, self._index_type, self._live_precision or self._index_precision
        )

    def ann_statements(
        self, dimension: int, scope: str, n_params: int, top_k: int
    ) -> tuple[str, str, int]:
        """The approximate search: (SET LOCAL settings, SELECT, inner limit).

        The SELECT takes the scope's parameters, then the inner limit and ``top_k``.
        It runs an iterative index scan (pgvector 0.8, relaxed order) and re-sorts the
        candidates by exact float32 distance; a halfvec index yields
        ``HALFVEC_OVERFETCH`` times more candidates for that re-sort.
        """
        plan = self._live_plan(dimension)
        limit = plan.candidates(top_k)
        settings = self._settings
        if self._index_type == "hnsw":
            guc = [f"SET LOCAL hnsw.ef_search = {self._ef_search(limit)}"]
            if self._pgvector_version >= (0, 8):
                guc.append("SET LOCAL hnsw.iterative_scan = relaxed_order")
        else:
            guc = [f"SET LOCAL ivfflat.probes = {int(settings.ivfflat_probes)}"]
            if self._pgvector_version >= (0, 8):
                guc.append("SET LOCAL ivfflat.iterative_scan = relaxed_order")
        order = f"{plan.key_sql('c.embedding')} <=> {plan.query_sql('$1')}"
        sql = (
            f"SELECT r.dist, {HIT_COLS} FROM ("
            "  SELECT c.id, c.embedding <=> $1::vector AS dist FROM knowledge_chunks c"
            f"  WHERE {scope}"
            f"  ORDER BY {order}"
            f"  LIMIT ${n_params + 1}"
            ") AS r JOIN knowledge_chunks c ON c.id = r.id"
            " JOIN knowledge_sources k ON k.id = c.source_id"
            f" ORDER BY r.dist, r.id LIMIT ${n_params + 2}"
        )
        return "; ".join(guc), sql, limit

    def _cached_scope_size(self, key: tuple[Any, ...], bound: int) -> int | None:
        """The scope's row count, capped at ``bound + 1``, if counted recently."""
        entry = self._scope_sizes.get(key)
        if entry is None or time.monotonic() - entry[0] > SCOPE_SIZE_TTL_SECONDS:
            return None
        _, size, counted_bound = entry
        if size > counted_bound and bound > counted_bound:
            return None  # "more than the old cap" says nothing about a higher cap
        return min(size, bound + 1)

    def _remember_scope_size(self, key: tuple[Any, ...], bound: int, size: int) -> None:
        if len(self._scope_sizes) >= SCOPE_SIZE_CACHE_MAX:
            self._scope_sizes.clear()
        self._scope_sizes[key] = (time.monotonic(), size, bound)

    async def keyword_search(
        self,
        query: str,
        *,
        guild_id: int,
        channel_id: int | None = None,
        top_k: int = 10,
        filters: Mapping[str, Any] | None = None,
    ) -> list[SearchHit]:
        check_ids("keyword_search", guild_id, channel_id)
        check_top_k(top_k)
        check_text(query, "keyword query")
        wanted = check_filters(filters)
        terms = [t for t in query_terms(query) if len(t.encode("utf-8")) < 2048]
        if not terms:
            return []
        params = Params()
        scope = scope_sql(params, guild_id, channel_id, wanted)
        n = len(params)
        # The scope's statistics (the same numbers SQLite computes): its chunk count and
        # each term's document frequency (GIN index), then the shared plan in Python.
        # One count per term, each with its own tsquery parameter and stopping at the
        # shared cap (text.df_cap). Each must be a GIN index scan: left to itself the
        # planner seq-scans for a common term, computing every row's tsvector (0.4 s
        # per term at 20k chunks), hence enable_seqscan off for these statements.
        count_sql = f"SELECT count(*) FROM knowledge_chunks c WHERE {scope}"
        counts = ", ".join(
            f"(SELECT count(*) FROM (SELECT 1 FROM knowledge_chunks c WHERE {scope}"
            f" AND kotonoha_tsvector(c.search_text) @@ ${n + 2 + i}::tsquery"
            f" LIMIT ${n + 1}) AS m)"
            for i in range(len(terms))
        )
        stats_sql = f"SELECT ARRAY[{counts}]::bigint[] AS df"
        # BM25 with the plan's IDF weights (k1, b from kotonoha_bot.text), and coverage:
        # the weighted share of the plan's terms a chunk holds.
        score_sql = (
            "WITH hits AS MATERIALIZED ("
            "  SELECT c.id, string_to_array(c.search_text, ' ') AS toks FROM knowledge_chunks c"
            f"  WHERE {scope} AND kotonoha_tsvector(c.search_text) @@ ${n + 1}::tsquery),"
            " avgdl AS (SELECT greatest(avg(greatest(cardinality(toks), 1)), 1)::float8 AS v"
            "           FROM hits),"
            " tf AS (SELECT h.id, q.w,"
            "        cardinality(array_positions(h.toks, q.tok))::float8 AS tf,"
            "        greatest(cardinality(h.toks), 1)::float8 AS dl"
            f"        FROM hits h CROSS JOIN unnest(${n + 2}::text[], ${n + 3}::float8[])"
            "        AS q(tok, w)),"
            " ranked AS (SELECT tf.id,"
            f"   sum(tf.w * tf.tf * ${n + 4}::float8 / (tf.tf + ${n + 5}::float8"
            f"       * (1.0::float8 - ${n + 6}::float8 + ${n + 6}::float8 * tf.dl / avgdl.v)))"
            "     AS score,"
            f"   sum(CASE WHEN tf.tf > 0 THEN tf.w ELSE 0 END) / ${n + 7}::float8 AS coverage"
            "   FROM tf CROSS JOIN avgdl GROUP BY tf.id HAVING sum(tf.tf) > 0"
            f"   ORDER BY score DESC, tf.id LIMIT ${n + 8})"
            f" SELECT r.score, r.coverage, {HIT_COLS} FROM ranked r"
            " JOIN knowledge_chunks c ON c.id = r.id"
            " JOIN knowledge_sources k ON k.id = c.source_id ORDER BY r.score DESC, r.id"
        )

        async def body(conn: Conn) -> list[Any]:
            conn.session_untouched()  # SELECTs and SET LOCAL only
            lexemes = [_tsquery_lexeme(t) for t in terms]
            async with conn.transaction(readonly=True):
                await conn.execute("SET LOCAL enable_seqscan = off")
                n_docs = int(await conn.fetchval(count_sql, *params))
                stats = await conn.fetchrow(stats_sql, *params, df_cap(n_docs), *lexemes)
                df = dict(zip(terms, (int(x) for x in stats["df"]), strict=True))
                plan = keyword_plan(terms, df, n_docs)
                if plan is None:
                    return []
                tsquery = " | ".join(_tsquery_lexeme(t) for t in plan.terms)
                return list(
                    await conn.fetch(
                        score_sql,
                        *params,
                        tsquery,
                        list(plan.terms),
                        list(plan.weights),
                        BM25_K1 + 1.0,
                        BM25_K1,
                        BM25_B,
                        plan.total_weight,
                        top_k,
                    )
                )

        rows = await self._run("keyword search", body, read_replica=True)
        return [
            dataclasses.replace(
                _hit(r, max(float(r["score"]), 1e-9), similarity=False),
                coverage=float(r["coverage"]),
            )
            for r in rows
        ]
