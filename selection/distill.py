"""Distillation: an ensemble of teachers taught to one student seed on a transfer set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from population.models import load_flat_weights
from selection.aggregate import AGGREGATORS

INITS = ("previous", "best", "average")


@torch.no_grad()
def soft_targets(
    model: nn.Module, teachers: torch.Tensor, x: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Each teacher's softened predictions, ``(n_teachers, n, n_classes)``."""
    model.eval()
    out = []
    for w in teachers:
        load_flat_weights(model, w)
        out.append(F.softmax(model(x) / temperature, dim=1))
    return torch.stack(out)


def student_init(
    method: str, previous: torch.Tensor, teachers: torch.Tensor, fitnesses: Sequence[float]
) -> torch.Tensor:
    """The student's starting weights, ``(n_params,)``; teachers are ``(k, n_params)``, best first.

    ``average`` is the fitness-weighted mean of the teachers: forks of one seed share a basin,
    so their average is a meaningful model.
    """
    if method == "previous":
        return previous.clone()
    if method == "best":
        return teachers[0].clone()
    if method == "average":
        w = torch.tensor(fitnesses, dtype=teachers.dtype).clamp_min(1e-6)
        return (w[:, None] * teachers).sum(0) / w.sum()
    raise ValueError(f"unknown distill.init {method!r}; use one of {INITS}")


def distill(
    model: nn.Module,
    init: torch.Tensor,
    teachers: torch.Tensor,
    fitnesses: Sequence[float],
    transfer_x: torch.Tensor,
    *,
    temperature: float = 2.0,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 128,
    aggregate: str = "mean",
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:
    """Train a student from ``init`` on the teachers' aggregated soft targets.

    ``teachers`` is ``(k, n_params)``, ``transfer_x`` ``(n, n_features)``. The loss is the
    KL divergence at ``temperature``, scaled by ``temperature**2``. Returns the student's
    weights ``(n_params,)`` and the loss per step.
    """
    if aggregate not in AGGREGATORS:
        raise ValueError(f"unknown distill.aggregate {aggregate!r}; use one of {sorted(AGGREGATORS)}")
    probs = soft_targets(model, teachers, transfer_x, temperature)
    target = AGGREGATORS[aggregate](probs, torch.tensor(fitnesses, dtype=probs.dtype))
    load_flat_weights(model, init)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(transfer_x)
    losses = []
    for _ in range(steps):
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        logp = F.log_softmax(model(transfer_x[idx]) / temperature, dim=1)
        loss = F.kl_div(logp, target[idx], reduction="batchmean") * temperature**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone(), losses


@torch.no_grad()
def ensemble_accuracy(model: nn.Module, members: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the members' averaged probabilities; ``members`` is ``(k, n_params)``."""
    probs = soft_targets(model, members, x, 1.0).mean(0)
    return float((probs.argmax(1) == y).float().mean())


@torch.no_grad()
def accuracy_of(model: nn.Module, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    load_flat_weights(model, weights)
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
