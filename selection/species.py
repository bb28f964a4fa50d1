"""Species: teachers grouped by what they predict, so that each group distills its own seed."""

from __future__ import annotations

import numpy as np


def cluster_by_function(distance: np.ndarray, n_species: int) -> list[list[int]]:
    """Average-linkage clusters of a symmetric ``(n, n)`` functional distance matrix.

    Returns at most ``n_species`` clusters as lists of row indices (each sorted), largest
    first (ties: the one holding the smaller index first). Deterministic: no random draws.
    """
    n = distance.shape[0]
    if n == 0:
        return []
    if n_species <= 1 or n == 1:
        return [list(range(n))]
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    d = np.clip((distance + distance.T) / 2.0, 0.0, None)
    np.fill_diagonal(d, 0.0)
    labels = fcluster(linkage(squareform(d, checks=False), method="average"), t=n_species, criterion="maxclust")
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def assign_slots(clusters: list[list[int]], species_of: list[int], n_slots: int) -> list[int]:
    """The species slot each cluster's seed takes: the slot most of its members came from,
    or, when that one is taken by a larger cluster, the first free slot."""
    taken: set[int] = set()
    slots = []
    for members in clusters:
        counts = np.bincount([species_of[i] for i in members], minlength=n_slots)
        order = sorted(range(n_slots), key=lambda s: (-counts[s], s))
        slot = next((s for s in order if counts[s] > 0 and s not in taken), None)
        if slot is None:
            slot = next(s for s in range(n_slots) if s not in taken)
        taken.add(slot)
        slots.append(slot)
    return slots
