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

On a CPU a large ``stacked`` group is dealt into parts, at least one per torch thread and
small enough to stay in cache; each part learns on its own (Python) thread with one torch
thread (see :func:`_in_threads`).
For the ``stacked`` models without gradient clipping the SGD step is fused into the backward
pass: the momentum buffers are decayed first and the gradient products accumulate straight
into them, then one update per parameter (see :meth:`BatchedEngine._learn_part`).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from forkpop.population.models import linear_chain
from forkpop.population.native import native_layout, ptr
from torch import nn

# A loss this many times its first value means the variant has diverged, NaN or not.
EXPLODED = 100.0

ENGINES = ("batched", "loop")
DEVICES = ("auto", "cpu", "cuda")
KERNELS = ("auto", "native", "torch")

# A CPU group learns in parts of MIN_PART to MAX_PART variants, at least one per torch thread.
# Fewer than MIN_PART and a step's fixed cost (some 35 small ops, ~0.4 ms on 2 EPYC cores)
# outweighs its matrix products (16 variants: one part on 2 torch threads 28, two parts of 8
# 17 GFLOP/s); more than MAX_PART and a part's weights and momentum buffers (75 kB a variant
# for the digits MLP) no longer stay in cache through a step's passes over them.
MIN_PART = 12
MAX_PART = 32

T = TypeVar("T")


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


def plan_engine(model: nn.Module, n_features: int, n_classes: int) -> EnginePlan:
    """Decide how ``model`` batches; probes the ``vmap`` path on a tiny group."""
    if linear_chain(model) is not None:
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


def diverged_reason(step: int, loss: float, first: float) -> str:
    """Why a variant was stopped at ``step``: its loss there was not finite, or exploded past
    :data:`EXPLODED` times ``first`` (its first loss, at least 1e-3)."""
    if not math.isfinite(loss):
        return f"non-finite loss at step {step}"
    return f"loss exploded to {loss:.3g} at step {step} (first {first:.3g})"


# -- stacked parameters: two implementations of one interface ----------------------------------


