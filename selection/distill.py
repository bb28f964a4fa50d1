"""Distillation: an ensemble of teachers taught to one student seed on a transfer set."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from forkpop.population import native
from forkpop.population.models import accuracy, flat_weights, load_flat_weights
from forkpop.population.optim import AdamState, adam_step
from forkpop.selection.aggregate import AGGREGATORS, class_precision
from torch import nn

INITS = ("previous", "best", "average", "data_average")


@torch.no_grad()
def soft_targets(model: nn.Module, teachers: torch.Tensor, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each teacher's softened predictions, ``(n_teachers, n, n_classes)``."""
    model.eval()
    out = []
    for w in teachers:
        load_flat_weights(model, w)
        out.append(F.softmax(model(x) / temperature, dim=1))
    return torch.stack(out)


def student_init(
    method: str,
    previous: torch.Tensor,
    teachers: torch.Tensor,
    fitnesses: Sequence[float],
    samples: Sequence[float] | None = None,
) -> torch.Tensor:
    """The student's starting weights, ``(n_params,)``; teachers are ``(k, n_params)``, best first.

    ``average`` is the fitness-weighted mean of the teachers: forks of one seed share a basin,
    so their average is a meaningful model. ``data_average`` weighs each teacher by fitness
    times the samples it learned from (``samples``), as FedAvg weighs clients by data size.
    """
    if method == "previous":
        return previous.clone()
    if method == "best":
        return teachers[0].clone()
    if method in ("average", "data_average"):
        w = torch.tensor(fitnesses, dtype=teachers.dtype).clamp_min(1e-6)
        if method == "data_average":
            if samples is None:
                raise ValueError("distill.init=data_average needs each teacher's sample count")
            w = w * torch.tensor(samples, dtype=teachers.dtype).clamp_min(1.0)
        return (w[:, None] * teachers).sum(0) / w.sum()
    raise ValueError(f"unknown distill.init {method!r}; use one of {INITS}")


