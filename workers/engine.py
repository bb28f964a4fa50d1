"""The batched engine: a group of same-shape variants learns as one stacked step.

Every variant of a group shares the model's architecture but has its own weights, niche
stream, learning rate, momentum, weight decay, momentum buffers and prequential metrics.
The engine holds each parameter of the group as one tensor ``(n_variants, *shape)`` and does
one forward, backward and SGD update for all of them per step. Two ways to batch:

- ``stacked``: a model that is a chain of ``nn.Linear`` and element-wise activations (the
  ``mlp`` and ``linear`` families) runs as batched matrix products in a transposed layout
  (activations ``(variants, features, batch)``, weights in ``nn.Linear``'s own
  ``(out, in)`` layout), with the backward pass written out: no autograd graph per step.
- ``vmap``: any other ``nn.Module`` without buffers runs through ``torch.func``
  (``functional_call`` under ``vmap`` of ``grad_and_value``).

A model neither can handle (buffers such as BatchNorm's running statistics, or an op with
no batching rule) makes :func:`plan_engine` answer ``loop`` with the reason; the learner then
trains the variants one by one.

Variants are ordered by their number of steps, longest first, so the variants still
learning at any step are a prefix of the stack: finished ones simply drop off the end, no
copies. A variant whose loss becomes non-finite or explodes is stopped at that step (its
weights are kept from before the step), exactly as the per-variant loop does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# A loss this many times its first value means the variant has diverged, NaN or not.
EXPLODED = 100.0

ENGINES = ("batched", "loop")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(pref: str = "auto") -> torch.device:
    """``cuda`` when asked for or, with ``auto``, when a GPU is visible; ``cpu`` otherwise."""
    if pref not in DEVICES:
        raise ValueError(f"unknown run.device {pref!r}; use one of {DEVICES}")
    if pref == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but this process sees no CUDA GPU; use run.device=auto or cpu")
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# -- which models batch, and how ----------------------------------------------------------------


@dataclass(frozen=True)
class EnginePlan:
    """How a model family trains as a group: ``stacked``, ``vmap`` or ``loop`` (with why)."""

    kind: str
    reason: str = ""


_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity)


def _linear_chain(model: nn.Module) -> list[nn.Module] | None:
    """The model as a list of Linear / activation layers, or None if it is not such a chain."""
    layers = list(model) if isinstance(model, nn.Sequential) else [model]
    out: list[nn.Module] = []
    for m in layers:
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and not out:
            continue  # the engine's inputs are already flat feature vectors
        if isinstance(m, nn.Dropout) and m.p == 0:
            continue
        if not isinstance(m, (nn.Linear, *_ACTIVATIONS)) or (not out and not isinstance(m, nn.Linear)):
            return None
        out.append(m)
    return out or None


def plan_engine(model: nn.Module, n_features: int, n_classes: int) -> EnginePlan:
    """Decide how ``model`` batches; probes the ``vmap`` path on a tiny group."""
    if _linear_chain(model) is not None:
        return EnginePlan("stacked")
    bufs = [n for n, _ in model.named_buffers()]
    if bufs:
        names = ", ".join(bufs[:3])
        return EnginePlan("loop", f"{type(model).__name__} has buffers that change while learning ({names})")
    try:
        with torch.no_grad():
            flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
            stack = _FuncStack(model, flat.expand(2, -1).clone())
            x = torch.zeros(2, 3, n_features)
            y = torch.zeros(2, 3, dtype=torch.long)
            stack.loss_grad(2, x, y, None, None)
            stack.logits(torch.zeros(3, n_features))
    except Exception as e:  # no batching rule, data-dependent control flow, in-place state ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return EnginePlan("loop", f"torch.func cannot batch {type(model).__name__}: {msg}")
    return EnginePlan("vmap")


# -- stacked parameters: two implementations of one interface ----------------------------------


def _softmax_xent(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, inv_cnt: torch.Tensor | None):
    """Loss, correct count and d(loss)/d(logits) per variant; logits ``z`` are ``(k, C, B)``.

    The loss of a variant is the mean cross-entropy over its real samples (``w`` masks the
    padding of a short batch; ``inv_cnt`` is 1 / real samples).
    """
    k, _, b = z.shape
    yi = y.unsqueeze(1)  # (k, 1, B)
    m = z.amax(1, keepdim=True)
    e = (z - m).exp_()
    s = e.sum(1, keepdim=True)
    zy = z.gather(1, yi)
    ce = (m + s.log() - zy).squeeze(1)  # (k, B)
    hit = (zy >= m).squeeze(1)  # the label's logit is the largest
    p = e.div_(s)
    p.scatter_(1, yi, p.gather(1, yi) - 1.0)  # softmax - one-hot
    if w is None:
        loss = ce.mean(1)
        correct = hit.sum(1)
        p.mul_(1.0 / b)
    else:
        loss = (ce * w).sum(1) * inv_cnt
        correct = (hit & (w > 0)).sum(1)
        p.mul_((w * inv_cnt.unsqueeze(1)).unsqueeze(1))
    return loss, correct, p


class _LinearStack:
    """A chain of Linear layers and activations over stacked weights, backward written out."""

    def __init__(self, template: nn.Module, flats: torch.Tensor):
        chain = _linear_chain(template)
        assert chain is not None
        n = flats.shape[0]
        self.params: list[torch.Tensor] = []
        self.ops: list[tuple] = []  # ("linear", weight index, bias index or -1) | ("act", module)
        o = 0
        for m in chain:
            if isinstance(m, nn.Linear):
                wi = len(self.params)
                size = m.out_features * m.in_features
                self.params.append(flats[:, o : o + size].reshape(n, m.out_features, m.in_features).contiguous())
                o += size
                bi = -1
                if m.bias is not None:
                    bi = len(self.params)
                    self.params.append(flats[:, o : o + m.out_features].reshape(n, m.out_features, 1).contiguous())
                    o += m.out_features
                self.ops.append(("linear", wi, bi))
            elif not isinstance(m, nn.Identity):
                self.ops.append(("act", m))
        if o != flats.shape[1]:
            raise ValueError(f"weights have {flats.shape[1]} values but the model has {o}")

    def _forward(self, k: int, a: torch.Tensor):
        saved = []
        for op in self.ops:
            if op[0] == "linear":
                w = self.params[op[1]][:k]
                saved.append(a)
                a = torch.baddbmm(self.params[op[2]][:k], w, a) if op[2] >= 0 else torch.bmm(w, a)
            else:
                a = _act_forward(op[1], a)
                saved.append(a)
        return a, saved

    def loss_grad(self, k, x, y, w, inv_cnt):
        z, saved = self._forward(k, x.transpose(1, 2))
        loss, correct, d = _softmax_xent(z, y, w, inv_cnt)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        for i in range(len(self.ops) - 1, -1, -1):
            op, a = self.ops[i], saved[i]
            if op[0] == "linear":
                grads[op[1]] = torch.bmm(d, a.transpose(1, 2))
                if op[2] >= 0:
                    grads[op[2]] = d.sum(2, keepdim=True)
                if i > 0:
                    d = torch.bmm(self.params[op[1]][:k].transpose(1, 2), d)
            else:
                d = _act_backward(op[1], d, a)
        return loss, correct, grads

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every variant's logits on the same inputs ``x`` ``(n, D)``: ``(variants, n, C)``."""
        n = self.params[0].shape[0]
        z, _ = self._forward(n, x.t().unsqueeze(0).expand(n, -1, -1))
        return z.transpose(1, 2)