def _softmax_xent(
    z: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor | None,
    inv_cnt: torch.Tensor | None,
    scale: bool = True,
    minus_one: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Loss ``(k,)``, correct count ``(k,)`` and d(loss)/d(logits) ``(k, C, B)`` per variant,
    for logits ``z`` ``(k, C, B)`` and labels ``y`` ``(k, B)``.

    The loss of a variant is the mean cross-entropy over its real samples (``w`` ``(k, B)``
    masks the padding of a short batch; ``inv_cnt`` ``(k,)`` is 1 / real samples). A sample
    counts as correct when its label's logit is the largest. The last value returned is the
    factor still to apply to the gradient: 1, or with ``scale=False`` and a full batch 1 / B,
    which the caller folds into its matrix products (``alpha``) instead of one more pass.
    ``minus_one`` is a ``(k, 1, B)`` tensor of -1 the caller keeps (one op less per step).
    """
    b = z.shape[2]
    yi = y.view(-1, 1, b)
    hit = z.gather(1, yi) >= z.amax(1, keepdim=True)  # (k, 1, B)
    logp = torch.log_softmax(z, 1)
    ce = F.nll_loss(logp, y.view(-1, b), reduction="none")  # (k, B): -log p(label)
    p = logp.exp_()
    if minus_one is None:
        minus_one = torch.full(yi.shape, -1.0, dtype=p.dtype, device=p.device)
    p.scatter_add_(1, yi, minus_one)  # softmax - one-hot
    if w is None:
        loss = ce.mean(1)
        correct = hit.sum((1, 2))
        if not scale:
            return loss, correct, p, 1.0 / b
        p.mul_(1.0 / b)
    else:
        loss = (ce * w).sum(1) * inv_cnt
        correct = (hit.squeeze(1) & (w > 0)).sum(1)
        p.mul_((w * inv_cnt.unsqueeze(1)).unsqueeze(1))
    return loss, correct, p, 1.0


@dataclass
class _LayerViews:
    """One Linear layer's tensors for the first ``k`` variants of a step (views, kept while
    ``k`` stays): weight ``(k, out, in)``, bias ``(k, out, 1)`` or None, the weight
    transposed, and step buffers ``(k, out, B)`` for its output and ``(k, in, B)`` for the
    gradient of its input (None for the first layer, whose input needs none)."""

    w: torch.Tensor
    b: torch.Tensor | None
    wt: torch.Tensor
    out: torch.Tensor
    out_t: torch.Tensor
    grad_in: torch.Tensor | None


class _LinearStack:
    """A chain of Linear layers and activations over stacked weights, backward written out.

    A learning step keeps its outputs in buffers reused from step to step (the same memory
    stays in cache, where fresh outputs would stream in cold) and takes its views once per
    ``k`` (about 3 us each here: a few dozen a step add up)."""

    def __init__(self, template: nn.Module, flats: torch.Tensor):
        chain = linear_chain(template)
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
        self._bufs: dict[tuple[str, int], torch.Tensor] = {}
        self._views: tuple[int, int, list[_LayerViews | None], torch.Tensor] | None = None

    def _at(self, k: int, b: int) -> tuple[list[_LayerViews | None], torch.Tensor]:
        """Per op, its layer's views for ``k`` variants and batches of ``b`` (None for an
        activation), and a ``(k, 1, b)`` tensor of -1; built again when ``k`` or ``b`` changes."""
        if self._views is not None and self._views[:2] == (k, b):
            return self._views[2], self._views[3]
        p0 = self.params[0]
        n = p0.shape[0]
        views: list[_LayerViews | None] = []
        first = True
        for i, op in enumerate(self.ops):
            if op[0] != "linear":
                views.append(None)
                continue
            w = self.params[op[1]]
            out_f, in_f = w.shape[1], w.shape[2]
            out = self._buf(("out", i), (n, out_f, b), p0)[:k]
            grad_in = None if first else self._buf(("grad", i), (n, in_f, b), p0)[:k]
            bias = self.params[op[2]][:k] if op[2] >= 0 else None
            views.append(_LayerViews(w[:k], bias, w[:k].transpose(1, 2), out, out.transpose(1, 2), grad_in))
            first = False
        minus_one = self._buf(("minus_one", 0), (n, 1, b), p0).fill_(-1.0)[:k]
        self._views = (k, b, views, minus_one)
        return views, minus_one

    def _buf(self, key: tuple[str, int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or tuple(buf.shape) != shape:
            buf = self._bufs[key] = like.new_empty(shape)
        return buf

    def _forward(self, k: int, a: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits ``(k, C, B)`` of inputs ``a`` ``(k, D, B)``, and every op's saved tensor."""
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

    def loss_grad(
        self,
        k: int,
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor | None,
        inv_cnt: torch.Tensor | None,
        acc: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
        """Loss ``(k,)``, correct ``(k,)`` and gradients of the first ``k`` variants on
        inputs ``x`` ``(k, B, D)`` and labels ``y`` ``(k, B)`` (see :func:`_softmax_xent`).

        With ``acc`` (one tensor ``(k, *shape)`` per parameter) each gradient is added into
        its ``acc`` tensor by the product that computes it, and none is returned.
        """
        views, minus_one = self._at(k, x.shape[1])
        # forward; ins[i]: the input of op i transposed ((k, B, features): what its weight
        # gradient multiplies), outs[i]: its output (an activation's is its input, in place)
        a, a_t = x.transpose(1, 2), x
        ins: list[torch.Tensor] = []
        outs: list[torch.Tensor] = []
        for op, v in zip(self.ops, views, strict=True):
            ins.append(a_t)
            if v is not None:
                a = torch.baddbmm(v.b, v.w, a, out=v.out) if v.b is not None else torch.bmm(v.w, a, out=v.out)
                a_t = v.out_t
            else:
                a = _act_forward(op[1], a)
            outs.append(a)
        loss, correct, d, alpha = _softmax_xent(a, y, w, inv_cnt, scale=acc is None, minus_one=minus_one)
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        for i in range(len(self.ops) - 1, -1, -1):
            op, v = self.ops[i], views[i]
            if v is None:
                d = _act_backward(op[1], d, outs[i])
                continue
            _, wi, bi = op
            if acc is None:
                grads[wi] = torch.bmm(d, ins[i])
                if bi >= 0:
                    grads[bi] = d.sum(2, keepdim=True)
            else:
                acc[wi].baddbmm_(d, ins[i], alpha=alpha)
                if bi >= 0:
                    acc[bi].add_(d.sum(2, keepdim=True), alpha=alpha)
            if v.grad_in is not None:
                d = torch.bmm(v.wt, d, out=v.grad_in)
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
    """Gradient through an activation from its output (every supported one is monotone),
    written over ``d``."""
    aten = torch.ops.aten
    if isinstance(m, nn.ReLU):
        return aten.threshold_backward.grad_input(d, out, 0, grad_input=d)
    if isinstance(m, nn.Tanh):
        return aten.tanh_backward.grad_input(d, out, grad_input=d)
    if isinstance(m, nn.Sigmoid):
        return aten.sigmoid_backward.grad_input(d, out, grad_input=d)
    return aten.leaky_relu_backward.grad_input(d, out, m.negative_slope, True, grad_input=d)


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


@dataclass
class _Part:
    """What one part of a group learned (``m`` variants, ``t`` steps, in the part's order)."""

    final: torch.Tensor  # (m, n_params) weights after learning (a stopped one's from before its step)
    loss: np.ndarray  # (t, m) loss per step, NaN after a variant's last step
    hits: np.ndarray  # (t, m) correct predictions per step
    death: np.ndarray  # (m,) the step a variant was stopped at, -1 for none
    reasons: dict[int, str]  # why a stopped variant was stopped
    val_hits: np.ndarray  # (m,) correct predictions on the validation split


@dataclass
class _Sorted:
    """A group sorted longest first: weights ``(n, n_params)``, steps, batches per pass and
    batch-table offsets ``(n,)``, ``hyper`` ``(4, n)`` (lr, momentum, weight decay, clip), and
    the labels this call reads."""

    stacked: torch.Tensor
    steps: np.ndarray
    nb: np.ndarray
    off: np.ndarray
    hyper: np.ndarray
    y_pool: torch.Tensor


def _in_threads(jobs: list[Callable[[], T]], threads: int) -> list[T]:
    """Run ``jobs`` on up to ``threads`` threads, each with one torch thread; their results,
    in order.

    A group's matrix products are small (a few hundred kFLOP per variant and step): torch's
    intra-op threads, which meet after every op, share them badly, and stall on every op
    while another process holds one of the cores. A whole part of the group per thread
    meets once per call instead; torch lets go of the GIL inside its ops. The process's
    torch thread count is 1 meanwhile and restored after.
    """
    if threads <= 1 or len(jobs) == 1:
        return [job() for job in jobs]

    def one(job: Callable[[], T]) -> T:
        torch.set_num_threads(1)  # this thread's own OpenMP and MKL settings
        return job()

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="forkpop-engine") as pool:
            return list(pool.map(one, jobs))
    finally:
        torch.set_num_threads(saved)


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
        kernel: str = "auto",
    ):
        if plan.kind not in ("stacked", "vmap"):
            raise ValueError(f"the batched engine cannot train this model: {plan.reason}")
        if kernel not in KERNELS:
            raise ValueError(f"unknown run.kernel {kernel!r}; use one of {KERNELS}")
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
        self.native, self.kernel_reason = self._native(kernel)

    def _native(self, kernel: str) -> tuple[tuple | None, str]:
        """The native kernel and the model's layout for it, or None; and why not."""
        if kernel == "torch":
            return None, "run.kernel=torch"
        why = ""
        layout = native_layout(self.template) if self.plan.kind == "stacked" else None
        if self.device.type != "cpu":
            why = f"the native kernel is for CPUs (this group is on {self.device.type})"
        elif layout is None:
            why = "the native kernel takes Linear layers with one activation between them"
        elif self.x_pool.dtype != torch.float32:
            why = f"the native kernel takes float32 inputs, not {self.x_pool.dtype}"
        if not why:
            from forkpop.population import native

            lib, why = native.kernel()
            if lib is not None:
                self.x_pool = self.x_pool.contiguous()
                return (lib, layout), ""
        if kernel == "native":
            raise ValueError(f"run.kernel=native: {why}; use run.kernel=auto or torch")
        return None, why

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
        niche = np.asarray(niches, dtype=np.int64) % len(self.nb)
        nb = self.nb[niche]
        steps = nb * np.maximum(np.asarray(epochs, dtype=np.int64), 1)
        order = np.argsort(-steps, kind="stable")  # longest first: the learning ones are a prefix
        steps_s, nb_s, off_s = steps[order], nb[order], self.off[niche[order]]
        t_max = int(steps_s[0])
        # (4, n) in stack order: lr, momentum, weight decay, clip (0: none)
        hyper = np.stack([np.asarray(v, dtype=np.float64) for v in (lr, momentum, weight_decay, clip or [0.0] * n)])
        hyper = hyper[:, order]
        y_pool = self.y_pool if labels is None else labels.to(self.device)
        order_t = torch.from_numpy(order)
        stacked = flats.index_select(0, order_t)  # index_select / index_copy_: far cheaper than [idx]

        loss_np = np.full((t_max, n), np.nan, dtype=np.float32)
        hit_np = np.zeros((t_max, n), dtype=np.int32)
        final = torch.empty(n, flats.shape[1])
        death = np.full(n, -1, dtype=np.int64)
        dead_reason: dict[int, str] = {}
        val_hits = np.zeros(n, dtype=np.int64)
        group = _Sorted(stacked, steps_s, nb_s, off_s, hyper, y_pool)
        if self.native is not None:
            parts, results = [np.arange(n)], [self._learn_native(group)]
        else:
            parts, results = self._learn_torch(group)
        for m, part in zip(parts, results, strict=True):
            loss_np[: len(part.loss), m] = part.loss
            hit_np[: len(part.hits), m] = part.hits
            final.index_copy_(0, torch.from_numpy(m), part.final)
            death[m] = part.death
            dead_reason.update({int(m[i]): why for i, why in part.reasons.items()})
            val_hits[m] = part.val_hits

        records: list[VariantRecord] = [VariantRecord() for _ in range(n)]
        finite = torch.isfinite(final).all(1).tolist()
        loss_rows = loss_np.T.astype(np.float64)  # (n, t_max): a variant's curve is a row
        hit_rows = hit_np.T.copy()
        for s in range(n):  # s: position in the sorted stack
            rec = records[order[s]]
            ns = int(steps_s[s]) if death[s] < 0 else int(death[s])  # steps learned
            seen_steps = int(steps_s[s]) if death[s] < 0 else int(death[s]) + 1
            sizes = self.sizes[off_s[s] : off_s[s] + nb_s[s]]
            step_sizes = np.resize(sizes, seen_steps)
            rec.loss = loss_rows[s, :ns].tolist()
            rec.preq_accuracy, rec.train_accuracy = online_accuracy(hit_rows[s, :ns], step_sizes[:ns], int(nb_s[s]))
            rec.samples = int(step_sizes.sum())
            if death[s] < 0:
                rec.epoch_ends = [int(nb_s[s]) * (e + 1) for e in range(int(steps_s[s] // nb_s[s]))]
                if not finite[s]:
                    rec.status, rec.reason = "diverged", "non-finite weights after learning"
                else:
                    rec.val_accuracy = float(val_hits[s]) / len(self.y_val)
            else:
                rec.epoch_ends = [int(nb_s[s]) * (e + 1) for e in range(ns // int(nb_s[s]))] + [ns]
                rec.status, rec.reason = "diverged", dead_reason[s]
        out = torch.empty_like(final)
        out.index_copy_(0, order_t, final)
        return out, records

    def _learn_torch(self, g: _Sorted) -> tuple[list[np.ndarray], list[_Part]]:
        """The torch path: the sorted group dealt into parts (see :meth:`_n_parts`), each
        learning as stacked steps on its own thread; the parts' positions and what they learned."""
        stacked, steps_s, nb_s, off_s, hyper, y_pool = g.stacked, g.steps, g.nb, g.off, g.hyper, g.y_pool
        n = stacked.shape[0]
        # Decided for the whole group, so that no variant's arithmetic depends on its part.
        # Without clipping (which needs each whole gradient first) the stacked products add
        # the gradients straight into the decayed momentum buffers: SGD in three passes.
        fused = self.plan.kind == "stacked" and not bool((hyper[3] > 0).any())
        decayed = bool((hyper[2] != 0).any())
        # Dealt round-robin, each part stays sorted longest first and gets an even share of the steps.
        n_parts = self._n_parts(n)
        parts = [np.arange(j, n, n_parts) for j in range(n_parts)]
        jobs = [
            partial(
                self._learn_part,
                stacked.index_select(0, torch.from_numpy(m)),
                steps_s[m],
                nb_s[m],
                off_s[m],
                hyper[:, m],
                y_pool,
                fused,
                decayed,
            )
            for m in parts
        ]
        return parts, _in_threads(jobs, torch.get_num_threads())

    def _learn_native(self, g: _Sorted) -> _Part:
        """The native kernel's path (:mod:`forkpop.population.native`): each variant's whole lifetime in
        one C call, on one Python thread per torch thread (ctypes lets go of the GIL)."""
        stacked, steps_s, nb_s, off_s, hyper, y_pool = g.stacked, g.steps, g.nb, g.off, g.hyper, g.y_pool
        lib, layout = self.native
        n, t_max = stacked.shape[0], int(steps_s[0])
        final = stacked.to(torch.float32).contiguous().clone()  # each row learns in place
        loss = np.full((n, t_max), np.nan, dtype=np.float32)
        hits = np.zeros((n, t_max), dtype=np.int32)
        death = np.full(n, -1, dtype=np.int64)
        y = y_pool.to(torch.int64).contiguous()
        dims, acts, slope, bias = layout
        f32, i32 = ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_int32)
        x_p, y_p = ptr(self.x_pool, ctypes.c_float), ptr(y, ctypes.c_int64)
        table_p, cnt_p = ptr(self.table, ctypes.c_int64), ptr(self.table_cnt, ctypes.c_int64)

        def one(i: int) -> None:
            lr, mom, wd, clip = (float(v) for v in hyper[:, i])
            death[i] = lib.fp_train_variant(
                len(dims) - 1, dims, acts, slope, bias,
                ptr(final[i], ctypes.c_float), x_p, y_p, table_p, cnt_p, self.batch_size,
                int(off_s[i]), int(nb_s[i]), int(steps_s[i]),
                lr, mom, wd, clip, EXPLODED,
                loss[i].ctypes.data_as(f32), hits[i].ctypes.data_as(i32),
            )  # fmt: skip

        _in_threads([partial(one, i) for i in range(n)], torch.get_num_threads())
        if (death == -2).any():
            raise MemoryError("the native kernel could not allocate a variant's buffers")
        reasons: dict[int, str] = {}
        for i in np.nonzero(death >= 0)[0].tolist():
            t = int(death[i])
            reasons[i] = diverged_reason(t, float(loss[i, t]), max(float(loss[i, 0]), 1e-3))
            loss[i, t:] = np.nan
            hits[i, t:] = 0
        with torch.no_grad():
            val_hits = (_LinearStack(self.template, final).logits(self.x_val).argmax(-1) == self.y_val).sum(1).numpy()
        return _Part(final, loss.T.copy(), hits.T.copy(), death, reasons, val_hits)

    def _n_parts(self, n: int) -> int:
        """How many parts a group of ``n`` learns in: for a ``stacked`` model on a CPU at
        least one per torch thread and at most :data:`MAX_PART` variants each, but never
        fewer than :data:`MIN_PART`; else one (on a GPU one stream does it all, and
        torch.func's ``functional_call`` swaps the parameters of the one shared module while
        it runs, so it runs on one thread)."""
        if self.device.type != "cpu" or self.plan.kind != "stacked":
            return 1
        wanted = max(torch.get_num_threads(), -(-n // MAX_PART))
        return max(1, min(wanted, n // MIN_PART))

    def _learn_part(
        self,
        flats: torch.Tensor,
        steps_s: np.ndarray,
        nb_s: np.ndarray,
        off_s: np.ndarray,
        hyper: np.ndarray,
        y_pool: torch.Tensor,
        fused: bool,
        decayed: bool,
    ) -> _Part:
        """Learn one part of a group: ``flats`` ``(m, n_params)`` sorted by ``steps_s`` (longest
        first) with their niches' batch counts ``nb_s`` and table offsets ``off_s`` ``(m,)`` and
        ``hyper`` ``(4, m)`` (lr, momentum, weight decay, clip). ``fused``: the SGD step goes
        into the backward (no clipping in the group); ``decayed``: some weight decay is not 0."""
        dev, bsz = self.device, self.batch_size
        m = flats.shape[0]
        t_max = int(steps_s[0])
        active = np.searchsorted(-steps_s, -np.arange(t_max), side="left")  # variants with steps > t
        short = self._short_steps(off_s, nb_s, steps_s, t_max)

        stack_cls = _LinearStack if self.plan.kind == "stacked" else _FuncStack
        stack = stack_cls(self.template, flats.to(dev, torch.float32))
        params = stack.params
        bufs = [torch.zeros_like(p) for p in params]
        lr_d, mom_d, wd_d, clip_d = (torch.tensor(v, dtype=torch.float32, device=dev) for v in hyper)
        clipped = bool((hyper[3] > 0).any())

        def shaped(v: torch.Tensor, k: int) -> list[torch.Tensor]:
            return [v[:k].view(-1, *([1] * (p.dim() - 1))) for p in params]

        off_d = torch.from_numpy(off_s).to(dev)
        nb_d = torch.from_numpy(nb_s).to(dev)
        # The batches' sample indices, a block of steps at a time: a step takes a view, no op.
        block = max(1, min(64, (1 << 22) // (m * bsz)))
        dead = torch.zeros(m, dtype=torch.bool, device=dev)
        thr = torch.full((m,), math.inf, device=dev)
        losses: list[torch.Tensor] = []  # per step (k,), stacked once at the end
        hits: list[torch.Tensor] = []
        death = np.full(m, -1, dtype=np.int64)
        reasons: dict[int, str] = {}
        snapshots: dict[int, torch.Tensor] = {}
        arange_b = torch.arange(bsz, device=dev)
        # inputs and labels go to buffers kept from step to step (with index_select: far
        # cheaper than x_pool[idx]); y as (k, 1, B), the shape the loss gathers with
        x_buf = self.x_pool.new_empty(m * bsz, self.x_pool.shape[1])
        y_buf = y_pool.new_empty(m * bsz)
        k_views = -1
        with torch.no_grad():
            for t in range(t_max):
                k = int(active[t])
                if k != k_views:  # the first k variants' views, taken again when one finishes
                    k_views = k
                    pk, bk = [p[:k] for p in params], [b[:k] for b in bufs]
                    lr_k, mom_k, wd_k = shaped(lr_d, k), shaped(mom_d, k), shaped(wd_d, k)
                    x_k, y_k = x_buf[: k * bsz], y_buf[: k * bsz]
                    x, y = x_k.view(k, bsz, -1), y_k.view(k, 1, bsz)
                    thr_k, dead_k = thr[:k], dead[:k]
                j = t % block
                if j == 0:
                    ts = torch.arange(t, min(t + block, t_max), device=dev)
                    rows_blk = torch.remainder(ts.unsqueeze(1), nb_d).add_(off_d)  # (T, m) table rows
                    idx_blk = self.table[rows_blk].view(len(ts), -1).unbind(0)  # T x (m * B,) samples
                torch.index_select(self.x_pool, 0, idx_blk[j][: k * bsz], out=x_k)
                torch.index_select(y_pool, 0, idx_blk[j][: k * bsz], out=y_k)
                w = inv = None
                if short[t]:
                    cnt = self.table_cnt.index_select(0, rows_blk[j, :k])
                    w = (arange_b < cnt.unsqueeze(1)).to(x.dtype)
                    inv = 1.0 / cnt.to(x.dtype)
                if fused:
                    # b <- momentum * b + weight_decay * p, then the backward adds the gradient
                    torch._foreach_mul_(bk, mom_k)
                    if decayed:
                        torch._foreach_addcmul_(bk, wd_k, pk)
                    loss, correct, grads = stack.loss_grad(k, x, y, w, inv, acc=bk)
                else:
                    # (torch.func ignores no_grad)
                    loss, correct, grads = stack.loss_grad(k, x, y.view(k, bsz), w, inv)
                bad = None  # the variants to stop at this step, before its update (rare)
                if t == 0:
                    thr.copy_(loss.clamp(min=1e-3).mul_(EXPLODED))
                    bad = ~torch.isfinite(loss)
                # One test and one sync for the common step: a cross-entropy is never -inf, so
                # ``loss <= thr`` fails exactly on the NaN, +inf and exploded ones.
                elif not bool((loss <= thr_k).logical_or_(dead_k).all()):
                    bad = ~(torch.isfinite(loss) & (loss <= thr_k))
                if bad is not None:
                    bad &= ~dead_k
                    for i in torch.nonzero(bad).flatten().tolist():
                        death[i] = t
                        reasons[i] = diverged_reason(t, float(loss[i]), float(thr[i]) / EXPLODED)
                        snapshots[i] = torch.cat([p[i].reshape(-1) for p in params])
                    dead_k |= bad
                if not fused:
                    if clipped:
                        norm = torch.sqrt(sum(gr.reshape(k, -1).pow(2).sum(1) for gr in grads))
                        coef = torch.clamp(clip_d[:k] / (norm + 1e-6), max=1.0)
                        coef = torch.where(clip_d[:k] > 0, coef, torch.ones_like(coef))
                        torch._foreach_mul_(grads, shaped(coef, k))
                    # g <- g + weight_decay * p; b <- momentum * b + g (the loop's order)
                    torch._foreach_addcmul_(grads, wd_k, pk)
                    torch._foreach_mul_(bk, mom_k)
                    torch._foreach_add_(bk, grads)
                torch._foreach_addcmul_(pk, lr_k, bk, value=-1.0)
                losses.append(loss)
                hits.append(correct)

            final = torch.cat([p.reshape(m, -1) for p in params], 1)
            for i, snap in snapshots.items():
                final[i] = snap
            val_hits = (stack.logits(self.x_val).argmax(-1) == self.y_val).sum(1).cpu().numpy()
        # the steps' values, row t holding the first active[t] variants' (NaN / 0 after)
        learning = np.arange(m)[None, :] < active[:, None]
        loss_np = np.full((t_max, m), np.nan, dtype=np.float32)
        hit_np = np.zeros((t_max, m), dtype=np.int32)
        loss_np[learning] = torch.cat(losses).cpu().numpy()
        hit_np[learning] = torch.cat(hits).cpu().numpy()
        return _Part(final.cpu(), loss_np, hit_np, death, reasons, val_hits)

    def _short_steps(self, off_s: np.ndarray, nb_s: np.ndarray, steps_s: np.ndarray, t_max: int) -> np.ndarray:
        """Per step: does any learning variant get a batch shorter than batch_size?"""
        short = np.zeros(t_max, dtype=bool)
        last = self.sizes[off_s + nb_s - 1]
        for s in np.nonzero(last < self.batch_size)[0]:
            short[np.arange(nb_s[s] - 1, steps_s[s], nb_s[s])] = True
        return short