def teacher_targets(
    model: nn.Module,
    teachers: torch.Tensor,
    fitnesses: Sequence[float],
    x: torch.Tensor,
    temperature: float,
    aggregate: str = "mean",
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """The teachers' aggregated soft targets ``(n, classes)`` on ``x`` at ``temperature``
    (``probs``: each teacher's, :func:`soft_targets`, where the caller has them already)."""
    if aggregate not in AGGREGATORS:
        raise ValueError(f"unknown distill.aggregate {aggregate!r}; use one of {sorted(AGGREGATORS)}")
    probs = soft_targets(model, teachers, x, temperature) if probs is None else probs
    if aggregate == "class_reliability":
        if probe is None:
            raise ValueError("distill.aggregate=class_reliability needs a labelled probe (the validation split)")
        px, py = probe
        pred = soft_targets(model, teachers, px, 1.0).argmax(2)
        weights = class_precision(pred, py, probs.shape[2])
    else:
        weights = torch.tensor(fitnesses, dtype=probs.dtype)
    return AGGREGATORS[aggregate](probs, weights)


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
    probe: tuple[torch.Tensor, torch.Tensor] | None = None,
    eval_every: int = 0,
    extra: tuple[torch.Tensor, torch.Tensor] | None = None,
    target: torch.Tensor | None = None,
    kernel: str = "auto",
) -> tuple[torch.Tensor, list[float]]:
    """Train a student from ``init`` on the teachers' aggregated soft targets.

    ``teachers`` is ``(k, n_params)``, ``transfer_x`` ``(n, n_features)``. The loss is the
    KL divergence at ``temperature``, scaled by ``temperature**2``. Returns the student's
    weights ``(n_params,)`` and the loss per step. ``probe`` (validation inputs and labels)
    gives each teacher its per-class reliability for ``aggregate="class_reliability"``, and
    with ``eval_every > 0`` the student is scored on it at the start and every ``eval_every``
    steps: the best-scoring weights are returned (ties go to the later, more distilled one).
    ``extra`` (inputs, soft targets at ``temperature``) joins the transfer set with its
    targets as given: pseudo-labelled data from earlier generations. ``kernel``: ``auto``
    takes the native kernel (:mod:`forkpop.population.native`) where it runs and takes the
    model, ``torch`` never: the same batches, loss and Adam steps, to float rounding.
    """
    if target is None:
        target = teacher_targets(model, teachers, fitnesses, transfer_x, temperature, aggregate, probe)
    if extra is not None:  # inputs whose soft targets are fixed already (earlier generations' labels)
        transfer_x = torch.cat([transfer_x, extra[0]])
        target = torch.cat([target, extra[1].to(target.dtype)])
    if kernel != "torch" and steps > 0:
        n, bs = len(transfer_x), min(batch_size, len(transfer_x))

        def batches() -> torch.Tensor:  # the same draws as the loops below take, one batch per step
            return torch.stack([torch.randint(n, (bs,), generator=generator) for _ in range(steps)])

        got = native.distill(model, init, transfer_x, target, batches, temperature, lr, probe, eval_every)
        if got is not None:
            return got
    shapes = _relu_mlp_shapes(model)
    if shapes is not None and transfer_x.dtype == target.dtype == init.dtype == torch.float32:
        return _distill_relu_mlp(
            shapes, init, transfer_x, target, temperature, steps, lr, batch_size, generator, probe, eval_every
        )
    load_flat_weights(model, init)
    params = list(model.parameters())
    adam = AdamState(params)
    n = len(transfer_x)
    losses: list[float] = []
    keep = eval_every > 0 and probe is not None
    best_w, best_acc = init.clone(), accuracy_of(model, init, *probe) if keep else 0.0
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(n, (min(batch_size, n),), generator=generator)
        logp = F.log_softmax(model(transfer_x[idx]) / temperature, dim=1)
        loss = F.kl_div(logp, target[idx], reduction="batchmean") * temperature**2
        adam_step(params, torch.autograd.grad(loss, params), adam, lr)
        losses.append(float(loss.detach()))
        if keep and (step % eval_every == 0 or step == steps):
            acc = accuracy(model, *probe)
            if acc >= best_acc:
                best_w, best_acc = flat_weights(model), acc
    if keep:
        return best_w, losses
    return flat_weights(model), losses


def _relu_mlp_shapes(model: nn.Module) -> list[tuple[int, int]] | None:
    """``[(out, in), ...]`` of a ``Linear (ReLU Linear)*`` model with biases (the ``mlp``
    family), whose distillation step :func:`_distill_relu_mlp` writes out by hand; else None."""
    layers = list(model) if isinstance(model, nn.Sequential) else []
    if not layers or len(layers) % 2 == 0:
        return None
    shapes = []
    for i, m in enumerate(layers):
        if i % 2 == 1:
            if type(m) is not nn.ReLU:
                return None
        elif type(m) is not nn.Linear or m.bias is None:
            return None
        else:
            shapes.append((m.out_features, m.in_features))
    return shapes


