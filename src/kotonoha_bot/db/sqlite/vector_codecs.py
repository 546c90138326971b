"""The codecs of the SQLite vector cache: how a unit vector becomes a compact code.

``int4`` and ``int8`` learn a per-dimension quantiser from the data; ``binary`` keeps one
sign bit per dimension; ``float32`` keeps the vector. Each codec scores a query against
a block of codes and says how far a code score may sit from the exact cosine, so
:mod:`kotonoha_bot.db.sqlite.vector_cache` can shortlist and the backend re-rank exactly.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt

from kotonoha_bot.db.sqlite.vector_kernels import hamming_distances, int4_dots, int8_dots, pack_int4

CacheKind = Literal["int4", "int8", "binary", "float32"]


CACHE_KINDS: tuple[CacheKind, ...] = ("int4", "int8", "binary", "float32")

#: The kind a cache gets when nobody chooses one (``SQLITE_VECTOR_CACHE``'s default is
#: the same; a test holds the two together).
DEFAULT_CACHE_KIND: CacheKind = "int4"


IntArray = npt.NDArray[np.int64]


F32 = npt.NDArray[np.float32]


F64 = npt.NDArray[np.float64]


class Codec:
    """Turns unit vectors into codes and scores a query against a block of codes."""

    kind: CacheKind
    dtype: type[np.generic]
    #: False until ``fit`` has seen the data (quantisers whose steps follow the data).
    fitted = True

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension

    @property
    def width(self) -> int:
        return self.dimension

    @property
    def nbytes(self) -> int:
        """Bytes of the codec's own parameters."""
        return 0

    def fit(self, sample: F32) -> None:
        """Learn the quantiser's parameters from unit vectors (codecs that have some)."""

    def encode(self, unit: F32) -> npt.NDArray[np.generic]:
        raise NotImplementedError

    def prepare(self, unit_query: F32) -> tuple[npt.NDArray[np.generic], float | None]:
        """The query for ``score``, and the standard deviation of a row's score error.

        The error is how far a row's code score may sit from its exact cosine (in score
        units); 0 when scores are exact, None when the codec has no model of it.
        """
        raise NotImplementedError

    def score(
        self, codes: npt.NDArray[np.generic], query: npt.NDArray[np.generic], out: F64
    ) -> None:
        """Scores of the rows into ``out`` (one float64 per row); higher is better."""
        raise NotImplementedError


class Float32Codec(Codec):
    kind: CacheKind = "float32"
    dtype = np.float32

    def encode(self, unit: F32) -> npt.NDArray[np.generic]:
        return unit

    def prepare(self, unit_query: F32) -> tuple[npt.NDArray[np.generic], float | None]:
        return unit_query, 0.0

    def score(
        self, codes: npt.NDArray[np.generic], query: npt.NDArray[np.generic], out: F64
    ) -> None:
        out[:] = np.asarray(codes, dtype=np.float32) @ np.asarray(query, dtype=np.float32)


