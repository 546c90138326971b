"""SQL text the PostgreSQL backend builds at run time: scopes, filters, search statements.

Positional parameters come from :class:`Params`: a clause adds its values and writes
the placeholders ``add`` returns, so a clause is always built for the statement it
goes into (never renumbered afterwards). Everything here returns text and parameters;
nothing runs a statement.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kotonoha_bot.models import Vector

#: The columns of a search hit (c: knowledge_chunks, k: knowledge_sources).
HIT_COLS = (
    "c.id, c.source_id, c.content, c.guild_id, c.channel_id, c.metadata, c.chunk_index,"
    " k.title, k.uri"
)


class Params(list[Any]):
    """The positional parameters of one statement, numbered as they are added."""

    def add(self, value: Any) -> str:
        """Append ``value``; its placeholder (``$n``)."""
        self.append(value)
        return f"${len(self)}"


def filter_sql(wanted: Mapping[str, list[Any]], params: Params) -> str:
    """Metadata filters as JSONB containment (served by the jsonb_path_ops GIN index).

    Containment compares JSON types: 1 matches 1 and 1.0 but not "1" or true.
    Single-valued keys share one containment; a list becomes an OR of containments.
    """
    if not wanted:
        return ""
    clauses: list[str] = []
    equal = {k: v[0] for k, v in wanted.items() if len(v) == 1}
    if equal:
        clauses.append(f"c.metadata @> {params.add(json.dumps(equal, ensure_ascii=False))}::jsonb")
    for key, values in wanted.items():
        if len(values) == 1:
            continue
        alts = [
            f"c.metadata @> {params.add(json.dumps({key: v}, ensure_ascii=False))}::jsonb"
            for v in values
        ]
        clauses.append("(" + " OR ".join(alts) + ")")
    return " AND " + " AND ".join(clauses)


def scope_sql(
    params: Params,
    guild_id: int,
    channel_id: int | None,
    wanted: Mapping[str, list[Any]],
    *,
    vectors: bool = False,
) -> str:
    """The WHERE clause of one guild's (and channel's) chunks; ``vectors``: embedded only."""
    scope = f"c.guild_id = {params.add(guild_id)}"
    if channel_id is not None:
        scope += f" AND c.channel_id = {params.add(channel_id)}"
    if vectors:
        scope += " AND c.embedding IS NOT NULL"
    return scope + filter_sql(wanted, params)


def vector_scope(
    query: Vector, guild_id: int, channel_id: int | None, wanted: Mapping[str, list[Any]]
) -> tuple[str, Params]:
    """WHERE clause and parameters of a vector search ($1 is the query vector)."""
    params = Params([query])
    return scope_sql(params, guild_id, channel_id, wanted, vectors=True), params


def exact_search_sql(scope: str, limit_param: int) -> str:
    """Exact search of a scope: distances for every row, then a top-k sort.

    MATERIALIZED keeps the planner from turning this into an (approximate) index scan.
    """
    return (
        "WITH s AS MATERIALIZED ("
        "  SELECT c.id, c.embedding <=> $1::vector AS dist FROM knowledge_chunks c"
        f"  WHERE {scope})"
        f" SELECT r.dist, {HIT_COLS} FROM"
        f" (SELECT id, dist FROM s ORDER BY dist, id LIMIT ${limit_param}) AS r"
        " JOIN knowledge_chunks c ON c.id = r.id JOIN knowledge_sources k ON k.id = c.source_id"
        " ORDER BY r.dist, r.id"
    )
