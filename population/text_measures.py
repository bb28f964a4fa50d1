"""Model-collapse measures for byte-level text: n-gram diversity, compressibility, entropy, rare-n-gram recall.

numpy and gzip only. Byte n-grams (``1 <= n <= 8``) are handled as uint64 codes, the bytes packed big-endian so
that sorting codes sorts n-grams lexicographically; ``code_to_bytes`` turns one back into bytes.

"Samples" everywhere is one 1-D array of byte values (any integer dtype, values 0..255), ``bytes``, a ``str``
(encoded as UTF-8), a 2-D array (each row one sample), or a list / tuple of those: n-grams never cross the boundary
between two samples.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence

import numpy as np

_MAX_N = 8


def _as_bytes_array(sample) -> np.ndarray:
    """One sample as a uint8 array (rows of a 2-D array are left to the caller)."""
    if isinstance(sample, str):
        sample = sample.encode("utf-8")
    if isinstance(sample, (bytes, bytearray, memoryview)):
        return np.frombuffer(bytes(sample), dtype=np.uint8)
    arr = np.asarray(sample)
    if arr.dtype == np.uint8:
        return arr
    if arr.size == 0:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"samples: byte values must be integers 0..255, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() > 255:
        raise ValueError(f"samples: byte values must lie in 0..255, got {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def _segments(samples) -> list[np.ndarray]:
    """``samples`` as a list of 2-D uint8 arrays whose rows are independent samples (n-grams stay within a row)."""
    if isinstance(samples, (str, bytes, bytearray, memoryview)):
        return [_as_bytes_array(samples)[None, :]]
    if isinstance(samples, np.ndarray):
        if samples.ndim <= 1:
            return [_as_bytes_array(samples.reshape(-1))[None, :]]
        if samples.ndim == 2:
            return [_as_bytes_array(samples)]
        raise ValueError(f"samples: expected 1-D or 2-D byte arrays, got shape {samples.shape}")
    if isinstance(samples, Sequence):
        out: list[np.ndarray] = []
        for sample in samples:
            out.extend(_segments(sample))
        return out
    raise ValueError(f"samples: expected bytes, a byte array or a list of them, got {type(samples).__name__}")


def _check_n(n: int) -> int:
    n = int(n)
    if not 1 <= n <= _MAX_N:
        raise ValueError(f"n-gram order must be 1..{_MAX_N}, got {n}")
    return n


def _codes_2d(rows: np.ndarray, n: int) -> np.ndarray:
    """``(m, L - n + 1)`` uint64 codes of every n-gram in each row (``(m, 0)`` if rows are shorter than ``n``)."""
    m, length = rows.shape
    width = length - n + 1
    if width <= 0:
        return np.zeros((m, 0), dtype=np.uint64)
    codes = np.zeros((m, width), dtype=np.uint64)
    for k in range(n):
        codes <<= np.uint64(8)
        codes |= rows[:, k : k + width].astype(np.uint64)
    return codes


def ngram_codes(samples, n: int = 4) -> np.ndarray:
    """Every n-gram occurrence in ``samples`` as a flat uint64 code array (within samples only)."""
    n = _check_n(n)
    parts = [_codes_2d(rows, n).reshape(-1) for rows in _segments(samples)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


def code_to_bytes(code: int, n: int = 4) -> bytes:
    """The n-gram a code stands for."""
    return int(code).to_bytes(_check_n(n), "big")


def ngram_counts(data, n: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The distinct n-grams of ``data`` and how often each occurs: ``(codes, counts)``, codes sorted uint64
    (see ``code_to_bytes``), counts int64. A 1.6 MB corpus takes well under a second."""
    codes, counts = np.unique(ngram_codes(data, n), return_counts=True)
    return codes, counts.astype(np.int64)


