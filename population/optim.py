"""Plain-function optimizer steps (SGD with momentum, Adam) on lists of tensors.

They match ``torch.optim.SGD`` (no dampening, no Nesterov) and ``torch.optim.Adam``
step for step, without their per-step bookkeeping and without the ~1 s import of
``torch._dynamo`` that a ``torch.optim`` step triggers in every fresh process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


@torch.no_grad()
def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: list[torch.Tensor | None],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
) -> None:
    """One in-place SGD step; ``bufs`` (one per parameter, ``None`` at first) holds momentum."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        d = g.add(p, alpha=weight_decay) if weight_decay else g
        if momentum:
            b = bufs[i]
            if b is None:
                b = bufs[i] = d.clone()
            else:
                b.mul_(momentum).add_(d)
            d = b
        p.add_(d, alpha=-lr)


class AdamState:
    """First and second moments and the step count of :func:`adam_step`."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0


@torch.no_grad()
def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: AdamState,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> None:
    """One in-place Adam step (no weight decay, no AMSGrad)."""
    b1, b2 = betas
    state.t += 1
    c1 = 1 - b1**state.t
    c2 = math.sqrt(1 - b2**state.t)
    for p, g, m, v in zip(params, grads, state.m, state.v, strict=True):
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