def _act_forward(m: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.ReLU):
        return z.clamp_(min=0)
    if isinstance(m, nn.Tanh):
        return z.tanh_()
    if isinstance(m, nn.Sigmoid):
        return z.sigmoid_()
    return F.leaky_relu_(z, m.negative_slope)


def _act_backward(m: nn.Module, d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Gradient through an activation from its output (every supported one is monotone)."""
    if isinstance(m, nn.ReLU):
        return torch.ops.aten.threshold_backward(d, out, 0)
    if isinstance(m, nn.Tanh):
        return torch.ops.aten.tanh_backward(d, out)
    if isinstance(m, nn.Sigmoid):
        return torch.ops.aten.sigmoid_backward(d, out)
    return torch.ops.aten.leaky_relu_backward(d, out, m.negative_slope, True)


class _FuncStack:
    """Any buffer-free module over stacked parameters through ``torch.func``."""

    def __init__(self, template: nn.Module, flats: torch.Tensor):
        from torch.func import functional_call, grad_and_value, vmap

        n = flats.shape[0]
        self.names = [name for name, _ in template.named_parameters()]
        self.params = []
        o = 0
        for _, p in template.named_parameters():
            self.params.append(flats[:, o : o + p.numel()].reshape(n, *p.shape).contiguous())
            o += p.numel()
        if o != flats.shape[1]:
            raise ValueError(f"weights have {flats.shape[1]} values but the model has {o}")
        template = template.to(flats.device)

        def call(ps, x):
            return functional_call(template, dict(zip(self.names, ps, strict=True)), (x,))

        def loss_fn(ps, x, y, w):
            logits = call(ps, x)
            ce = F.cross_entropy(logits, y, reduction="none")
            return (ce * w).sum() / w.sum(), logits

        self._step = vmap(grad_and_value(loss_fn, has_aux=True))
        self._logits = vmap(call, in_dims=(0, None))

    def loss_grad(self, k, x, y, w, inv_cnt):
        if w is None:
            w = torch.ones(y.shape, dtype=x.dtype, device=x.device)
        grads, (loss, logits) = self._step(tuple(p[:k] for p in self.params), x, y, w)
        correct = ((logits.argmax(-1) == y) & (w > 0)).sum(1)
        return loss.detach(), correct, list(grads)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(tuple(self.params), x)


# -- the engine ---------------------------------------------------------------------------------


def online_accuracy(hits: np.ndarray, sizes: np.ndarray, per_pass: int) -> tuple[list[float], list[float]]:
    """Running accuracies of one variant's learning steps, each batch predicted before it is
    learned: ``hits[t]`` right of ``sizes[t]`` at step ``t``, ``per_pass`` steps to a pass.

    Returns the prequential accuracy (the first pass: data the variant had not seen, one value
    per step, running over the pass) and the training accuracy of the later passes (data seen
    before, one value per step, running within its pass)."""
    hits, sizes = np.asarray(hits, dtype=np.float64), np.asarray(sizes, dtype=np.float64)
    first = min(len(hits), max(per_pass, 1))
    preq = (np.cumsum(hits[:first]) / np.cumsum(sizes[:first])).tolist()
    later_h, later_s = hits[first:], sizes[first:]
    if not len(later_h):
        return preq, []
    start = (np.arange(len(later_h)) // per_pass) * per_pass  # each step's pass start (within ``later``)
    ch, cs = np.cumsum(later_h), np.cumsum(later_s)
    before_h = np.where(start > 0, ch[np.maximum(start - 1, 0)], 0.0)
    before_s = np.where(start > 0, cs[np.maximum(start - 1, 0)], 0.0)
    return preq, ((ch - before_h) / (cs - before_s)).tolist()


@dataclass
class VariantRecord:
    """One variant's outcome: curves per step (as the per-variant loop reports them)."""

    loss: list[float] = field(default_factory=list)
    preq_accuracy: list[float] = field(default_factory=list)
    epoch_ends: list[int] = field(default_factory=list)
    samples: int = 0
    val_accuracy: float = float("nan")
    status: str = "ok"
    reason: str = ""
    train_accuracy: list[float] = field(default_factory=list)  # later passes (seen data)


class BatchedEngine:
    """Trains groups of variants of one model on the niche streams of one data set.

    ``streams[j]`` is niche ``j`` cut into mini-batches (index arrays into ``x_pool``); the
    tables live on ``device`` once, and each step gathers every variant's batch in one index.
    """

    def __init__(
        self,
        template: nn.Module,
        plan: EnginePlan,
        x_pool: torch.Tensor,
        y_pool: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        streams: list[list[np.ndarray]],
        batch_size: int,
        device: torch.device | str = "cpu",
    ):
        if plan.kind not in ("stacked", "vmap"):
            raise ValueError(f"the batched engine cannot train this model: {plan.reason}")
        self.template, self.plan, self.device = template, plan, torch.device(device)
        self.batch_size = batch_size
        dev = self.device
        self.x_pool, self.y_pool = x_pool.to(dev), y_pool.to(dev)
        self.x_val, self.y_val = x_val.to(dev), y_val.to(dev)
        # One table row per mini-batch of every niche, padded to batch_size.
        self.nb = np.array([len(s) for s in streams], dtype=np.int64)
        self.off = np.concatenate([[0], np.cumsum(self.nb)[:-1]]).astype(np.int64)
        rows = [b for s in streams for b in s]
        table = np.zeros((len(rows), batch_size), dtype=np.int64)
        self.sizes = np.array([len(b) for b in rows], dtype=np.int64)
        for r, b in enumerate(rows):
            table[r, : len(b)] = b
            table[r, len(b) :] = b[0]
        self.table = torch.from_numpy(table).to(dev)
        self.table_cnt = torch.from_numpy(self.sizes).to(dev)

    def train(
        self,
        flats: torch.Tensor,
        niches: list[int],
        epochs: list[int],
        lr: list[float],
        momentum: list[float],
        weight_decay: list[float],
        clip: list[float] | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[VariantRecord]]:
        """Learn ``flats`` ``(n, n_params)`` on their niches; returns the weights (CPU) and records.

        ``clip`` (per variant, 0: none) caps each variant's global gradient norm, as
        ``torch.nn.utils.clip_grad_norm_`` does, before weight decay and momentum.
        ``labels`` replaces the pool's labels for this call (the label audit's reading).
        """
        n = flats.shape[0]
        if n == 0:
            return flats.clone(), []
        dev, bsz = self.device, self.batch_size
        niche = np.asarray(niches, dtype=np.int64) % len(self.nb)
        nb = self.nb[niche]
        steps = nb * np.maximum(np.asarray(epochs, dtype=np.int64), 1)
        order = np.argsort(-steps, kind="stable")  # longest first: the learning ones are a prefix
        steps_s, nb_s, off_s = steps[order], nb[order], self.off[niche[order]]
        t_max = int(steps_s[0])
        active = np.searchsorted(-steps_s, -np.arange(t_max), side="left")  # variants with steps > t
        short = self._short_steps(off_s, nb_s, steps_s, t_max)

        stack_cls = _LinearStack if self.plan.kind == "stacked" else _FuncStack
        stack = stack_cls(self.template, flats[torch.from_numpy(order)].to(dev, torch.float32))
        params = stack.params
        bufs = [torch.zeros_like(p) for p in params]

        def per_variant(values: list[float]) -> torch.Tensor:
            return torch.tensor(np.asarray(values, dtype=np.float64)[order], dtype=torch.float32, device=dev)

        hyper = {"lr": per_variant(lr), "mom": per_variant(momentum), "wd": per_variant(weight_decay)}
        clip_d = per_variant(clip) if clip is not None and any(c > 0 for c in clip) else None
        shaped = {(name, p.dim()): v.view(-1, *([1] * (p.dim() - 1))) for name, v in hyper.items() for p in params}
        off_d = torch.from_numpy(off_s).to(dev)
        nb_d = torch.from_numpy(nb_s).to(dev)
        pos = torch.zeros(n, dtype=torch.long, device=dev)
        alive = torch.ones(n, dtype=torch.bool, device=dev)
        thr = torch.full((n,), math.inf, device=dev)
        loss_hist = torch.full((t_max, n), math.nan, device=dev)
        hit_hist = torch.zeros((t_max, n), dtype=torch.int32, device=dev)
        death = np.full(n, -1, dtype=np.int64)
        dead_reason: dict[int, str] = {}
        snapshots: dict[int, torch.Tensor] = {}
        arange_b = torch.arange(bsz, device=dev)

        y_pool = self.y_pool if labels is None else labels.to(dev)
        with torch.no_grad():
            for t in range(t_max):
                k = int(active[t])
                rows = off_d[:k] + pos[:k]
                idx = self.table[rows]
                x, y = self.x_pool[idx], y_pool[idx]
                w = inv = None
                if short[t]:
                    cnt = self.table_cnt[rows]
                    w = (arange_b < cnt.unsqueeze(1)).to(x.dtype)
                    inv = 1.0 / cnt.to(x.dtype)
                loss, correct, grads = stack.loss_grad(k, x, y, w, inv)  # torch.func ignores no_grad
                if t == 0:
                    thr = EXPLODED * loss.clamp(min=1e-3)
                    bad = ~torch.isfinite(loss)
                else:
                    bad = ~(torch.isfinite(loss) & (loss <= thr[:k]))
                bad &= alive[:k]
                if bool(bad.any()):  # rare: stop those variants here, before this step's update
                    for i in torch.nonzero(bad).flatten().tolist():
                        death[i] = t
                        lv = float(loss[i])
                        first = float(thr[i]) / EXPLODED
                        dead_reason[i] = (
                            f"non-finite loss at step {t}"
                            if not math.isfinite(lv)
                            else f"loss exploded to {lv:.3g} at step {t} (first {first:.3g})"
                        )
                        snapshots[i] = torch.cat([p[i].reshape(-1) for p in params])
                    alive[:k] &= ~bad
                if clip_d is not None:
                    norm = torch.sqrt(sum(gr.reshape(k, -1).pow(2).sum(1) for gr in grads))
                    coef = torch.clamp(clip_d[:k] / (norm + 1e-6), max=1.0)
                    coef = torch.where(clip_d[:k] > 0, coef, torch.ones_like(coef))
                    for gr in grads:
                        gr.mul_(coef.view(-1, *([1] * (gr.dim() - 1))))
                for p, g, b in zip(params, grads, bufs, strict=True):
                    d = p.dim()
                    pk, bk = p[:k], b[:k]
                    g.addcmul_(shaped["wd", d][:k], pk)
                    bk.mul_(shaped["mom", d][:k]).add_(g)
                    pk.addcmul_(shaped["lr", d][:k], bk, value=-1.0)
                loss_hist[t, :k] = loss
                hit_hist[t, :k] = correct.to(torch.int32)
                pos[:k].add_(1).remainder_(nb_d[:k])

            final = torch.cat([p.reshape(n, -1) for p in params], 1)
            for i, snap in snapshots.items():
                final[i] = snap
            val_hits = (stack.logits(self.x_val).argmax(-1) == self.y_val).sum(1).cpu().numpy()

        loss_np = loss_hist.cpu().numpy()
        hit_np = hit_hist.cpu().numpy()
        final = final.cpu()
        records: list[VariantRecord] = [VariantRecord() for _ in range(n)]
        for s in range(n):  # s: position in the sorted stack
            rec = records[order[s]]
            ns = int(steps_s[s]) if death[s] < 0 else int(death[s])  # steps learned
            seen_steps = int(steps_s[s]) if death[s] < 0 else int(death[s]) + 1
            sizes = self.sizes[off_s[s] : off_s[s] + nb_s[s]]
            step_sizes = np.resize(sizes, seen_steps)
            rec.loss = loss_np[:ns, s].astype(np.float64).tolist()
            rec.preq_accuracy, rec.train_accuracy = online_accuracy(hit_np[:ns, s], step_sizes[:ns], int(nb_s[s]))
            rec.samples = int(step_sizes.sum())
            if death[s] < 0:
                rec.epoch_ends = [int(nb_s[s]) * (e + 1) for e in range(int(steps_s[s] // nb_s[s]))]
                if not bool(torch.isfinite(final[s]).all()):
                    rec.status, rec.reason = "diverged", "non-finite weights after learning"
                else:
                    rec.val_accuracy = float(val_hits[s]) / len(self.y_val)
            else:
                rec.epoch_ends = [int(nb_s[s]) * (e + 1) for e in range(ns // int(nb_s[s]))] + [ns]
                rec.status, rec.reason = "diverged", dead_reason[s]
        out = torch.empty_like(final)
        out[torch.from_numpy(order)] = final
        return out, records

    def _short_steps(self, off_s: np.ndarray, nb_s: np.ndarray, steps_s: np.ndarray, t_max: int) -> np.ndarray:
        """Per step: does any learning variant get a batch shorter than batch_size?"""
        short = np.zeros(t_max, dtype=bool)
        last = self.sizes[off_s + nb_s - 1]
        for s in np.nonzero(last < self.batch_size)[0]:
            short[np.arange(nb_s[s] - 1, steps_s[s], nb_s[s])] = True
        return short
