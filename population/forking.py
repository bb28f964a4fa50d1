"""Forking: a child's weights are its parent's plus seeded Gaussian noise."""

from __future__ import annotations

import torch


def perturb_weights(flat: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """``flat + scale * |flat|_rms * N(0, 1)``, shape ``(n_params,)``.

    The noise is relative to the weights' root-mean-square so one ``fork_noise`` gene means
    the same thing for any model family and initialisation scale.
    """
    if scale <= 0:
        return flat.clone()
    rms = flat.pow(2).mean().sqrt().clamp_min(1e-12)
    noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype)
    return flat + scale * rms * noise
