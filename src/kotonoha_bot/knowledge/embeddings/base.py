"""The embedding provider contract and the checks every provider shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from kotonoha_bot.errors import EmbeddingError, InvalidInputError
from kotonoha_bot.models import EmbeddingConfig

#: A batch of embeddings: float32, shape (n, dimension), each row of unit length.
Vectors = npt.NDArray[np.float32]


@runtime_checkable
class EmbeddingProvider(Protocol):
    """Turns texts into unit-length float32 vectors of a fixed dimension."""

    name: str
    """Provider kind: ``openai``, ``e5``, ``local`` or ``hashing``."""
    model: str
    """The model name recorded in the database (vectors of two models never mix)."""
    dimension: int
    """Length of every vector this provider returns."""

    async def embed(self, texts: Sequence[str]) -> Vectors:
        """Stored texts (passages): one L2-normalised row per text, shape (len(texts), dim)."""
        ...

    async def embed_queries(self, texts: Sequence[str]) -> Vectors:
        """Search queries; the same as :meth:`embed` unless the model is asymmetric (e5)."""
        ...

    async def aclose(self) -> None:
        """Release clients, connections or threads; idempotent."""
        ...


def embedding_config(provider: EmbeddingProvider) -> EmbeddingConfig:
    """The (model, dimension) pair a database records for ``provider``."""
    return EmbeddingConfig(model=provider.model, dimension=provider.dimension)


def check_texts(texts: Sequence[str], where: str) -> list[str]:
    """Reject what no provider can embed: a bare string, non-text items, blank texts."""
    if isinstance(texts, str):
        raise InvalidInputError(f"{where}: expected a sequence of texts, got one string")
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise InvalidInputError(f"{where}: text {i} is {type(text).__name__}, not str")
        if not text.strip():
            raise InvalidInputError(f"{where}: text {i} is empty or blank (nothing to embed)")
    return out


def empty_vectors(dimension: int) -> Vectors:
    """The result of embedding no texts."""
    return np.zeros((0, dimension), dtype=np.float32)


def normalize_rows(matrix: npt.ArrayLike, where: str) -> Vectors:
    """Scale each row to unit length; a row that is not finite or is all zeros is an error."""
    arr = np.asarray(matrix, dtype=np.float64)
    if arr.ndim != 2:
        raise EmbeddingError(f"{where}: expected a 2-d array of vectors, got {arr.ndim}-d")
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        bad = int(np.argmin(finite))
        raise EmbeddingError(f"{where}: vector {bad} contains NaN or infinity")
    norms = np.linalg.norm(arr, axis=1)
    if (norms == 0).any():
        bad = int(np.argmin(norms))
        raise EmbeddingError(f"{where}: vector {bad} is all zeros (no direction)")
    return np.ascontiguousarray((arr / norms[:, None]).astype(np.float32))
