"""Species: teachers grouped by what they predict, so that each group distills its own seed."""

from __future__ import annotations

import numpy as np
from forkpop.population.models import class_rates


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


def screen_by_agreement(preds: np.ndarray, z: float) -> list[int]:
    """Teachers to keep: those whose agreement with the others is not an outlier.

    ``preds`` ``(n, m)`` are the teachers' predicted labels on the transfer set. A teacher's
    agreement is the mean share of inputs on which it predicts what each other teacher does;
    teachers below ``median - z * MAD`` of the agreements are dropped (the MAD floored at
    0.01 so near-unanimous teachers do not drop a merely imperfect one). ``z <= 0`` keeps all.
    """
    n = preds.shape[0]
    if z <= 0 or n < 3:
        return list(range(n))
    agree = (preds[:, None, :] == preds[None, :, :]).mean(-1)
    score = (agree.sum(1) - 1.0) / (n - 1)
    floor = _robust_floor(score, z)
    return [i for i in range(n) if score[i] >= floor]


def fitness_outliers(fitness: list[float], z: float) -> set[int]:
    """Variants whose fitness is below ``median - z * MAD`` of the live ones (MAD floored at
    0.01); ``z <= 0`` flags none. Non-finite fitnesses are not counted (never selected anyway)."""
    live = [(i, f) for i, f in enumerate(fitness) if np.isfinite(f)]
    if z <= 0 or len(live) < 3:
        return set()
    floor = _robust_floor(np.array([f for _, f in live]), z)
    return {i for i, f in live if f < floor}


def _robust_floor(values: np.ndarray, z: float) -> float:
    """``median - z * MAD`` of ``values``, the MAD floored at 0.01 (near-equal values must
    not make a merely imperfect one an outlier)."""
    med = float(np.median(values))
    return med - z * max(float(np.median(np.abs(values - med))), 0.01)


def peer_label_screen(
    probs: np.ndarray,
    y: np.ndarray,
    niches: list[np.ndarray],
    val_probs: np.ndarray,
    y_val: np.ndarray,
    suspect: float,
    min_class_recall: float,
    min_judged: int = 8,
) -> set[int]:
    """Variants whose niche labels their peers contradict: not teachers this generation.

    ``probs`` ``(n, m, C)`` are the n learned variants' predictions on the m pool samples,
    ``y`` the pool's labels as given and ``niches[i]`` the pool indices variant i learned on;
    ``val_probs`` ``(n, v, C)`` their predictions on the validation split ``y_val``. Variant i
    is judged by the ensemble of the others (mean probabilities, leave-one-out), and only on
    samples whose given class that ensemble recalls on validation (>= ``min_class_recall``): a
    niche holding a class the others never saw is not held against it. It is flagged when the
    ensemble agrees with its niche's labels on less than ``suspect`` x the ensemble's validation
    accuracy of the judged samples (and at least ``min_judged`` were judged).
    """
    n = len(probs)
    if n < 3:
        return set()
    total, total_val = probs.sum(0), val_probs.sum(0)
    n_classes = probs.shape[2]
    flagged = set()
    for i in range(n):
        loo = (total - probs[i]).argmax(-1)
        loo_val = (total_val - val_probs[i]).argmax(-1)
        hit = loo_val == y_val
        recall = np.nan_to_num(class_rates(loo_val, y_val, n_classes)[0])
        idx = niches[i]
        judged = idx[recall[y[idx]] >= min_class_recall]
        if len(judged) < min_judged:
            continue
        agreement = float((loo[judged] == y[judged]).mean())
        if agreement < suspect * float(hit.mean()):
            flagged.add(i)
    return flagged
