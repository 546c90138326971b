"""An offline, dependency-free embedder: feature hashing of n-grams (lexical, not semantic).

Each text is normalised (``normalize_text``, lower-cased) and turned into features:

* the keyword tokens of :func:`kotonoha_bot.text.keyword_tokens` (Latin words, CJK
  bigrams and single Han characters: the same units keyword search uses);
* character 2- and 3-grams of the text with punctuation folded to spaces (so
  ``embedding`` is near ``embeddings`` and ``締切日`` near ``締切``), and single
  characters of non-Latin scripts (one kanji carries meaning; one Latin letter does not).

Feature counts are damped (1 + ln tf), weighted by kind, and hashed into
``dimension`` slots with a sign (the "hashing trick"); the hash is BLAKE2b, so
vectors are identical across processes and machines (Python's ``hash()`` is
randomised per process). Rows are L2-normalised, so cosine similarity measures
shared wording.

What it is not: it knows no synonyms or translations. "会議" and "meeting" are
unrelated to it, and so are "締切" and "期限". It exists so the bot works with no
API key and no model download; use ``openai`` or ``local`` for semantic search.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from kotonoha_bot.errors import ConfigError
from kotonoha_bot.knowledge.embeddings.base import (
    Vectors,
    check_texts,
    empty_vectors,
    normalize_rows,
)
from kotonoha_bot.text import keyword_tokens, normalize_text

MODEL_NAME = "hashing-ngram-v1"
#: 512 slots: collisions stay rare for chunk-sized texts (a few hundred distinct
#: features), and a vector costs 2 KiB in the database. More slots buy little for a
#: lexical embedder; fewer start to blur unrelated texts together.
DEFAULT_DIMENSION = 512
MIN_DIMENSION = 64

#: Weight of each feature kind (whole tokens count more than character n-grams).
WEIGHTS = {"w": 1.0, "c1": 0.3, "c2": 0.5, "c3": 0.7}
#: Embed in a worker thread when a call holds more characters than this.
THREAD_THRESHOLD_CHARS = 20_000

_NON_WORD_RE = re.compile(r"[\W_]+")
_PERSON = b"kotonoha-hash-v1"  # BLAKE2b personalisation: part of the model's identity


@lru_cache(maxsize=1 << 18)
def _slot(feature: str, dimension: int) -> tuple[int, float]:
    digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, person=_PERSON).digest()
    h = int.from_bytes(digest, "big")
    return (h >> 1) % dimension, (1.0 if h & 1 else -1.0)


def text_features(text: str) -> Counter[str]:
    """The weighted-feature multiset of ``text`` (exposed for tests and explanations)."""
    t = normalize_text(text).lower()
    features: Counter[str] = Counter(f"w:{tok}" for tok in keyword_tokens(t))
    folded = _NON_WORD_RE.sub(" ", t).strip() or t
    for part in folded.split(" "):
        for ch in part:
            if not ch.isascii():
                features[f"c1:{ch}"] += 1
        padded = f" {part} " if part.isascii() else part
        for n in (2, 3):
            for i in range(len(padded) - n + 1):
                features[f"c{n}:{padded[i : i + n]}"] += 1
    return features


class HashingEmbeddingProvider:
    """Lexical embeddings by feature hashing; offline, deterministic, numpy only."""

    name = "hashing"

    def __init__(self, dimension: int | None = None, model: str | None = None) -> None:
        dimension = DEFAULT_DIMENSION if dimension is None else dimension
        if dimension < MIN_DIMENSION:
            raise ConfigError(
                f"EMBEDDING_DIMENSION={dimension} is too small for the hashing embedder"
                f" (minimum {MIN_DIMENSION}, default {DEFAULT_DIMENSION})"
            )
        if model is not None and model != MODEL_NAME:
            raise ConfigError(
                f"EMBEDDING_MODEL={model!r} is not a hashing model; the hashing provider"
                f" only has {MODEL_NAME!r} (leave EMBEDDING_MODEL unset)"
            )
        self.model = MODEL_NAME
        self.dimension = dimension

    def __repr__(self) -> str:
        return f"HashingEmbeddingProvider(model={self.model!r}, dimension={self.dimension})"

    def embed_sync(self, texts: Sequence[str]) -> Vectors:
        """The same as :meth:`embed`, in the calling thread."""
        items = check_texts(texts, "hashing embedder")
        if not items:
            return empty_vectors(self.dimension)
        matrix = np.zeros((len(items), self.dimension), dtype=np.float64)
        for row, text in enumerate(items):
            matrix[row] = self._vector(text)
        return normalize_rows(matrix, "hashing embedder")

    def _vector(self, text: str) -> np.ndarray:
        features = text_features(text)
        slots = np.empty(len(features), dtype=np.int64)
        values = np.empty(len(features), dtype=np.float64)
        for k, (feature, count) in enumerate(features.items()):
            index, sign = _slot(feature, self.dimension)
            slots[k] = index
            values[k] = sign * WEIGHTS[feature.split(":", 1)[0]] * (1.0 + math.log(count))
        vec = np.bincount(slots, weights=values, minlength=self.dimension)
        if not np.any(vec):
            # Every feature cancelled out against another (possible only for tiny
            # texts): fall back to the unsigned first feature so the row has a direction.
            vec[slots[0]] = 1.0
        return vec

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """One unit row per text; long batches run in a worker thread."""
        if sum(len(t) for t in texts if isinstance(t, str)) > THREAD_THRESHOLD_CHARS:
            return await asyncio.to_thread(self.embed_sync, texts)
        return self.embed_sync(texts)

    async def embed_queries(self, texts: Sequence[str]) -> Vectors:
        """Queries are embedded like stored texts (the features are symmetric)."""
        return await self.embed(texts)

    async def aclose(self) -> None:
        """Nothing to release."""
