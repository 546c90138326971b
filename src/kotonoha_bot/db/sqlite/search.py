"""SQLite search: exact vector search over the in-memory cache, FTS5 keyword search.

A vector search shortlists by the cache's code scores and re-ranks the shortlist by
exact float32 cosine read from the BLOBs (similarities are exact); keyword search
scores FTS5 candidates with the BM25 and coverage rule shared with PostgreSQL
(``kotonoha_bot.text``). Every query names its guild.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import aiosqlite

from kotonoha_bot.db.checks import (
    check_filters,
    check_ids,
    check_top_k,
    check_vector,
)
from kotonoha_bot.db.sqlite.vector_cache import rerank
from kotonoha_bot.models import (
    SearchHit,
    Vector,
)
from kotonoha_bot.text import (
    KeywordPlan,
    bm25_score,
    check_text,
    df_cap,
    keyword_plan,
    query_terms,
)

if TYPE_CHECKING:
    pass
from kotonoha_bot.db.sqlite.connection import SQLiteConnection

#: Keyword candidates scored in a worker thread above this many rows (~50 ms of Python).
KEYWORD_THREAD_ROWS = 1000


def _bm25_rows(plan: KeywordPlan, rows: Iterable[Any]) -> list[tuple[int, float, float]]:
    """(id, BM25, coverage) of (id, search_text) rows, by the shared rule in text.py.

    Term counts come from ``str.count`` on the token string with every separator
    doubled (so adjacent equal tokens are each counted), not from splitting it: at
    thousands of candidate rows that is several times faster and gives the same tf.
    """
    docs = [(int(cid), text) for cid, text in rows]
    lengths = [text.count(" ") + 1 for _, text in docs]
    avg_len = sum(lengths) / max(len(docs), 1)
    needles = [f" {t} " for t in plan.terms]
    scored = []
    for (cid, text), length in zip(docs, lengths, strict=True):
        doubled = " " + text.replace(" ", "  ") + " "
        tf = {t: doubled.count(n) for t, n in zip(plan.terms, needles, strict=True)}
        score, coverage = bm25_score(plan, tf, length, avg_len)
        if score > 0:
            scored.append((cid, score, coverage))
    return scored


def _fts_phrase(token: str) -> str:
    """One keyword token as an FTS5 phrase (quotes doubled), so no token is an operator."""
    return '"' + token.replace('"', '""') + '"'


def _filter_sql(
    wanted: Mapping[str, list[str | int | float | bool]], column: str = "metadata"
) -> tuple[str, list[Any]]:
    """SQL for JSON-type-sensitive equality/IN on top-level metadata keys."""
    clauses: list[str] = []
    params: list[Any] = []
    for key, values in wanted.items():
        path = '$."' + key + '"'
        alts = []
        for v in values:
            if isinstance(v, bool):
                alts.append(f"json_type({column}, ?) = ?")
                params += [path, "true" if v else "false"]
            elif isinstance(v, int | float):
                alts.append(
                    f"(json_type({column}, ?) IN ('integer', 'real')"
                    f" AND json_extract({column}, ?) = ?)"
                )
                params += [path, path, v]
            else:
                alts.append(f"(json_type({column}, ?) = 'text' AND json_extract({column}, ?) = ?)")
                params += [path, path, v]
        clauses.append("(" + " OR ".join(alts) + ")")
    return " AND ".join(clauses), params


class SQLiteSearch(SQLiteConnection):
    """Mixed into :class:`~kotonoha_bot.db.sqlite.database.SQLiteDatabase`."""

    # --- search ---------------------------------------------------------------------

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
        async with self._read("searching knowledge") as conn:
            if self._config is not None:
                # Follow another process's commits first (a finished re-embed changes the
                # dimension): the query is checked against the model the file holds now.
                await self._ensure_cache(conn, self._config)
            config = self._config
            query = check_vector(query_embedding, config.dimension if config else None, "query")
            if config is None:
                return []
            cache = await self._ensure_cache(conn, config)
            allowed: set[int] | None = None
            if wanted:
                clause, params = _filter_sql(wanted)
                sql = (
                    "SELECT id FROM knowledge_chunks WHERE guild_id = ?"
                    + (" AND channel_id = ?" if channel_id is not None else "")
                    + f" AND embedding IS NOT NULL AND {clause}"
                )
                scope = [guild_id] + ([channel_id] if channel_id is not None else [])
                allowed = {r[0] for r in await (await conn.execute(sql, scope + params)).fetchall()}
            shortlist = await asyncio.to_thread(
                cache.shortlist, query, guild_id, channel_id, top_k, allowed
            )
            if shortlist.exact:
                ranked = shortlist.ranked
                rows = await self._hit_rows(conn, [cid for cid, _ in ranked])
            else:
                # One read for the shortlist: its stored vectors for the exact re-rank and
                # the columns of the hits that survive it.
                rows = await self._hit_rows(
                    conn, [cid for cid, _ in shortlist.ranked], with_embedding=True
                )
                ranked = rerank(
                    query, [(cid, r[9]) for cid, r in rows.items() if r[9] is not None], top_k
                )
            if min_similarity is not None:
                ranked = [(cid, s) for cid, s in ranked if s >= min_similarity]
            return self._make_hits(rows, ranked, similarity=True)

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
        terms = query_terms(query)
        if not terms:
            return []
        scope = " AND c.guild_id = ?" + (" AND c.channel_id = ?" if channel_id is not None else "")
        params: list[Any] = [guild_id] + ([channel_id] if channel_id is not None else [])
        if wanted:
            clause, fparams = _filter_sql(wanted, "c.metadata")
            scope += f" AND {clause}"
            params += fparams
        # CROSS JOIN keeps the full-text index first: left to itself the planner walks
        # the guild's rows and probes FTS5 once per row (0.5 s per term at 20k chunks).
        matching = (
            "SELECT c.id, c.search_text FROM knowledge_chunks_fts"
            " CROSS JOIN knowledge_chunks c ON c.id = knowledge_chunks_fts.rowid"
            " WHERE knowledge_chunks_fts MATCH ?" + scope
        )
        async with self._read("keyword search") as conn:
            # The scope's statistics (the same numbers PostgreSQL computes): its chunk
            # count and each term's document frequency, then the shared plan and score.
            count_sql = "SELECT count(*) FROM knowledge_chunks c WHERE 1 = 1" + scope
            row = await (await conn.execute(count_sql, params)).fetchone()
            n_docs = int(row[0]) if row else 0
            df: dict[str, int] = {}
            for term in terms:
                cursor = await conn.execute(
                    f"SELECT count(*) FROM ({matching} LIMIT ?)",
                    [_fts_phrase(term), *params, df_cap(n_docs)],
                )
                row = await cursor.fetchone()
                df[term] = int(row[0]) if row else 0
            plan = keyword_plan(terms, df, n_docs)
            if plan is None:
                return []
            match = " OR ".join(_fts_phrase(t) for t in plan.terms)
            rows = list(await (await conn.execute(matching, [match, *params])).fetchall())
            if len(rows) > KEYWORD_THREAD_ROWS:  # scoring thousands of rows: off the loop
                scored = await asyncio.to_thread(_bm25_rows, plan, rows)
            else:
                scored = _bm25_rows(plan, rows)
            scored.sort(key=lambda x: (-x[1], x[0]))
            scored = scored[:top_k]
            hits = await self._hits(
                conn, [(cid, score) for cid, score, _ in scored], similarity=False
            )
            cover = {cid: cov for cid, _, cov in scored}
            return [dataclasses.replace(h, coverage=cover[h.chunk_id]) for h in hits]

    async def _hits(
        self, conn: aiosqlite.Connection, ranked: list[tuple[int, float]], *, similarity: bool
    ) -> list[SearchHit]:
        rows = await self._hit_rows(conn, [cid for cid, _ in ranked])
        return self._make_hits(rows, ranked, similarity=similarity)

    @staticmethod
    async def _hit_rows(
        conn: aiosqlite.Connection, ids: list[int], *, with_embedding: bool = False
    ) -> dict[int, Sequence[Any]]:
        """The hit columns of these chunks by id (and, last, the stored vector)."""
        if not ids:
            return {}
        rows = await (
            await conn.execute(
                "SELECT c.id, c.source_id, c.content, c.guild_id, c.channel_id, c.metadata,"
                " c.chunk_index, s.title, s.uri"
                + (", c.embedding" if with_embedding else "")
                + " FROM knowledge_chunks c JOIN knowledge_sources s ON s.id = c.source_id"
                f" WHERE c.id IN ({','.join('?' * len(ids))})",
                ids,
            )
        ).fetchall()
        return {int(r[0]): r for r in rows}

    @staticmethod
    def _make_hits(
        by_id: Mapping[int, Sequence[Any]], ranked: list[tuple[int, float]], *, similarity: bool
    ) -> list[SearchHit]:
        hits = []
        for cid, score in ranked:
            r = by_id.get(cid)
            if r is None:
                continue
            hits.append(
                SearchHit(
                    chunk_id=r[0],
                    source_id=r[1],
                    content=r[2],
                    score=score,
                    guild_id=r[3],
                    channel_id=r[4],
                    metadata=json.loads(r[5]),
                    chunk_index=r[6],
                    similarity=score if similarity else None,
                    source_title=r[7],
                    source_uri=r[8],
                )
            )
        return hits
