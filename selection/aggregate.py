"""Rules that combine teachers' soft targets into one, ``(n_teachers, n, n_classes) -> (n, n_classes)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean(probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        return probs.mean(0)
    w = weights / weights.sum()
    return torch.einsum("t,tnc->nc", w, probs)


def median(probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Coordinate-wise median, renormalised to a distribution."""
    m = probs.median(0).values
    return m / m.sum(1, keepdim=True).clamp_min(1e-12)


def trimmed_mean(probs: torch.Tensor, weights: torch.Tensor | None = None, trim: float = 0.2) -> torch.Tensor:
    """Drop the ``trim`` fraction of highest and lowest values per coordinate, then average."""
    t = probs.shape[0]
    cut = min(int(t * trim), (t - 1) // 2)
    s = probs.sort(0).values[cut : t - cut]
    m = s.mean(0)
    return m / m.sum(1, keepdim=True).clamp_min(1e-12)


def class_reliability(probs: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each teacher's vote for class ``c`` weighted by ``weights[t, c]`` (its reliability on c).

    ``weights`` is ``(n_teachers, n_classes)``, e.g. each teacher's validation precision per
    class: a teacher that learned a niche of few labels predicts them for everything, so its
    precision on them is low and its votes count little outside what it knows.
    """
    if weights is None or weights.dim() != 2:
        return mean(probs, None)
    m = torch.einsum("tc,tnc->nc", weights, probs)
    return m / m.sum(1, keepdim=True).clamp_min(1e-12)


def class_precision(pred: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Smoothed precision per teacher and class, ``(n_teachers, n_classes)``.

    ``pred`` is ``(n_teachers, n)`` predicted labels on a labelled probe ``y`` ``(n,)``.
    """
    hit = F.one_hot(pred, n_classes).float()  # (t, n, c)
    tp = (hit * F.one_hot(y, n_classes).float()[None]).sum(1)
    return (tp + 1.0) / (hit.sum(1) + 2.0)


AGGREGATORS = {"mean": mean, "median": median, "trimmed_mean": trimmed_mean, "class_reliability": class_reliability}
