"""How the PostgreSQL backend searches vectors: exact scan or index, and with what.

The rules below were chosen with ``python -m benchmarks`` (docs/PERFORMANCE.md) on a
2-core host, and each can be overridden by a setting:

- **Exact or index.** An exact scan costs about ``ROW_COST_S + DIM_COST_S x dims`` per
  row (2.6 µs at 1536 dims, 1.2 µs at 384: the rows are inline in the heap,
  ``toast_tuple_target`` keeps them out of TOAST up to ~2000 dims, so this is the tuple
  and the distance, not de-TOASTing). The HNSW index answers a whole-guild top 10 in a
  few milliseconds at any size measured, so a scope is scanned exactly only while that
  stays within ``EXACT_SCAN_BUDGET_S`` (4 ms): about 1,500 rows at 1536 dims, 3,300 at
  384 (``EXACT_SEARCH_MAX_ROWS`` overrides). A *filtered* scope (a channel, a small
  guild: at most ``FILTERED_MAX_SHARE`` of the table) is scanned exactly within
  ``FILTERED_EXACT_SCAN_BUDGET_S`` (about 19,000 rows at 1536 dims): for it the
  iterative index scan walks far through other scopes' rows and loses recall (a 10 %
  channel of 100k x 1536: 0.90 through the index in about the time of the exact scan).
- **ef_search by graph size and width** (``ef_search_for``; ``HNSW_EF_SEARCH`` pins
  it), measured on the benchmark's data (``benchmarks/data.py``, 50 queries, m=24 /
  ef_construction=128 halfvec graph): recall@10 of a whole-guild search by ef_search,
  from ``python -m benchmarks.pg_ef_sweep --n N --dim D`` and ``python -m benchmarks``
  (issue 16, rounds 2, 3 and 5) and ``python -m benchmarks.pg_levers`` (round 5); each
  build of the graph is another random draw:

  ============ ===================================== ==============================
  graph        ef_search: recall@10                  chosen
  ============ ===================================== ==============================
  10k x 1536   64: 0.950, 100: 0.972-0.974           100
  10k x 384    80: 0.946-0.948, 100: 0.958-0.964,     100
               120: 0.970, 160: 0.986-0.988
  100k x 1536  32: 0.994 / 0.896, 40: 0.996 / 0.896, 64 (0.96-1.00)
               64: 1.000 / 0.960, 100: 0.980
               round 5, four more builds:
               32: 0.992 / 0.972 / 0.974 / 0.934,
               40: 0.994 / 0.978 / 0.978 / 0.976,
               48: 0.998 / 0.978 / 0.980 / 0.980,
               64: 1.000 / 0.978 / 1.000 / 1.000
  100k x 384   40: 0.952-0.972, 56: 0.998, 64: 0.996 64
               round 5: 32: 0.990, 40: 0.992,
               48: 0.996, 64: 0.998
  ============ ===================================== ==============================

  Small graphs need more (their neighbours stand out less from the rest), and 384-dim
  vectors of this mixture more than 1536-dim ones for the same recall. The 100k x 1536
  graph differs a lot from build to build: in one, 32 already gave 0.994; in another, 5
  of the 50 queries stayed stuck in the wrong part of the graph up to ef_search 40
  (0.896) — so the chosen value is the one that held in every build measured, not the
  cheapest of one. Round 5 (``python -m benchmarks.pg_levers``, 2026-12-02, load 4-8 on
  2 cores) built the graph four more times (the third with ef_construction 256): 40 and
  48 kept >= 0.97 in all four and 32 fell to 0.934 in one (three queries found none of
  their top 10), and the round-3 build's 0.896 at 40 stands, so 64 stays. A stuck query
  looks like a graph matter (recall stays flat while ef_search grows: 0.978 from 40 to
  64 in one build), and ef_construction 256 did not lower the ef_search needed (0.974 at
  32, 0.980 at 48, 1.000 at 64) while every walk read ~40 % more buffers (1,408 vs 1,010
  at ef_search 32) and the build took 770 s against 377 s for the one before it. m=16
  read fewer buffers (870 at 32) but lost whole queries (three found none of their top
  10 at 32, one still none at 64: 0.914 / 0.944 / 0.968 / 0.972 at 32 / 40 / 48 / 64).
  Widths up to ``NARROW_MAX_DIM`` take the 384 row, wider ones the 1536 row (nothing
  between was measured). Above 300k rows nothing was measured on PostgreSQL (the graph
  outgrows the benchmark's maintenance_work_mem), so ``EF_SEARCH_LARGEST`` is a
  conservative guess. A larger m or ef_construction bought little at 10k x 1536 (m=32:
  0.958 at ef_search 40 for 30 % more index pages read; ef_construction 256: +0.004),
  so the graph keeps m=24/128.
  At 10k x 384 the narrow row takes 100, not the 160 that reached 0.986: a search
  there is mostly the round trip and the graph walk, the walk grows with ef (index and
  heap buffers per search: 3,500 at 100, 4,850 at 160), and 160 left it at 2.2-2.5x our
  SQLite where the issue's bound is 2x; 100 kept recall at 0.958-0.964 in every build
  measured (1.84x our SQLite in one run of ``python -m benchmarks``). A larger m
  bought little there: m=32 at ef 80 reached 0.966-0.970 for 3,640 buffers, for a 12 %
  larger index and a 70 % longer build; m=16 and ef_construction 256 did no better
  than m=24/128; the exact scan stays several times slower than the walk (issue 16,
  round 5: ``python -m benchmarks.pg_ef_sweep --n 10000 --dim 384 --ef 80,100,120,160
  --graphs 24/128,32/128``; docs/PERFORMANCE.md, "Targeted measurements").
- **What is indexed.** ``IndexPlan`` renders the DDL: HNSW (``m``, ``ef_construction``)
  or IVFFlat, over the stored column or, for halfvec precision, over
  ``l2_normalize(embedding)::halfvec(N)`` — half the index's memory, the same recall
  after the exact re-rank — and the matching ORDER BY expression. A binary-quantised
  HNSW (``binary_quantize(embedding)::bit(N)``, ``bit_hamming_ops``) with an exact
  re-rank was measured in round 5 and is not offered: at 100k x 1536 it needed 80
  candidates at ef_search 80 for 0.948 (server 9.9 ms vs 1.8 ms for 0.992 through the
  halfvec graph at ef_search 32), at 100k x 384 1,000 candidates for 0.960 (39 ms).

The stored column stays ``vector`` (float32): similarities are computed from it, so they
are exact, and the transfer tool moves and verifies the vectors bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

IndexType = Literal["hnsw", "ivfflat"]
IndexPrecision = Literal["halfvec", "float32"]

#: pgvector indexes ``vector`` up to 2000 dimensions and ``halfvec`` up to 4000.
VECTOR_INDEX_MAX_DIM = 2000
HALFVEC_INDEX_MAX_DIM = 4000

#: The exact scan's cost per row: fixed (tuple) plus per dimension (fitted to 100k x 1536:
#: 2.6 µs per row, and 10k x 384: 1.2 µs per row, on the benchmark's 2-core host).
ROW_COST_S = 0.73e-6
DIM_COST_S = 1.23e-9
#: Scopes whose exact scan stays within this are scanned exactly.
EXACT_SCAN_BUDGET_S = 0.004
#: Scopes holding at most this share of the table are "filtered": exact within the next.
FILTERED_MAX_SHARE = 0.25
FILTERED_EXACT_SCAN_BUDGET_S = 0.05

#: (largest graph size, ef_search): the HNSW candidate list by vectors in the index,
#: for wide (1536-dim) and narrow (384-dim) embeddings; see the module docstring. Since
#: issue 16 round 5 the two hold the same values (narrow 10k graphs took 160 before); they
#: stay apart because they were measured apart and a later measurement may part them.
EF_SEARCH_BY_ROWS: tuple[tuple[int, int], ...] = ((30_000, 100), (300_000, 64))
EF_SEARCH_BY_ROWS_NARROW: tuple[tuple[int, int], ...] = ((30_000, 100), (300_000, 64))
EF_SEARCH_LARGEST = 100
#: Embeddings up to this width use the narrow table (the geometric middle of 384, 1536).
NARROW_MAX_DIM = 768
#: pgvector's largest hnsw.ef_search: a search never asks for more (with the iterative
#: scan the index still returns every candidate wanted beyond it).
HNSW_EF_SEARCH_MAX = 1000

#: Candidates taken from a halfvec index per result, before the exact re-sort (rounded
#: up). halfvec rounding moves a cosine by ~1e-5 while the 10th and 11th neighbours of
#: the benchmark's queries lie 2e-3 apart (median; 1e-5 at the closest): at 100k x 1536
#: and x 384 the halfvec top 10 already held the exact top 10 in all 200 queries, and
#: through the index 10, 15 and 20 candidates gave the same recall at every ef_search
#: measured (issue 16 round 5, ``python -m benchmarks.pg_levers``). 1.5 keeps a margin
#: for vectors closer than that; 2 read ~30 more buffers a search for nothing.
HALFVEC_OVERFETCH = 1.5


def exact_max_rows(dimension: int, setting: int | None = None) -> int:
    """Largest unfiltered scope searched exactly (``EXACT_SEARCH_MAX_ROWS`` when set)."""
    if setting is not None:
        return setting
    return int(EXACT_SCAN_BUDGET_S / _row_cost(dimension))


def _row_cost(dimension: int) -> float:
    return ROW_COST_S + DIM_COST_S * max(dimension, 1)


def filtered_exact_max_rows(dimension: int, setting: int | None = None) -> int:
    """Largest filtered scope searched exactly (``EXACT_SEARCH_MAX_ROWS`` when set)."""
    if setting is not None:
        return setting
    return int(FILTERED_EXACT_SCAN_BUDGET_S / _row_cost(dimension))


def use_exact(scope_rows: int, table_rows: int, dimension: int, setting: int | None = None) -> bool:
    """True when a scope of ``scope_rows`` (of ``table_rows``) is scanned exactly."""
    if scope_rows <= exact_max_rows(dimension, setting):
        return True
    filtered = scope_rows <= FILTERED_MAX_SHARE * max(table_rows, scope_rows)
    return filtered and scope_rows <= filtered_exact_max_rows(dimension, setting)


def ef_search_for(index_rows: int, setting: int | None = None, dimension: int | None = None) -> int:
    """The HNSW ef_search for a graph of ``index_rows`` vectors of ``dimension`` (unknown:
    the wide table); ``HNSW_EF_SEARCH`` pins it."""
    if setting is not None:
        return setting
    narrow = dimension is not None and dimension <= NARROW_MAX_DIM
    for rows, ef in EF_SEARCH_BY_ROWS_NARROW if narrow else EF_SEARCH_BY_ROWS:
        if index_rows <= rows:
            return ef
    return EF_SEARCH_LARGEST


@dataclass(frozen=True)
class IndexPlan:
    """The approximate index: its kind, precision and build parameters, and its SQL."""

    index_type: IndexType
    precision: IndexPrecision
    dimension: int
    m: int = 24
    ef_construction: int = 128
    lists: int = 100

    @classmethod
    def for_dimension(
        cls,
        dimension: int,
        index_type: IndexType,
        precision: IndexPrecision,
        *,
        m: int = 24,
        ef_construction: int = 128,
        lists: int = 100,
    ) -> IndexPlan:
        """Above 2000 dimensions only a halfvec index exists, whatever the setting."""
        if dimension > VECTOR_INDEX_MAX_DIM:
            precision = "halfvec"
        return cls(index_type, precision, dimension, m, ef_construction, lists)

    @property
    def halfvec(self) -> bool:
        return self.precision == "halfvec"

    def key_sql(self, column: str = "embedding") -> str:
        """The indexed expression; queries must order by exactly this to use the index.

        halfvec: normalising first keeps every component inside halfvec's range (cosine
        distance ignores length anyway).
        """
        if self.halfvec:
            return f"(l2_normalize({column})::halfvec({int(self.dimension)}))"
        return column

    def query_sql(self, param: str) -> str:
        """The query side of the indexed ``<=>`` for a vector parameter."""
        if self.halfvec:
            return f"(l2_normalize({param}::vector)::halfvec({int(self.dimension)}))"
        return f"{param}::vector"

    def candidates(self, top_k: int) -> int:
        """Rows taken from the index before the exact re-sort."""
        return math.ceil(top_k * HALFVEC_OVERFETCH) if self.halfvec else top_k

    def ddl(self, name: str, *, concurrently: bool = False, lists: int | None = None) -> str:
        """CREATE INDEX for this plan on knowledge_chunks."""
        ops = "halfvec_cosine_ops" if self.halfvec else "vector_cosine_ops"
        conc = "CONCURRENTLY " if concurrently else ""
        if self.index_type == "hnsw":
            options = f"m = {int(self.m)}, ef_construction = {int(self.ef_construction)}"
        else:
            options = f"lists = {int(lists if lists is not None else self.lists)}"
        return (
            f"CREATE INDEX {conc}{name} ON knowledge_chunks USING {self.index_type}"
            f" ({self.key_sql()} {ops}) WITH ({options})"
        )

    @staticmethod
    def precision_of(indexdef: str | None) -> IndexPrecision | None:
        """The precision of an existing index from its definition (``pg_get_indexdef``)."""
        if not indexdef:
            return None
        return "halfvec" if "halfvec" in indexdef else "float32"
