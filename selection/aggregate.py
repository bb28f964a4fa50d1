"""Rules that combine teachers' soft targets into one, ``(n_teachers, n, n_classes) -> (n, n_classes)``."""

from __future__ import annotations

import torch


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


AGGREGATORS = {"mean": mean, "median": median, "trimmed_mean": trimmed_mean}
