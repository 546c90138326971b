"""The SQLite backend's in-memory vector cache: compact codes per scope, kept in step with writes.

What a search costs is reading the scope's vectors from memory once, so the cache holds
as few bytes per chunk as ranking needs and the exact float32 vectors stay where they
are, in the database. Three codecs (``VECTOR_CACHE`` kinds, chosen by the benchmark in
docs/PERFORMANCE.md):

- ``int8`` (default): each unit vector scaled to use the whole int8 range, one float32
  scale per row; 1 byte per dimension, a quarter of float32.
- ``binary``: one sign bit per dimension (1/32 of float32); ranks well enough only for
  wide embeddings (1024+ dimensions), so it needs a larger candidate set.
- ``float32``: the normalised vectors themselves (the previous cache; scores are final).

For the compact codecs a search is a *shortlist*: the best ``candidate_count(top_k)``
rows by code score (ties at the boundary kept), which the backend then re-ranks by
exact float32 cosine read from the stored BLOBs, so callers always get exact
similarities. Rows live in one contiguous bucket per (guild, channel) scope, so a
channel search reads only that channel's rows and a guild search reads only its own
buckets: cost in proportion to the scope. No Python object is kept per row (ids,
scales and codes are numpy arrays), so the memory accounting in ``nbytes`` is close to
what the process really holds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from kotonoha_bot.db.sqlite.vector_kernels import hamming_distances, int8_dots
from kotonoha_bot.models import Vector

CacheKind = Literal["int8", "binary", "float32"]
CACHE_KINDS: tuple[CacheKind, ...] = ("int8", "binary", "float32")

IntArray = npt.NDArray[np.int64]
F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: Candidates re-ranked exactly, per result asked for (and at least this many). Chosen by
#: the benchmark: int8 finds the true top 10 within its top 20 on every query measured
#: (1536 and 384 dims), so 4x leaves headroom; sign bits need far more.
RERANK_FACTOR: dict[CacheKind, int] = {"int8": 4, "binary": 20, "float32": 1}
RERANK_MIN: dict[CacheKind, int] = {"int8": 40, "binary": 200, "float32": 0}
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
Part = tuple[npt.NDArray[np.generic], F32 | None]


def candidate_count(kind: CacheKind, top_k: int) -> int:
    """How many rows a shortlist of this codec holds for ``top_k`` results."""
    return max(RERANK_FACTOR[kind] * top_k, RERANK_MIN[kind], top_k)


@dataclass(frozen=True)
class Shortlist:
    """Best rows of a scope: (chunk_id, score) best first; ``exact`` when scores are final."""

    ranked: list[tuple[int, float]]
    exact: bool


class _Codec:
    """Turns unit vectors into codes and scores a query against a block of codes."""

    kind: CacheKind
    dtype: type[np.generic]
    has_scale = False

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    @property
    def width(self) -> int:
        return self.dimension

    def encode(self, unit: F32) -> tuple[npt.NDArray[np.generic], F32 | None]:
        raise NotImplementedError

    def prepare(self, unit_query: F32) -> npt.NDArray[np.generic]:
        raise NotImplementedError

    def score(
        self, codes: npt.NDArray[np.generic], scales: F32 | None, query: npt.NDArray[np.generic]
    ) -> F64:
        """Higher is better."""
        raise NotImplementedError


class _Float32(_Codec):
    kind: CacheKind = "float32"
    dtype = np.float32

    def encode(self, unit: F32) -> tuple[npt.NDArray[np.generic], F32 | None]:
        return unit, None

    def prepare(self, unit_query: F32) -> npt.NDArray[np.generic]:
        return unit_query

    def score(
        self, codes: npt.NDArray[np.generic], scales: F32 | None, query: npt.NDArray[np.generic]
    ) -> F64:
        scores = np.asarray(codes, dtype=np.float32) @ np.asarray(query, dtype=np.float32)
        return np.asarray(scores, dtype=np.float64)


class _Int8(_Codec):
    kind: CacheKind = "int8"
    dtype = np.int8
    has_scale = True

    def encode(self, unit: F32) -> tuple[npt.NDArray[np.generic], F32 | None]:
        peak = np.abs(unit).max(axis=1)
        peak[peak == 0] = 1.0
        scale = (peak / 127.0).astype(np.float32)
        codes = np.rint(unit / scale[:, None]).astype(np.int8)
        return codes, scale

    def prepare(self, unit_query: F32) -> npt.NDArray[np.generic]:
        peak = float(np.abs(unit_query).max()) or 1.0
        return np.asarray(np.rint(unit_query * (127.0 / peak)), dtype=np.int8)

    def score(
        self, codes: npt.NDArray[np.generic], scales: F32 | None, query: npt.NDArray[np.generic]
    ) -> F64:
        assert scales is not None
        dots = int8_dots(codes.view(np.int8), query.view(np.int8))
        dots *= scales
        return dots


class _Binary(_Codec):
    kind: CacheKind = "binary"
    dtype = np.uint8

    @property
    def width(self) -> int:
        return (self.dimension + 7) // 8

    def encode(self, unit: F32) -> tuple[npt.NDArray[np.generic], F32 | None]:
        return np.packbits(unit > 0, axis=1), None

    def prepare(self, unit_query: F32) -> npt.NDArray[np.generic]:
        return np.packbits(unit_query > 0)

    def score(
        self, codes: npt.NDArray[np.generic], scales: F32 | None, query: npt.NDArray[np.generic]
    ) -> F64:
        return -hamming_distances(codes.view(np.uint8), query.view(np.uint8))


_CODECS: dict[CacheKind, type[_Codec]] = {"int8": _Int8, "binary": _Binary, "float32": _Float32}


@dataclass
class _Bucket:
    """The rows of one (guild, channel) scope, contiguous: codes, scales, chunk ids."""

    codes: npt.NDArray[np.generic]
    scales: F32 | None
    ids: IntArray
    size: int = 0

    @property
    def capacity(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.nbytes
        return int(self.codes.nbytes + self.ids.nbytes + scales)


@dataclass
class _Guild:
    buckets: dict[int | None, _Bucket] = field(default_factory=dict)


class VectorCache:
    """Encoded unit vectors by chunk id, bucketed by (guild, channel)."""

    def __init__(self, dimension: int, kind: CacheKind = "int8") -> None:
        self.dimension = dimension
        self.kind: CacheKind = kind
        self._codec = _CODECS[kind](dimension)
        self._guilds: dict[int, _Guild] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by every bucket's codes, scales and ids (allocated capacity)."""
        return sum(b.nbytes for g in self._guilds.values() for b in g.buckets.values())

    @property
    def exact(self) -> bool:
        """True when scores are final (float32); otherwise shortlists are re-ranked."""
        return self.kind == "float32"

    # --- writes -----------------------------------------------------------------------

    def _new_bucket(self, capacity: int) -> _Bucket:
        capacity = max(capacity, _MIN_CAPACITY)
        codec = self._codec
        return _Bucket(
            codes=np.zeros((capacity, codec.width), dtype=codec.dtype),
            scales=np.zeros(capacity, dtype=np.float32) if codec.has_scale else None,
            ids=np.zeros(capacity, dtype=np.int64),
        )

    def reserve(self, guild_id: int, channel_id: int | None, rows: int) -> None:
        """Allocate room for ``rows`` more rows in a scope (loading knows the counts)."""
        bucket = self._guilds.setdefault(guild_id, _Guild()).buckets.get(channel_id)
        if bucket is None:
            self._guilds[guild_id].buckets[channel_id] = self._new_bucket(rows)
        elif bucket.size + rows > bucket.capacity:
            self._resize(bucket, bucket.size + rows)

    def _resize(self, bucket: _Bucket, capacity: int) -> None:
        new = self._new_bucket(capacity)
        n = bucket.size
        new.codes[:n] = bucket.codes[:n]
        new.ids[:n] = bucket.ids[:n]
        if new.scales is not None and bucket.scales is not None:
            new.scales[:n] = bucket.scales[:n]
        bucket.codes, bucket.scales, bucket.ids = new.codes, new.scales, new.ids

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
        codes, scales = self._codec.encode((vectors / norms).astype(np.float32, copy=False))
        groups: dict[ScopeKey, list[int]] = {}
        for row, key in enumerate(zip(guild_ids.tolist(), channel_ids, strict=True)):
            groups.setdefault(key, []).append(row)
        for (gid, ch), rows in groups.items():
            guild = self._guilds.setdefault(gid, _Guild())
            bucket = guild.buckets.get(ch)
            if bucket is None:
                bucket = guild.buckets[ch] = self._new_bucket(len(rows))
            start = bucket.size
            if start + len(rows) > bucket.capacity:
                self._resize(bucket, max(start + len(rows), int(bucket.capacity * _GROWTH)))
            idx = np.asarray(rows, dtype=np.int64)
            stop = start + len(rows)
            bucket.codes[start:stop] = codes[idx]
            bucket.ids[start:stop] = chunk_ids[idx]
            if bucket.scales is not None and scales is not None:
                bucket.scales[start:stop] = scales[idx]
            bucket.size = stop
            self._count += len(rows)

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
                if bucket.scales is not None:
                    bucket.scales[:m] = bucket.scales[keep]
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

        Exact (``float32``): the top ``top_k`` with their cosine similarity. Otherwise
        the top ``candidate_count(kind, top_k)`` (with every row tied at the boundary)
        for the caller to re-rank by exact cosine.
        """
        buckets = self._buckets(guild_id, channel_id)
        if not buckets:
            return Shortlist([], self.exact)
        unit = (query / float(np.linalg.norm(query))).astype(np.float32, copy=False)
        q = self._codec.prepare(unit)
        allowed = None
        if allowed_ids is not None:
            allowed = np.fromiter(allowed_ids, dtype=np.int64, count=len(allowed_ids))
            allowed.sort()
        parts: list[Part] = []
        id_parts: list[IntArray] = []
        for b in buckets:
            n = b.size
            codes, scales, ids = b.codes[:n], None if b.scales is None else b.scales[:n], b.ids[:n]
            if allowed is not None:
                rows = np.flatnonzero(np.isin(ids, allowed, assume_unique=True))
                if rows.size == 0:
                    continue
                codes, ids = codes[rows], ids[rows]
                scales = None if scales is None else scales[rows]
            parts.append((codes, scales))
            id_parts.append(ids)
        if not parts:
            return Shortlist([], self.exact)
        score_parts = self._scan(parts, q)
        scores = score_parts[0] if len(score_parts) == 1 else np.concatenate(score_parts)
        ids = id_parts[0] if len(id_parts) == 1 else np.concatenate(id_parts)
        want = top_k if self.exact else candidate_count(self.kind, top_k)
        return Shortlist(_top(scores, ids, want, keep_ties=not self.exact), self.exact)

    def _scan(self, parts: list[Part], q: npt.NDArray[np.generic]) -> list[F64]:
        """Scores of every part, in order; large scans split over two threads."""
        codec = self._codec
        rows = sum(codes.shape[0] for codes, _ in parts)
        if rows < PARALLEL_MIN_ROWS or _SCAN_THREADS < 2 or self.exact:
            return [codec.score(codes, scales, q) for codes, scales in parts]
        global _scan_pool
        if _scan_pool is None:
            _scan_pool = ThreadPoolExecutor(1, thread_name_prefix="kotonoha-scan")
        halves: list[tuple[Part, Part]] = []
        for codes, scales in parts:
            h = codes.shape[0] // 2
            halves.append(
                (
                    (codes[:h], None if scales is None else scales[:h]),
                    (codes[h:], None if scales is None else scales[h:]),
                )
            )
        later = _scan_pool.submit(lambda: [codec.score(c, s, q) for _, (c, s) in halves])
        first = [codec.score(c, s, q) for (c, s), _ in halves]
        second = later.result()
        return [np.concatenate(pair) for pair in zip(first, second, strict=True)]


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
