"""Partitioners that cut a labelled pool into niches, and the ordered stream of a niche."""

from __future__ import annotations

import numpy as np


def partition_iid(labels: np.ndarray, n_niches: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Equal random slices; each niche's index array is in stream order."""
    return [np.sort(a) for a in np.array_split(rng.permutation(len(labels)), n_niches)]


def partition_dirichlet(
    labels: np.ndarray, n_niches: int, rng: np.random.Generator, alpha: float, min_size: int = 1
) -> list[np.ndarray]:
    """Per class, split its samples across niches in proportions drawn from Dirichlet(alpha).

    Small ``alpha`` gives niches dominated by few labels. Draws again (up to 100 times)
    until every niche holds at least ``min_size`` samples.
    """
    if alpha <= 0:
        raise ValueError(f"data.alpha must be > 0 (got {alpha})")
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(n_niches)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(n_niches, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for niche, chunk in enumerate(np.split(idx, cuts)):
                parts[niche].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a niche under {min_size} samples in 100 draws; "
        "raise data.alpha, lower data.n_niches or lower data.min_niche_size"
    )


def partition_shards(
    labels: np.ndarray, n_niches: int, rng: np.random.Generator, shards_per_niche: int
) -> list[np.ndarray]:
    """Sort by label, cut into ``n_niches * shards_per_niche`` shards, deal them out at random."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n_niches * shards_per_niche)
    deal = rng.permutation(len(shards))
    return [
        np.sort(np.concatenate([shards[s] for s in deal[i * shards_per_niche : (i + 1) * shards_per_niche]]))
        for i in range(n_niches)
    ]


PARTITIONERS = ("iid", "dirichlet", "shards")


def partition(
    labels: np.ndarray,
    method: str,
    n_niches: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.3,
    shards_per_niche: int = 2,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Index arrays into ``labels``, one per niche, each shuffled once into its stream order."""
    if n_niches < 1:
        raise ValueError(f"data.n_niches must be >= 1 (got {n_niches})")
    if n_niches > len(labels):
        raise ValueError(f"{n_niches} niches but only {len(labels)} samples; lower data.n_niches")
    if method == "iid":
        parts = partition_iid(labels, n_niches, rng)
    elif method == "dirichlet":
        parts = partition_dirichlet(labels, n_niches, rng, alpha, min_size)
    elif method == "shards":
        parts = partition_shards(labels, n_niches, rng, shards_per_niche)
    else:
        raise ValueError(f"unknown data.partition {method!r}; use one of {PARTITIONERS}")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(f"niches {empty} are empty; lower data.n_niches or change data.partition")
    return [rng.permutation(p) for p in parts]


def stream_batches(niche: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """The niche's stream cut into consecutive mini-batches (the last may be short)."""
    return [niche[i : i + batch_size] for i in range(0, len(niche), batch_size)]