def _distill_relu_mlp(
    shapes: list[tuple[int, int]],
    init: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    temperature: float,
    steps: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    probe: tuple[torch.Tensor, torch.Tensor] | None,
    eval_every: int,
) -> tuple[torch.Tensor, list[float]]:
    """:func:`distill`'s loop for a ReLU MLP with the backward written out and one Adam step
    over the flat weight vector: the same batches (the same draws from ``generator``), loss,
    gradients and update as autograd and :func:`adam_step` give, at a fraction of the per-step
    overhead that dominates a model this small (a distillation is hundreds of tiny steps)."""
    w = init.detach().clone()
    views, off = [], 0
    for o, i in shapes:  # nn.Linear's parameter order: weight (out, in), then bias (out,)
        views.append((w[off : off + o * i].view(o, i), w[off + o * i : off + o * i + o]))
        off += o * i + o
    g = torch.zeros_like(w)
    gviews, off = [], 0
    for o, i in shapes:
        gviews.append((g[off : off + o * i].view(o, i), g[off + o * i : off + o * i + o]))
        off += o * i + o
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    b1, b2, eps = 0.9, 0.999, 1e-8
    t2 = temperature**2
    # KL(target || p) = sum target * (log target - log p); its constant part once, 0 log 0 = 0
    neg_entropy = torch.special.xlogy(target, target).sum(1)

    def forward(a: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        acts = [a]
        for k, (wk, bk) in enumerate(views):
            a = torch.addmm(bk, a, wk.t())
            if k < len(views) - 1:
                a = a.clamp_min_(0.0)
                acts.append(a)
        return a, acts

    def probe_accuracy() -> float:
        with torch.no_grad():
            z, _ = forward(probe[0])
            return float((z.argmax(1) == probe[1]).float().mean())

    n = len(x)
    bs = min(batch_size, n)
    losses = torch.empty(steps, dtype=torch.float64)
    keep = eval_every > 0 and probe is not None
    best_w, best_acc = w.clone(), probe_accuracy() if keep else 0.0
    with torch.no_grad():
        for step in range(1, steps + 1):
            idx = torch.randint(n, (bs,), generator=generator)
            tb = target[idx]
            z, acts = forward(x[idx])
            logp = torch.log_softmax(z / temperature, dim=1)
            losses[step - 1] = (neg_entropy[idx].sum() - (tb * logp).sum()) * (t2 / bs)
            # d loss / d z = T^2 / B * (softmax(z / T) - target) / T
            d = logp.exp_().sub_(tb).mul_(temperature / bs)
            for k in range(len(views) - 1, -1, -1):
                gw, gb = gviews[k]
                torch.mm(d.t(), acts[k], out=gw)
                torch.sum(d, 0, out=gb)
                if k:
                    d = torch.mm(d, views[k][0]).mul_(acts[k] > 0)
            c1, c2 = 1 - b1**step, math.sqrt(1 - b2**step)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            w.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
            if keep and (step % eval_every == 0 or step == steps):
                acc = probe_accuracy()
                if acc >= best_acc:
                    best_w, best_acc = w.clone(), acc
    return (best_w if keep else w), losses.tolist()


def own_niche_targets(
    base: torch.Tensor, probs: torch.Tensor, teacher_niche: Sequence[int], row_niche: torch.Tensor, share: float
) -> torch.Tensor:
    """Soft targets where each transfer input also hears the teachers that learned it.

    ``base`` ``(n, C)`` are the group's aggregated targets, ``probs`` ``(t, n, C)`` each
    teacher's, ``teacher_niche[t]`` the niche teacher ``t`` learned and ``row_niche[r]`` the
    niche input ``r`` came from (-1: none). A row whose niche has teachers takes ``share`` of
    its target from their mean and the rest from ``base``; other rows keep ``base``.
    """
    tn = torch.as_tensor(list(teacher_niche), dtype=torch.int64)
    own = (tn[:, None] == row_niche[None, :]).to(probs.dtype)  # (t, n)
    count = own.sum(0)
    mine = torch.einsum("tn,tnc->nc", own, probs) / count.clamp_min(1)[:, None]
    has = (count > 0).to(probs.dtype)[:, None] * share
    return (1 - has) * base + has * mine


@torch.no_grad()
def ensemble_accuracy(model: nn.Module, members: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of the members' averaged probabilities; ``members`` is ``(k, n_params)``."""
    probs = soft_targets(model, members, x, 1.0).mean(0)
    return float((probs.argmax(1) == y).float().mean())


def accuracy_of(model: nn.Module, weights: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``model`` carrying ``weights`` ``(n_params,)``."""
    return accuracy(load_flat_weights(model, weights), x, y)
