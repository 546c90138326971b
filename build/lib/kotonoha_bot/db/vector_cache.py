"""The SQLite backend's in-memory vector matrix, kept in step with writes.

Exact cosine search is a matrix-vector product, so its cost is reading the
vectors once from memory. Rows are stored L2-normalised (the database keeps the
original float32 bits); a scope index (guild, and guild+channel) lets a search over
a small channel gather only that channel's rows instead of scanning everything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from kotonoha_bot.models import Vector

IntArray = npt.NDArray[np.int64]

# Above this fraction of all rows a scoped search scans the whole matrix and masks,
# because gathering (copying) most of the rows costs more than reading them in place.
_GATHER_MAX_FRACTION = 0.25


@dataclass
class _Scope:
    positions: set[int] = field(default_factory=set)
    array: IntArray | None = None

    def as_array(self) -> IntArray:
        if self.array is None:
            self.array = np.fromiter(
                sorted(self.positions), dtype=np.int64, count=len(self.positions)
            )
        return self.array


class VectorCache:
    """Normalised vectors by chunk id, with guild/channel scope indexes."""

    def __init__(self, dimension: int, capacity: int = 1024) -> None:
        self.dimension = dimension
        self._matrix = np.zeros((max(capacity, 16), dimension), dtype=np.float32)
        self._ids = np.full(self._matrix.shape[0], -1, dtype=np.int64)
        self._used = 0  # rows [0, _used) have been handed out
        self._free: list[int] = []
        self._pos: dict[int, int] = {}
        self._scope_of: dict[int, tuple[int, int | None]] = {}
        self._guilds: dict[int, _Scope] = {}
        self._channels: dict[tuple[int, int], _Scope] = {}

    def __len__(self) -> int:
        return len(self._pos)

    @property
    def nbytes(self) -> int:
        """Memory held by the matrix and its id column."""
        return int(self._matrix.nbytes + self._ids.nbytes)

    def _grow(self) -> None:
        new_cap = self._matrix.shape[0] * 2
        matrix = np.zeros((new_cap, self.dimension), dtype=np.float32)
        matrix[: self._used] = self._matrix[: self._used]
        ids = np.full(new_cap, -1, dtype=np.int64)
        ids[: self._used] = self._ids[: self._used]
        self._matrix, self._ids = matrix, ids

    def put(self, chunk_id: int, guild_id: int, channel_id: int | None, vector: Vector) -> None:
        """Insert or replace one vector."""
        if chunk_id in self._pos:
            self.remove(chunk_id)
        if self._free:
            pos = self._free.pop()
        else:
            if self._used == self._matrix.shape[0]:
                self._grow()
            pos = self._used
            self._used += 1
        norm = float(np.linalg.norm(vector))
        self._matrix[pos] = vector / norm
        self._ids[pos] = chunk_id
        self._pos[chunk_id] = pos
        self._scope_of[chunk_id] = (guild_id, channel_id)
        self._add_scope(self._guilds.setdefault(guild_id, _Scope()), pos)
        if channel_id is not None:
            self._add_scope(self._channels.setdefault((guild_id, channel_id), _Scope()), pos)

    def put_many(
        self,
        chunk_ids: IntArray,
        guild_ids: IntArray,
        channel_ids: list[int | None],
        vectors: npt.NDArray[np.float32],
    ) -> None:
        """Bulk insert (used when loading from disk); ids must be new."""
        n = len(chunk_ids)
        while self._used + n > self._matrix.shape[0]:
            self._grow()
        start, end = self._used, self._used + n
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        np.divide(vectors, norms, out=self._matrix[start:end])
        self._ids[start:end] = chunk_ids
        self._used = end
        for offset, (cid, gid, ch) in enumerate(
            zip(chunk_ids.tolist(), guild_ids.tolist(), channel_ids, strict=True)
        ):
            pos = start + offset
            self._pos[cid] = pos
            self._scope_of[cid] = (gid, ch)
            self._add_scope(self._guilds.setdefault(gid, _Scope()), pos)
            if ch is not None:
                self._add_scope(self._channels.setdefault((gid, ch), _Scope()), pos)

    @staticmethod
    def _add_scope(scope: _Scope, pos: int) -> None:
        scope.positions.add(pos)
        scope.array = None

    def remove(self, chunk_id: int) -> None:
        """Forget one vector (no-op when absent)."""
        pos = self._pos.pop(chunk_id, None)
        if pos is None:
            return
        guild_id, channel_id = self._scope_of.pop(chunk_id)
        self._ids[pos] = -1
        self._matrix[pos] = 0.0
        self._free.append(pos)
        for scope, key_map, key in (
            (self._guilds.get(guild_id), self._guilds, guild_id),
            (
                self._channels.get((guild_id, channel_id)) if channel_id is not None else None,
                self._channels,
                (guild_id, channel_id),
            ),
        ):
            if scope is None:
                continue
            scope.positions.discard(pos)
            scope.array = None
            if not scope.positions:
                del key_map[key]  # type: ignore[arg-type]

    def candidates(self, guild_id: int, channel_id: int | None) -> int:
        """How many rows a search in this scope would rank."""
        scope = (
            self._guilds.get(guild_id)
            if channel_id is None
            else self._channels.get((guild_id, channel_id))
        )
        return 0 if scope is None else len(scope.positions)

    def search(
        self,
        query: Vector,
        guild_id: int,
        channel_id: int | None,
        top_k: int,
        allowed_ids: set[int] | None = None,
    ) -> list[tuple[int, float]]:
        """Exact top-k (chunk_id, cosine similarity), best first, ties by chunk id."""
        scope = (
            self._guilds.get(guild_id)
            if channel_id is None
            else self._channels.get((guild_id, channel_id))
        )
        if scope is None or not scope.positions:
            return []
        q = (query / float(np.linalg.norm(query))).astype(np.float32, copy=False)
        if allowed_ids is not None:
            positions = np.fromiter(
                (
                    p
                    for cid in allowed_ids
                    if (p := self._pos.get(cid)) is not None and p in scope.positions
                ),
                dtype=np.int64,
            )
            if positions.size == 0:
                return []
            scores = self._matrix[positions] @ q
        elif len(scope.positions) > _GATHER_MAX_FRACTION * self._used:
            all_scores = self._matrix[: self._used] @ q
            positions = scope.as_array()
            scores = all_scores[positions]
        else:
            positions = scope.as_array()
            scores = self._matrix[positions] @ q
        ids = self._ids[positions]
        k = min(top_k, scores.shape[0])
        if k < scores.shape[0]:
            # Take a few extra past the k-th score so ties at the boundary resolve by id.
            part = np.argpartition(-scores, k - 1)[:k]
            threshold = scores[part].min()
            part = np.flatnonzero(scores >= threshold)
        else:
            part = np.arange(scores.shape[0])
        order = np.lexsort((ids[part], -scores[part]))[:k]
        chosen = part[order]
        return [(int(ids[i]), float(scores[i])) for i in chosen]
