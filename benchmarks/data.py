"""Synthetic embeddings that look like real ones, and their exact ground truth.

Real text embeddings are not uniform noise: they share a common direction (unrelated
texts still have a small positive cosine), they cluster by topic, topics have very
different sizes, and the spread inside a topic lives in a few dozen directions rather
than all 1536. So each vector is ``centre_k + A_k z + e``, normalised, where the
cluster ``k`` is drawn with Zipf-like weights, ``A_k`` spans a random low-rank
subspace of that cluster and ``e`` is isotropic noise. The constants are chosen so that
topics overlap and a query's best match has cosine ~0.45, its 10th ~0.38 and an
unrelated text ~0.15 (so an HNSW index does not find the neighbours trivially, as it
does for well-separated clusters). Everything is seeded; rows are generated in fixed
blocks so the 10k data set is the prefix of the 100k one.

Scopes follow how a Discord guild is laid out: one guild holds every row (a guild
search scans 100 %), channel 10 holds 10 % and channels 100..189 hold 1 % each; rows
are assigned to channels at random (so every scope mixes topics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

GUILD_ID = 1
CHANNEL_10PCT = 10
CHANNEL_1PCT = 100
SCOPES: dict[str, int | None] = {"100%": None, "10%": CHANNEL_10PCT, "1%": CHANNEL_1PCT}

N_CLUSTERS = 1024
CENTRE_SCALE = 0.5  # how far topics stand apart (topics overlap, as real ones do)
SUBSPACE_RANK = 64
SUBSPACE_SCALE = 0.9  # spread inside a topic, relative to the centre's norm of 1
NOISE_SCALE = 0.6  # isotropic noise on top
COMMON_SCALE = 0.5  # shared component: unrelated texts still have cosine ~0.15
_BLOCK = 10_000


@dataclass(frozen=True)
class Mixture:
    """The seeded Gaussian mixture: centres, per-cluster bases and weights."""

    dim: int
    seed: int
    centres: F32
    bases: F32  # (clusters, rank, dim)
    weights: npt.NDArray[np.float64]
    common: F32  # a direction every embedding shares (real models are anisotropic)

    @classmethod
    def make(cls, dim: int, seed: int = 42) -> Mixture:
        rng = np.random.default_rng([seed, 0])
        centres = rng.standard_normal((N_CLUSTERS, dim), dtype=np.float32)
        centres *= CENTRE_SCALE / np.linalg.norm(centres, axis=1, keepdims=True)
        bases = rng.standard_normal((N_CLUSTERS, SUBSPACE_RANK, dim), dtype=np.float32)
        bases *= SUBSPACE_SCALE / np.sqrt(dim * SUBSPACE_RANK)
        weights = 1.0 / np.arange(1, N_CLUSTERS + 1) ** 0.7
        common = rng.standard_normal(dim, dtype=np.float32)
        common *= COMMON_SCALE / np.linalg.norm(common)
        return cls(dim, seed, centres, bases, weights / weights.sum(), common)

    def sample(self, n: int, stream: int) -> F32:
        """``n`` normalised vectors from the random stream ``stream`` (deterministic)."""
        rng = np.random.default_rng([self.seed, 1, stream])
        labels = rng.choice(N_CLUSTERS, size=n, p=self.weights)
        z = rng.standard_normal((n, SUBSPACE_RANK), dtype=np.float32)
        out = self.centres[labels] + self.common
        for k in np.unique(labels):
            idx = np.flatnonzero(labels == k)
            out[idx] += z[idx] @ self.bases[k]
        noise = rng.standard_normal((n, self.dim), dtype=np.float32)
        out += noise * (NOISE_SCALE / np.sqrt(self.dim))
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


@dataclass(frozen=True)
class Dataset:
    """N vectors with their guild/channel, and query vectors from the same mixture."""

    vectors: F32  # (n, dim), unit length
    channels: I64  # (n,)
    queries: F32  # (q, dim), unit length

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def head(self, n: int) -> Dataset:
        """The first ``n`` rows (same queries)."""
        return Dataset(self.vectors[:n], self.channels[:n], self.queries)

    def scope_rows(self, scope: str) -> I64:
        """Row numbers (0-based) inside a scope name from ``SCOPES``."""
        channel = SCOPES[scope]
        if channel is None:
            return np.arange(self.n, dtype=np.int64)
        return np.flatnonzero(self.channels == channel).astype(np.int64)


def assign_channels(n: int, seed: int) -> I64:
    """10 % of rows to channel 10, then 1 % each to channels 100, 101, ..."""
    rank = np.empty(n, dtype=np.int64)
    rank[np.random.default_rng([seed, 2, n]).permutation(n)] = np.arange(n)
    ten = n // 10
    one = max(n // 100, 1)
    return np.where(rank < ten, CHANNEL_10PCT, CHANNEL_1PCT + (rank - ten) // one)


def make_dataset(n: int, dim: int = 1536, queries: int = 100, seed: int = 42) -> Dataset:
    """The seeded data set (rows come in fixed blocks, so smaller N is a prefix)."""
    mix = Mixture.make(dim, seed)
    vectors = np.empty((n, dim), dtype=np.float32)
    for block, start in enumerate(range(0, n, _BLOCK)):
        stop = min(start + _BLOCK, n)
        vectors[start:stop] = mix.sample(_BLOCK, stream=block)[: stop - start]
    return Dataset(vectors, assign_channels(n, seed), mix.sample(queries, stream=1_000_000))


def exact_top_k(vectors: F32, rows: I64, query: F32, k: int = 10) -> I64:
    """Row numbers of the exact top-k by cosine (vectors are unit length), best first."""
    scores = vectors[rows] @ query if rows.size < vectors.shape[0] else vectors @ query
    k = min(k, scores.shape[0])
    part = np.argpartition(-scores, k - 1)[:k]
    best = part[np.argsort(-scores[part], kind="stable")]
    return rows[best] if rows.size < vectors.shape[0] else best.astype(np.int64)


def ground_truth(ds: Dataset, scope: str, k: int = 10) -> list[I64]:
    """Exact top-k row numbers for every query in ``scope``."""
    rows = ds.scope_rows(scope)
    return [exact_top_k(ds.vectors, rows, q, k) for q in ds.queries]


def recall(found: list[int] | I64, truth: I64) -> float:
    """|found ∩ truth| / |truth| (row numbers)."""
    if len(truth) == 0:
        return 1.0
    return len(set(int(x) for x in found) & set(int(x) for x in truth)) / len(truth)