class _Affine(Codec):
    """Per-dimension scalar quantiser: ``code = (x - offset) / step``, rounded and clipped.

    Embeddings are anisotropic (a shared direction, dimensions of very different spread),
    so the offset is each dimension's mean and the step a fixed fraction of its standard
    deviation, both learnt from the data (``fit``). No per-row scale: unit vectors all have
    the same length, so the codes' bytes and the chunk id are all a row costs. A query
    ``q`` scores ``sum(q_i * step_i * code_i)``: that is ``q . x`` up to terms that are the
    same for every row (``q . offset``, half a step), so the ranking is that of the
    reconstructed vectors. The weights ``q_i * step_i`` are quantised to the code type
    for the SIMD kernel; the exact re-rank absorbs both roundings.
    """

    fitted = False
    #: Code range (inclusive) and the step as a fraction of each dimension's std.
    low: int
    high: int
    step_per_sd: float

    def __init__(self, dimension: int) -> None:
        super().__init__(dimension)
        self.offset = np.zeros(dimension, dtype=np.float32)
        self.step = np.full(dimension, 1.0, dtype=np.float32)
        self.rounding = np.full(dimension, 1.0 / 12)
        self.spread = np.zeros(dimension)

    @property
    def nbytes(self) -> int:
        params = (self.offset, self.step, self.rounding, self.spread)
        return int(sum(a.nbytes for a in params))

    def fit(self, sample: F32) -> None:
        mean = sample.mean(axis=0, dtype=np.float64)
        sd = sample.std(axis=0, dtype=np.float64)
        # A dimension that did not vary in the sample must still encode later values.
        median = float(np.median(sd))
        sd = np.maximum(sd, 0.1 * median if median > 0 else 1.0 / np.sqrt(self.dimension))
        self.offset = mean.astype(np.float32)
        self.step = (sd * self.step_per_sd).astype(np.float32)
        # The noise model of ``prepare``, measured on the sample: each dimension's mean
        # squared rounding error (clipping included) and its levels' variance, in steps.
        z = (sample - self.offset) / self.step
        recon = self._levels(sample).astype(np.float64) + 0.5
        self.rounding = np.mean((z - recon) ** 2, axis=0)
        self.spread = recon.var(axis=0)
        self.fitted = True

    def _levels(self, unit: F32) -> npt.NDArray[np.int8]:
        z = (unit - self.offset) / self.step
        np.floor(z, out=z)  # level k stands for (k + 0.5) steps: symmetric around 0
        np.clip(z, self.low, self.high, out=z)
        return z.astype(np.int8)

    def _quantised_query(self, unit_query: F32) -> tuple[npt.NDArray[np.int8], float | None]:
        """The weights ``q_i * step_i`` as codes, and the score error's standard deviation.

        A row's exact cosine minus ``scale x`` its code score is, up to a constant,
        ``sum(w_i u_i) + sum(e_i r_i)``: ``u`` the row's rounding (``rounding`` per
        dimension), ``e`` the weights' own rounding and ``r`` the row's levels
        (``spread``). Over rows that is a sum of many small independent terms.
        """
        w = np.asarray(unit_query, dtype=np.float64) * self.step
        levels, scale = self._round_weights(w)
        e = w - scale * levels
        var = float(np.dot(w * w, self.rounding) + np.dot(e * e, self.spread))
        return levels.astype(np.int8), float(np.sqrt(var)) / scale

    def _round_weights(self, w: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
        raise NotImplementedError


class _Int8(_Affine):
    kind: CacheKind = "int8"
    dtype = np.int8
    low, high = -128, 127
    step_per_sd = 6.0 / 128  # +-6 standard deviations before a value clips

    def encode(self, unit: F32) -> npt.NDArray[np.generic]:
        return self._levels(unit)

    def _round_weights(self, w: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
        scale = (float(np.abs(w).max()) or 1.0) / 127.0
        return np.rint(w / scale), scale

    def prepare(self, unit_query: F32) -> tuple[npt.NDArray[np.generic], float | None]:
        return self._quantised_query(unit_query)

    def score(
        self, codes: npt.NDArray[np.generic], query: npt.NDArray[np.generic], out: F64
    ) -> None:
        int8_dots(codes.view(np.int8), query.view(np.int8), out)


class _Int4(_Affine):
    """Two codes per byte (``pack_int4``): an eighth of float32."""

    kind: CacheKind = "int4"
    dtype = np.uint8
    low, high = -8, 7
    #: 16 levels a third of a standard deviation apart: +-2.6 sd before a value clips
    #: (close to the best uniform 16-level quantiser of a Gaussian).
    step_per_sd = 1.0 / 3.0
    #: Query weight scales tried (in multiples of the weights' RMS); the one with the
    #: smallest rounding error wins.
    _QUERY_STEPS = np.linspace(0.15, 0.6, 19)

    @property
    def width(self) -> int:
        return (self.dimension + 1) // 2

    def encode(self, unit: F32) -> npt.NDArray[np.generic]:
        return pack_int4(self._levels(unit))

    def _round_weights(self, w: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], float]:
        rms = float(np.sqrt(np.mean(w * w))) or 1.0
        scales = self._QUERY_STEPS * rms
        levels = np.clip(np.rint(w[None, :] / scales[:, None]), -8, 7)
        err = ((w[None, :] - levels * scales[:, None]) ** 2).sum(axis=1)
        best = int(np.argmin(err))
        return levels[best], float(scales[best])

    def prepare(self, unit_query: F32) -> tuple[npt.NDArray[np.generic], float | None]:
        levels, noise = self._quantised_query(unit_query)
        return pack_int4(levels[None, :])[0], noise

    def score(
        self, codes: npt.NDArray[np.generic], query: npt.NDArray[np.generic], out: F64
    ) -> None:
        int4_dots(codes.view(np.uint8), query.view(np.uint8), out)


class _Binary(Codec):
    kind: CacheKind = "binary"
    dtype = np.uint8

    @property
    def width(self) -> int:
        return (self.dimension + 7) // 8

    def encode(self, unit: F32) -> npt.NDArray[np.generic]:
        return np.packbits(unit > 0, axis=1)

    def prepare(self, unit_query: F32) -> tuple[npt.NDArray[np.generic], float | None]:
        return np.packbits(unit_query > 0), None

    def score(
        self, codes: npt.NDArray[np.generic], query: npt.NDArray[np.generic], out: F64
    ) -> None:
        hamming_distances(codes.view(np.uint8), query.view(np.uint8), out)
        np.negative(out, out=out)


CODECS: dict[CacheKind, type[Codec]] = {
    "int4": _Int4,
    "int8": _Int8,
    "binary": _Binary,
    "float32": Float32Codec,
}
