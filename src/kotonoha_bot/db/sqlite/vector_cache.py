"""The SQLite backend's in-memory vector cache: compact codes per scope, kept in step with writes.

What a search costs is reading the scope's vectors from memory once, so the cache holds
as few bytes per chunk as ranking needs and the exact float32 vectors stay where they
are, in the database. Four codecs (``SQLITE_VECTOR_CACHE``, chosen by the benchmark in
docs/PERFORMANCE.md; their code is in ``vector_codecs.py``):

- ``int4`` (default): 4 bits per dimension, two per byte (an eighth of float32), from a
  per-dimension quantiser learnt from the data (each dimension's mean and spread).
  With the 8-byte chunk id a row costs ``dims / 2 + 8`` bytes: 776 at 1536 dimensions,
  200 at 384 (the float32 cache took 6,152 and 1,544).
- ``int8``: the same quantiser with 8 bits (``dims + 8`` bytes a row).
- ``binary``: one sign bit per dimension (1/32 of float32); ranks well enough only for
  wide embeddings (1024+ dimensions), so it needs a larger candidate set.
- ``float32``: the normalised vectors themselves (the first cache; scores are final).

For the compact codecs a search is a *shortlist*: the best ``candidate_count(top_k)``
rows by code score (ties at the boundary kept), which the backend then re-ranks by
exact float32 cosine read from the stored BLOBs, so callers always get exact
similarities. The quantisers need data to learn from: below ``FIT_ROWS`` vectors the
cache holds float32 (exact, a few MiB at most). Rows live in one contiguous bucket per
(guild, channel) scope, so a channel search reads only that channel's rows and a guild
search reads only its own buckets: cost in proportion to the scope. No Python object is
kept per row (ids and codes are numpy arrays), so the memory accounting in ``nbytes`` is
close to what the process really holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kotonoha_bot.db.sqlite.vector_codecs import (
    CACHE_KINDS,
    CODECS,
    DEFAULT_CACHE_KIND,
    F32,
    F64,
    CacheKind,
    Codec,
    Float32Codec,
    IntArray,
)
from kotonoha_bot.models import Vector

__all__ = [
    "CACHE_KINDS",
    "DEFAULT_CACHE_KIND",
    "CacheKind",
    "Shortlist",
    "VectorCache",
    "candidate_count",
    "rerank",
]


#: Candidates re-ranked exactly, per result asked for (and at least this many). Chosen by
#: the benchmark: int8 finds the true top 10 within its top 20 on every query measured
#: (1536 and 384 dims), so 4x leaves headroom; sign bits need far more.
RERANK_FACTOR: dict[CacheKind, int] = {"int4": 20, "int8": 4, "binary": 20, "float32": 1}
RERANK_MIN: dict[CacheKind, int] = {"int4": 200, "int8": 40, "binary": 200, "float32": 0}
#: Quantised codecs shortlist every row whose code score is within this many standard
#: deviations of the score error (times sqrt 2: the k-th row errs too) of the k-th best.
MARGIN_SIGMAS = 3.0 * float(np.sqrt(2.0))
#: A quantiser that learns from the data is fitted once the cache holds this many
#: vectors (float32 until then), on at most FIT_SAMPLE_MAX of them.
FIT_ROWS = 2048
FIT_SAMPLE_MAX = 16_384
#: A shortlist keeps at most this many rows tied at its boundary (lowest ids first), so
#: its read stays far below SQLite's limit of bound parameters.
SHORTLIST_MAX = 4096
#: Buckets grow by this factor (at least _MIN_CAPACITY rows) when full.
_GROWTH = 1.25
_MIN_CAPACITY = 16

#: A scan of at least this many rows is split over two threads (the kernels release the
#: GIL; on 2 cores a 100k x 1536 int8 scan goes from ~5.0 to ~3.8 ms). float32 scans
#: use BLAS, which has threads of its own.
PARALLEL_MIN_ROWS = 50_000
_SCAN_THREADS = min(2, os.cpu_count() or 1)
_scan_pool: ThreadPoolExecutor | None = None

ScopeKey = tuple[int, int | None]


def candidate_count(kind: CacheKind, top_k: int) -> int:
    """How many rows a shortlist of this codec holds for ``top_k`` results."""
    return max(RERANK_FACTOR[kind] * top_k, RERANK_MIN[kind], top_k)


@dataclass(frozen=True)
class Shortlist:
    """Best rows of a scope: (chunk_id, score) best first; ``exact`` when scores are final."""

    ranked: list[tuple[int, float]]
    exact: bool


@dataclass
class _Bucket:
    """The rows of one (guild, channel) scope, contiguous: codes and chunk ids."""

    codes: npt.NDArray[np.generic]
    ids: IntArray
    size: int = 0

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.ids.nbytes)


@dataclass
class _Guild:
    buckets: dict[int | None, _Bucket] = field(default_factory=dict)


class VectorCache:
    """Encoded unit vectors by chunk id, bucketed by (guild, channel).

    A quantiser that learns from the data (``int4``, ``int8``) needs data first: until
    the cache holds ``FIT_ROWS`` vectors it keeps them as float32 (exact scores, at most
    ``FIT_ROWS`` x dims x 4 bytes), then fits on them (with the batch that crossed the
    line) and re-encodes every bucket. The parameters stay for the cache's life; the
    backend rebuilds the cache, and so refits, whenever it reloads (start-up, another
    process's write, a re-embed).
    """

    def __init__(self, dimension: int, kind: CacheKind = DEFAULT_CACHE_KIND) -> None:
        self.dimension = dimension
        self.kind: CacheKind = kind
        target = CODECS[kind](dimension)
        self._target: Codec | None = None if target.fitted else target
        self._codec: Codec = target if target.fitted else Float32Codec(dimension)
        self._guilds: dict[int, _Guild] = {}
        #: Rows announced by ``reserve`` for scopes whose buckets do not exist yet.
        self._reserved: dict[ScopeKey, int] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by every bucket's codes and ids (allocated capacity) and the codec."""
        rows = sum(b.nbytes for g in self._guilds.values() for b in g.buckets.values())
        return rows + self._codec.nbytes

    @property
    def exact(self) -> bool:
        """True when scores are final (float32); otherwise shortlists are re-ranked."""
        return self._codec.kind == "float32"

    @property
    def encoding(self) -> CacheKind:
        """What the cache holds now (float32 while a quantiser waits for ``FIT_ROWS``)."""
        return self._codec.kind

    # --- writes -----------------------------------------------------------------------

    def _new_bucket(self, capacity: int) -> _Bucket:
        capacity = max(capacity, _MIN_CAPACITY)
        codec = self._codec
        return _Bucket(
            codes=np.zeros((capacity, codec.width), dtype=codec.dtype),
            ids=np.zeros(capacity, dtype=np.int64),
        )

    def reserve(self, guild_id: int, channel_id: int | None, rows: int) -> None:
        """Announce ``rows`` more rows for a scope (loading knows the counts): no slack."""
        bucket = self._guilds.get(guild_id, _Guild()).buckets.get(channel_id)
        if bucket is None:
            key = (guild_id, channel_id)
            self._reserved[key] = self._reserved.get(key, 0) + rows
        elif bucket.size + rows > bucket.capacity and not self._staging:
            self._resize(bucket, bucket.size + rows)

    @property
    def _staging(self) -> bool:
        return self._target is not None

    def _resize(self, bucket: _Bucket, capacity: int) -> None:
        new = self._new_bucket(capacity)
        n = bucket.size
        new.codes[:n] = bucket.codes[:n]
        new.ids[:n] = bucket.ids[:n]
        bucket.codes, bucket.ids = new.codes, new.ids

    def _room(self, key: ScopeKey, need: int) -> int:
        """Capacity for a new bucket: the reservation once encoded, only ``need`` staging."""
        if self._staging:
            return need
        return max(need, self._reserved.pop(key, 0))

    def put(self, chunk_id: int, guild_id: int, channel_id: int | None, vector: Vector) -> None:
        """Insert or replace one vector."""
        self.put_many(
            np.array([chunk_id], dtype=np.int64),
            np.array([guild_id], dtype=np.int64),
            [channel_id],
            np.asarray(vector, dtype=np.float32)[None, :],
        )

    def put_many(
        self,
        chunk_ids: IntArray,
        guild_ids: IntArray,
        channel_ids: Sequence[int | None],
        vectors: F32,
        *,
        new: bool = False,
    ) -> None:
        """Insert or replace vectors (``new=True``: the ids are known to be absent)."""
        if len(chunk_ids) == 0:
            return
        if not new:
            self.remove_many(chunk_ids.tolist())
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = (vectors / norms).astype(np.float32, copy=False)
        if self._staging and self._count + len(chunk_ids) >= FIT_ROWS:
            self._fit(unit)
        codes = self._codec.encode(unit)
        groups: dict[ScopeKey, list[int]] = {}
        for row, key in enumerate(zip(guild_ids.tolist(), channel_ids, strict=True)):
            groups.setdefault(key, []).append(row)
        for (gid, ch), rows in groups.items():
            guild = self._guilds.setdefault(gid, _Guild())
            bucket = guild.buckets.get(ch)
            if bucket is None:
                bucket = guild.buckets[ch] = self._new_bucket(self._room((gid, ch), len(rows)))
            start = bucket.size
            if start + len(rows) > bucket.capacity:
                self._resize(bucket, max(start + len(rows), int(bucket.capacity * _GROWTH)))
            idx = np.asarray(rows, dtype=np.int64)
            stop = start + len(rows)
            bucket.codes[start:stop] = codes[idx]
            bucket.ids[start:stop] = chunk_ids[idx]
            bucket.size = stop
            self._count += len(rows)

    def _fit(self, incoming: F32) -> None:
        """Fit the quantiser on the staged float32 rows and ``incoming``; re-encode all."""
        target = self._target
        assert target is not None
        staged = [b.codes[: b.size] for g in self._guilds.values() for b in g.buckets.values()]
        sample = np.concatenate([*staged, incoming]) if staged else incoming
        if sample.shape[0] > FIT_SAMPLE_MAX:  # an even spread over the rows is enough
            sample = sample[:: -(-sample.shape[0] // FIT_SAMPLE_MAX)]
        target.fit(np.asarray(sample, dtype=np.float32))
        self._codec, self._target = target, None
        for gid, guild in self._guilds.items():
            for ch, bucket in guild.buckets.items():
                n = bucket.size
                encoded = self._new_bucket(self._room((gid, ch), n))
                encoded.codes[:n] = target.encode(np.asarray(bucket.codes[:n], np.float32))
                encoded.ids[:n] = bucket.ids[:n]
                bucket.codes, bucket.ids = encoded.codes, encoded.ids

    def remove_many(self, chunk_ids: Iterable[int]) -> None:
        """Forget vectors (absent ids are ignored); buckets keep their order."""
        wanted = np.unique(np.fromiter(chunk_ids, dtype=np.int64))
        if wanted.size == 0 or self._count == 0:
            return
        for gid in list(self._guilds):
            guild = self._guilds[gid]
            for ch in list(guild.buckets):
                bucket = guild.buckets[ch]
                n = bucket.size
                hit = np.isin(bucket.ids[:n], wanted, assume_unique=True)
                if not hit.any():
                    continue
                keep = np.flatnonzero(~hit)
                m = keep.size
                bucket.codes[:m] = bucket.codes[keep]
                bucket.ids[:m] = bucket.ids[keep]
                bucket.size = m
                self._count -= n - m
                if m == 0:
                    del guild.buckets[ch]
                elif bucket.capacity > 4 * max(m, _MIN_CAPACITY):
                    self._resize(bucket, m)  # give memory back after a large delete
            if not guild.buckets:
                del self._guilds[gid]

    def remove(self, chunk_id: int) -> None:
        """Forget one vector (no-op when absent)."""
        self.remove_many([chunk_id])

    # --- reads ------------------------------------------------------------------------

    def _buckets(self, guild_id: int, channel_id: int | None) -> list[_Bucket]:
        guild = self._guilds.get(guild_id)
        if guild is None:
            return []
        if channel_id is None:
            return list(guild.buckets.values())
        bucket = guild.buckets.get(channel_id)
        return [] if bucket is None else [bucket]

    def candidates(self, guild_id: int, channel_id: int | None) -> int:
        """How many rows a search in this scope would rank."""
        return sum(b.size for b in self._buckets(guild_id, channel_id))

    def shortlist(
        self,
        query: Vector,
        guild_id: int,
        channel_id: int | None,
        top_k: int,
        allowed_ids: set[int] | None = None,
    ) -> Shortlist:
        """The scope's best rows by code score, best first (ties by chunk id).

        Exact (float32): the top ``top_k`` with their cosine similarity. Otherwise the
        top ``candidate_count(kind, top_k)`` (with every row tied at the boundary) for
        the caller to re-rank by exact cosine.
        """
        buckets = self._buckets(guild_id, channel_id)
        exact = self.exact
        if not buckets:
            return Shortlist([], exact)
        unit = (query / float(np.linalg.norm(query))).astype(np.float32, copy=False)
        q, noise = self._codec.prepare(unit)
        allowed = None
        if allowed_ids is not None:
            allowed = np.fromiter(allowed_ids, dtype=np.int64, count=len(allowed_ids))
            allowed.sort()
        parts: list[npt.NDArray[np.generic]] = []
        id_parts: list[IntArray] = []
        for b in buckets:
            n = b.size
            codes, ids = b.codes[:n], b.ids[:n]
            if allowed is not None:
                rows = np.flatnonzero(np.isin(ids, allowed, assume_unique=True))
                if rows.size == 0:
                    continue
                codes, ids = codes[rows], ids[rows]
            parts.append(codes)
            id_parts.append(ids)
        if not parts:
            return Shortlist([], exact)
        scores = self._scan(parts, q)
        ids = id_parts[0] if len(id_parts) == 1 else np.concatenate(id_parts)
        if exact:
            return Shortlist(_top(scores, ids, top_k, keep_ties=False), True)
        cap = candidate_count(self.kind, top_k)
        if noise is None:
            return Shortlist(_top(scores, ids, cap, keep_ties=True), False)
        return Shortlist(_within(scores, ids, top_k, MARGIN_SIGMAS * noise, cap), False)

    def _scan(self, parts: list[npt.NDArray[np.generic]], q: npt.NDArray[np.generic]) -> F64:
        """The scores of every part's rows, in order, in one array.

        Each part is one kernel call writing into its slice of the result (no per-part
        arrays to join). A large scan is shared with a second thread (the kernels release
        the GIL): parts are cut so both get about half of the rows.
        """
        codec = self._codec
        total = sum(codes.shape[0] for codes in parts)
        out = np.empty(total, dtype=np.float64)
        tasks: list[tuple[npt.NDArray[np.generic], F64]] = []
        start = 0
        for codes in parts:
            n = codes.shape[0]
            tasks.append((codes, out[start : start + n]))
            start += n
        if total < PARALLEL_MIN_ROWS or _SCAN_THREADS < 2 or self.exact:
            for codes, dest in tasks:
                codec.score(codes, q, dest)
            return out
        global _scan_pool
        if _scan_pool is None:
            _scan_pool = ThreadPoolExecutor(1, thread_name_prefix="kotonoha-scan")
        mine, theirs = _halves(tasks, total)

        def score_all(part: list[tuple[npt.NDArray[np.generic], F64]]) -> None:
            for codes, dest in part:
                codec.score(codes, q, dest)

        later = _scan_pool.submit(score_all, theirs)
        score_all(mine)
        later.result()
        return out


def _halves(
    tasks: list[tuple[npt.NDArray[np.generic], F64]], total: int
) -> tuple[list[tuple[npt.NDArray[np.generic], F64]], list[tuple[npt.NDArray[np.generic], F64]]]:
    """Split (codes, destination) tasks into two lists of about ``total / 2`` rows each."""
    first: list[tuple[npt.NDArray[np.generic], F64]] = []
    second: list[tuple[npt.NDArray[np.generic], F64]] = []
    room = total // 2
    for codes, dest in tasks:
        n = codes.shape[0]
        if room <= 0:
            second.append((codes, dest))
        elif n <= room:
            first.append((codes, dest))
            room -= n
        else:  # this part straddles the middle: cut it there
            first.append((codes[:room], dest[:room]))
            second.append((codes[room:], dest[room:]))
            room = 0
    return first, second


def _top(scores: F64, ids: IntArray, k: int, *, keep_ties: bool) -> list[tuple[int, float]]:
    """Best ``k`` (id, score), ties by id; ``keep_ties`` also keeps rows tied with the k-th."""
    n = scores.shape[0]
    k = min(k, n)
    if k < n:
        part = np.argpartition(-scores, k - 1)[:k]
        # Every row tied with the k-th score, so ties at the boundary resolve by id.
        part = np.flatnonzero(scores >= scores[part].min())
    else:
        part = np.arange(n)
    order = np.lexsort((ids[part], -scores[part]))
    order = order[: max(k, SHORTLIST_MAX)] if keep_ties else order[:k]
    chosen = part[order]
    return list(zip(ids[chosen].tolist(), scores[chosen].tolist(), strict=True))


def _within(scores: F64, ids: IntArray, k: int, margin: float, cap: int) -> list[tuple[int, float]]:
    """Every row scoring within ``margin`` of the k-th best (at most ``cap``), best first.

    A row of the true top k scores at least the k-th best code score minus its own error
    and the k-th row's, so a margin of a few error deviations keeps it in.
    """
    n = scores.shape[0]
    if n <= k:
        return _top(scores, ids, k, keep_ties=False)
    kth = float(-np.partition(-scores, k - 1)[k - 1])
    chosen = np.flatnonzero(scores >= kth - margin)
    if chosen.size > cap:
        return _top(scores, ids, cap, keep_ties=True)
    order = np.lexsort((ids[chosen], -scores[chosen]))
    picked = chosen[order]
    return list(zip(ids[picked].tolist(), scores[picked].tolist(), strict=True))


def rerank(query: Vector, rows: Sequence[tuple[int, bytes]], top_k: int) -> list[tuple[int, float]]:
    """Exact cosine of stored float32 BLOBs ``(chunk_id, blob)``: top ``top_k``, ties by id.

    The same arithmetic as the float32 cache (normalise in float32, then a float32 dot
    product), so a similarity does not depend on the cache kind.
    """
    if not rows:
        return []
    dim = query.shape[0]
    good = [(cid, blob) for cid, blob in rows if len(blob) == dim * 4]
    if not good:
        return []
    ids = np.fromiter((cid for cid, _ in good), dtype=np.int64, count=len(good))
    matrix = np.frombuffer(b"".join(blob for _, blob in good), dtype="<f4").reshape(len(good), dim)
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    q = (query / float(np.linalg.norm(query))).astype(np.float32, copy=False)
    scores = np.asarray(unit.astype(np.float32, copy=False) @ q, dtype=np.float64)
    return _top(scores, ids, top_k, keep_ties=False)