def _lookup(sorted_codes: np.ndarray, values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``table[i]`` where ``sorted_codes[i] == value``, else 0, for every value."""
    if sorted_codes.size == 0:
        return np.zeros(values.shape, dtype=table.dtype)
    idx = np.searchsorted(sorted_codes, values)
    idx_clipped = np.minimum(idx, sorted_codes.size - 1)
    found = sorted_codes[idx_clipped] == values
    return np.where(found, table[idx_clipped], 0)


class RealNgrams:
    """The real (training) corpus's n-gram statistics, built once and reused for every generation's samples.

    A "rare" n-gram is one occurring at least once and at most ``rare_max`` times in the real corpus; for the mask
    over model inputs an n-gram never seen in the real corpus counts as rare too.
    """

    def __init__(self, real, n: int = 4, rare_max: int = 2):
        self.n = _check_n(n)
        self.rare_max = int(rare_max)
        if self.rare_max < 1:
            raise ValueError(f"rare_max must be at least 1, got {rare_max}")
        self.codes, self.counts = ngram_counts(real, self.n)
        self.rare_codes = self.codes[self.counts <= self.rare_max]

    @property
    def n_rare(self) -> int:
        """How many distinct rare n-grams the real corpus has."""
        return int(self.rare_codes.size)

    def count(self, codes: np.ndarray) -> np.ndarray:
        """How often each code occurs in the real corpus (0: never), same shape as ``codes``."""
        return _lookup(self.codes, np.asarray(codes, dtype=np.uint64), self.counts)

    def rare_mask(self, windows: np.ndarray) -> np.ndarray:
        """``(m, L - 1)`` bool for ``(m, L)`` byte windows: entry ``t`` (the prediction of ``windows[:, t + 1]``) is
        True when the n-gram ending at ``t + 1`` (bytes ``t + 2 - n .. t + 1``) is rare or unseen in the real corpus.
        Positions with fewer than ``n - 1`` bytes of context (``t < n - 2``) are False: excluded, not rare."""
        rows = _as_bytes_array(np.asarray(windows))
        if rows.ndim != 2:
            raise ValueError(f"rare_mask: expected (m, L) windows, got shape {rows.shape}")
        m, length = rows.shape
        mask = np.zeros((m, max(length - 1, 0)), dtype=bool)
        codes = _codes_2d(rows, self.n)
        if codes.shape[1]:
            mask[:, self.n - 2 :] = self.count(codes) <= self.rare_max
        return mask

    def rare_recall(self, samples) -> float:
        """Share of the real corpus's rare n-grams that occur at least once in ``samples`` (0.0 for no samples,
        NaN when the real corpus has no rare n-gram). Small for samples much shorter than the corpus: compare it
        across generations."""
        if self.rare_codes.size == 0:
            return float("nan")
        found = np.unique(ngram_codes(samples, self.n))
        if found.size == 0:
            return 0.0
        return float(np.isin(self.rare_codes, found, assume_unique=True).mean())


def distinct_ngram_ratio(samples, n: int = 4) -> float:
    """Distinct n-grams / n-gram occurrences in ``samples`` (1.0: no n-gram repeats; 0.0 for no n-gram at all)."""
    codes = ngram_codes(samples, n)
    if codes.size == 0:
        return 0.0
    return float(np.unique(codes).size / codes.size)


def gzip_ratio(samples) -> float:
    """gzip (level 9) compressed size / raw size of the samples concatenated (lower: more repetitive; 0.0 for
    no bytes). The ~20-byte gzip header makes very short samples read high."""
    raw = b"".join(rows.tobytes() for rows in _segments(samples))
    if not raw:
        return 0.0
    return len(gzip.compress(raw, compresslevel=9, mtime=0)) / len(raw)


def byte_entropy(probs: np.ndarray) -> float:
    """Mean entropy, in bits, of the next-byte distributions ``probs`` (``(..., 256)``, each summing to 1)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 0 or p.shape[-1] == 0:
        raise ValueError(f"byte_entropy: expected (..., 256) distributions, got shape {p.shape}")
    terms = np.where(p > 0, -p * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return float(terms.sum(axis=-1).mean())
