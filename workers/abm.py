"""One lifetime on a label-budget stream: System A (observe), B (act) and M (the switch).

A variant reads its niche's stream (:func:`forkpop.workers.budget.drift_order`) once, an
input at a time. At each arrival its meta-controller, System M, chooses from signals the
variant computes itself:

- **observe** (System A): learn without paying, from a pseudo-label: the variant's own
  prediction where it is confident, else the label of the nearest input it holds a label
  for, if that one is within ``neighbour`` times the stream's mean nearest-neighbour distance
  (a neighbour method over what it has seen; farther, the arrival teaches nothing itself);
- **act** (System B): buy the arriving input's label from the :class:`~forkpop.workers.budget.Oracle`.

A free label, when one arrives, is always taken. Every labelled arrival is one SGD step on a
small batch: the arrival and up to ``replay - 1`` earlier labels drawn from all it holds
(bought or free; pseudo-labels are never replayed), so that an early phase is not forgotten.

The signals, each in about [0, 1]: ``margin`` (top-1 minus top-2 probability of the arrival),
``novelty`` (its distance to the nearest input seen, over the running mean of such
distances, halved and capped at 1), ``unlabelled`` (the same for its distance to the nearest
input it holds a label for: how far the arrival is from what it knows), ``uncovered`` (1 when
the class it predicts for the arrival is one it holds no label of, else 0), ``progress`` (how
much the predictions on a fixed probe, which the variant cannot choose, moved since the last
arrival, scaled), ``surprise`` (the loss on the last free label, over log C), ``budget_left``
and ``time`` (the share of the stream read). :class:`Controller` is M as genes: a score
``bias + sum(w * signal)`` that decides how far ahead of, or behind, an even pace to buy.
The fixed policies the study compares it with are :data:`POLICIES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from forkpop.population.models import linear_chain, load_flat_weights
from forkpop.workers.budget import Oracle
from forkpop.workers.engine import _act_backward
from torch import nn

SIGNALS = ("margin", "novelty", "unlabelled", "uncovered", "progress", "surprise", "budget_left", "time")


@dataclass
class Controller:
    """System M: a score ``bias + sum(weights[i] * signal[i])`` over ``signals`` (by default
    :data:`SIGNALS`) whose numbers are genes (``m_bias``, ``m_margin``, ...): mutated,
    inherited and selected like the others.

    In the label-budget world (``__call__``) M holds an urge to buy, one label's worth at birth,
    that each arrival raises by the pace (the budget over the arrivals that are not free). An
    arrival is bought when the urge has reached ``1 - bias + delay``, and the urge drops by 1:
    ``bias`` (gene ``m_bias``) sets how far ahead of the pace M spends (a high one buys
    everything at once, as greedy-B; a low one buys nothing, as fixed-A), and ``delay =
    max(0, wait + sum(weights[i] * signal[i]))`` (genes ``m_wait`` and the signals' ``m_*``)
    how long it waits for a better arrival: a positive ``m_margin`` waits past confident ones.
    All genes at 0 buy the first arrival and then at an even pace; ``m_margin = 2, m_wait = -1``
    is paced-B's choice of unsure arrivals (margin under 0.5), up to one label behind the pace.
    One controller per lifetime (it holds the urge; :func:`live` resets it). The environment
    world's M acts when ``bias + sum(weights[i] * signal[i]) > 0``."""

    weights: tuple[float, ...]
    bias: float = 0.0
    signals: tuple[str, ...] = SIGNALS
    urge: float = field(default=1.0, compare=False)
    wait: float = 0.0

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.signals):
            raise ValueError(f"a controller weighs {len(self.signals)} signals {self.signals}, got {len(self.weights)}")

    @classmethod
    def from_genome(cls, genome: dict[str, float], signals: tuple[str, ...] = SIGNALS) -> Controller:
        return cls(
            tuple(float(genome.get(f"m_{s}", 0.0)) for s in signals),
            float(genome.get("m_bias", 0.0)),
            signals,
            wait=float(genome.get("m_wait", 0.0)),
        )

    def reset(self) -> None:
        """A new lifetime: the urge of one label (the first is bought at once, as paced-B does:
        a label held early teaches in every later step)."""
        self.urge = 1.0

    def weighed(self, s: dict[str, float]) -> float:
        """``sum(weights[i] * signal[i])``."""
        return sum(w * s[k] for w, k in zip(self.weights, self.signals, strict=True))

    def score(self, s: dict[str, float]) -> float:
        return self.bias + self.weighed(s)

    def __call__(self, s: dict[str, float], t: int, n: int, oracle: Oracle, rng: np.random.Generator) -> bool:
        self.urge += oracle.budget / max(n - len(oracle.free_positions), 1)  # the arrivals M decides on
        delay = max(0.0, self.wait + self.weighed(s))
        if self.urge >= 1.0 - self.bias + delay - 1e-9:
            self.urge -= 1.0
            return True
        return False


Policy = Callable[[dict, int, int, Oracle, np.random.Generator], bool]


def fixed_a(s: dict, t: int, n: int, oracle: Oracle, rng: np.random.Generator) -> bool:
    return False


def greedy_b(s: dict, t: int, n: int, oracle: Oracle, rng: np.random.Generator) -> bool:
    return True


def paced_b(s: dict, t: int, n: int, oracle: Oracle, rng: np.random.Generator, margin: float = 0.5) -> bool:
    """Buy an unsure arrival (margin under ``margin``) while the spending keeps to the pace
    budget * (t + 1) / n; an arrival that finds the pace ahead of the spending is bought anyway."""
    pace = oracle.budget * (t + 1) / n
    return oracle.spent < pace and (s["margin"] < margin or oracle.spent + 1 < pace)


def random_b(s: dict, t: int, n: int, oracle: Oracle, rng: np.random.Generator) -> bool:
    return bool(rng.random() < oracle.budget / max(n, 1))


STRATEGIES = ("margin", "unlabelled", "pace")


class Exp3:
    """A bandit over query strategies, paced (ALBL-style: EXP3 with exploration floor ``gamma``
    over the strategies, Hsu and Lin's "active learning by learning").

    The arms are :data:`STRATEGIES`: ``margin`` buys an unsure arrival (margin under 0.5),
    ``unlabelled`` one far from every input it holds a label for (signal over 0.5), ``pace``
    the first arrival the pace allows. As paced-B, it buys only while the spending is behind
    the pace ``budget * (t + 1) / n``, and buys anyway once it is a label behind. An arm is
    drawn after each purchase and held until the next; its reward is the learning progress on
    the probe that the label it bought led to (in [0, 1]), over the arm's probability."""

    def __init__(self, gamma: float = 0.2, strategies: tuple[str, ...] = STRATEGIES):
        self.gamma, self.strategies = gamma, strategies
        self.reset()

    def probs(self) -> np.ndarray:
        k = len(self.w)
        return (1 - self.gamma) * self.w / self.w.sum() + self.gamma / k

    def reset(self) -> None:
        """A new lifetime: the strategies' weights from scratch, no arm drawn, no reward owed."""
        self.w = np.ones(len(self.strategies))
        self.arm: int | None = None
        self.p_arm = 0.0
        self.rewarding: tuple[int, float] | None = None

    def _wants(self, strategy: str, s: dict) -> bool:
        if strategy == "margin":
            return s["margin"] < 0.5
        if strategy == "unlabelled":
            return s["unlabelled"] > 0.5
        return True

    def __call__(self, s: dict, t: int, n: int, oracle: Oracle, rng: np.random.Generator) -> bool:
        if self.rewarding is not None:  # the progress the last label bought led to
            arm, p_arm = self.rewarding
            self.w[arm] *= math.exp(self.gamma * min(1.0, s["progress"]) / (len(self.w) * p_arm))
            self.w /= self.w.max()
            self.rewarding = None
        if self.arm is None:
            p = self.probs()
            self.arm = int(rng.choice(len(p), p=p))
            self.p_arm = float(p[self.arm])
        pace = oracle.budget * (t + 1) / n
        if oracle.spent >= pace:
            return False
        if self._wants(self.strategies[self.arm], s) or oracle.spent + 1 < pace:
            self.rewarding, self.arm = (self.arm, self.p_arm), None
            return True
        return False


POLICIES: dict[str, Callable[[], Policy]] = {
    "fixed_a": lambda: fixed_a,
    "greedy_b": lambda: greedy_b,
    "paced_b": lambda: paced_b,
    "random": lambda: random_b,
    "bandit": Exp3,
}


@dataclass
class Lifetime:
    """What one lifetime did: its weights after, the mode per arrival (``A``, ``B``, or ``F``
    where a free label arrived), the stream positions where budget was spent, and the signals
    M saw (``(n, len(SIGNALS))``)."""

    weights: torch.Tensor
    modes: list[str] = field(default_factory=list)
    spent_at: list[int] = field(default_factory=list)
    signals: np.ndarray | None = None

    @property
    def switches(self) -> int:
        """Changes between observing and acting (free arrivals do not count)."""
        m = [x for x in self.modes if x in "AB"]
        return sum(a != b for a, b in zip(m, m[1:], strict=False))

    def late_share(self) -> float:
        """Share of the budget spent after the stream's midpoint."""
        if not self.spent_at:
            return 0.0
        half = len(self.modes) / 2
        return sum(p >= half for p in self.spent_at) / len(self.spent_at)


class _ChainStep:
    """One SGD step of a Linear / activation chain with its gradient written out (no autograd:
    on a model this small a step is mostly the autograd engine's overhead). The loss is
    :func:`live`'s: the weighted cross-entropy of the labelled rows plus ``anchor`` times the
    soft cross-entropy of the anchor's rows against their targets."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = [m for m in layers if not isinstance(m, nn.Identity)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, k: int, soft: torch.Tensor | None,
                 anchor: float, lr: float) -> None:  # fmt: skip
        acts = [x]
        for m in self.layers:
            acts.append(m(acts[-1]))
        z = acts[-1]
        g = F.softmax(z, 1)
        g[:k] -= F.one_hot(y, z.shape[1]).to(g.dtype)
        g[:k] *= (w / w.sum())[:, None]
        if soft is not None:
            g[k:] -= soft
            g[k:] *= anchor / len(soft)
        for i in range(len(self.layers) - 1, -1, -1):
            m = self.layers[i]
            if isinstance(m, nn.Linear):
                g_in = g @ m.weight if i else None
                m.weight.sub_(g.T @ acts[i], alpha=lr)
                if m.bias is not None:
                    m.bias.sub_(g.sum(0), alpha=lr)
                g = g_in
            else:  # the engine's activation backward, from the activation's output
                g = _act_backward(m, g, acts[i + 1])


def live(
    model: nn.Module,
    weights: torch.Tensor,
    x: torch.Tensor,
    oracle: Oracle,
    policy: Policy,
    probe: torch.Tensor,
    rng: np.random.Generator,
    *,
    lr: float = 0.05,
    replay: int = 16,
    confident: float = 0.9,
    observe_weight: float = 0.5,
    anchor: float = 0.0,
    neighbour: float = math.inf,
    fed_signals: np.ndarray | None = None,
) -> Lifetime:
    """One lifetime of ``model`` from ``weights`` over the stream ``x[oracle.stream]``.

    ``probe`` is the fixed input set learning progress is measured on. ``fed_signals``
    ``(n, len(SIGNALS))`` is what M sees instead of the variant's own signals: a lifetime's
    recorded signals in another order are the shuffled-signal control, which keeps each
    signal's distribution and breaks its timing.
    """
    load_flat_weights(model, weights)
    if hasattr(policy, "reset"):  # a policy with a state (M's urge) starts each lifetime afresh
        policy.reset()
    params = list(model.parameters())
    stream = oracle.stream
    n = len(stream)
    xs = x[torch.from_numpy(stream)]
    # rows are independent (no batch statistics): one forward may serve several purposes
    merge = not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    layers = linear_chain(model)
    chain = _ChainStep(layers) if layers is not None else None
    with torch.no_grad():
        dist = torch.cdist(xs, xs).numpy()  # the stream's inputs, pairwise: novelty and nearest label
        probe_p = F.softmax(model(probe), 1)
        born_p = F.softmax(model(xs), 1) if anchor > 0 else None  # what it knew at birth, on its stream
        p_next = F.softmax(model(xs[:1]), 1)[0]
    held_pos: list[int] = []  # stream positions of the labels held (free or bought)
    held_y: list[int] = []
    held_classes: set[int] = set()
    dist_mean, surprise = 1.0, 0.0
    out = Lifetime(weights=weights, signals=np.zeros((n, len(SIGNALS))))
    progress = 0.0
    sigs = out.signals
    n_probe = len(probe)
    for t in range(n):
        p = p_next
        top = torch.topk(p, 2).values
        if t:  # the inputs seen so far are the stream's first t
            d = float(dist[t, :t].min())
            novelty = min(1.0, d / (2 * dist_mean))
            dist_mean += (d - dist_mean) / t
        else:
            novelty = 1.0
        if held_pos:
            d_held = dist[t, held_pos]
            unlabelled = min(1.0, float(d_held.min()) / (2 * dist_mean))
        else:
            d_held, unlabelled = None, 1.0
        s = {
            "margin": float(top[0] - top[1]),
            "novelty": novelty,
            "unlabelled": unlabelled,
            "uncovered": float(int(p.argmax()) not in held_classes),
            "progress": min(1.0, progress),
            "surprise": surprise,
            "budget_left": oracle.left / max(oracle.budget, 1),
            "time": t / n,
        }
        sigs[t] = [s[k] for k in SIGNALS]
        label = oracle.free(t)
        if label is not None:
            mode, weight = "F", 1.0
            with torch.no_grad():
                surprise = min(1.0, float(-torch.log(p[label].clamp_min(1e-12))) / math.log(len(p)))
        else:
            seen_s = s if fed_signals is None else dict(zip(SIGNALS, map(float, fed_signals[t]), strict=True))
            act = oracle.left > 0 and policy(seen_s, t, n, oracle, rng)
            if act:
                mode, weight, label = "B", 1.0, oracle.query(t)
            else:
                mode, weight = "A", observe_weight
                if float(top[0]) >= confident or d_held is None:
                    label = int(p.argmax())
                elif float(d_held.min()) <= neighbour * dist_mean:
                    label = held_y[int(d_held.argmin())]
                else:  # unsure, and no label near: the arrival teaches nothing itself
                    label, weight = int(p.argmax()), 0.0
        out.modes.append(mode)
        # replayed: drawn from every label held, so that early phases are not forgotten
        pick = rng.choice(len(held_pos), size=min(replay - 1, len(held_pos)), replace=False) if held_pos else []
        rows = [t] + [held_pos[i] for i in pick]
        by = torch.tensor([label] + [held_y[i] for i in pick])
        w = torch.tensor([weight] + [1.0] * (len(rows) - 1))
        seen = rng.choice(t + 1, size=min(replay, t + 1), replace=False) if born_p is not None else None
        if chain is not None:  # the same step, its gradient written out
            with torch.no_grad():
                both = np.concatenate([rows, seen]) if seen is not None else np.asarray(rows)
                soft = born_p[torch.from_numpy(seen)] if seen is not None else None
                chain(xs[torch.from_numpy(both)], by, w, len(rows), soft, anchor, lr)
        else:
            _autograd_step(model, params, xs, rows, by, w, seen, born_p, anchor, lr, merge)
        if mode != "A":
            held_pos.append(t)
            held_y.append(label)
            held_classes.add(label)
        with torch.no_grad():  # the probe after this step, and the next arrival's prediction
            nxt = xs[min(t + 1, n - 1) : min(t + 1, n - 1) + 1]
            if merge:
                both = F.softmax(model(torch.cat([probe, nxt])), 1)
                new_p, p_next = both[:n_probe], both[n_probe]
            else:
                new_p, p_next = F.softmax(model(probe), 1), F.softmax(model(nxt), 1)[0]
            progress = float((new_p - probe_p).abs().sum(1).mean()) * 10.0
            probe_p = new_p
    out.spent_at = list(oracle.spent_at)
    out.weights = torch.nn.utils.parameters_to_vector(params).detach().clone()
    return out


def _autograd_step(model, params, xs, rows, by, w, seen, born_p, anchor, lr, merge) -> None:
    """:func:`live`'s SGD step through autograd (any model; a Linear chain takes :class:`_ChainStep`)."""
    if seen is not None and merge:  # the batch and the anchor's inputs in one forward
        logits = model(xs[torch.from_numpy(np.concatenate([rows, seen]))])
        own, back = logits[: len(rows)], logits[len(rows) :]
    else:
        own = model(xs[torch.tensor(rows)])
        back = model(xs[torch.from_numpy(seen)]) if seen is not None else None
    loss = (F.cross_entropy(own, by, reduction="none") * w).sum() / w.sum()
    if back is not None:  # consistency with its birth self on inputs seen so far (learning without forgetting)
        loss = loss + anchor * F.cross_entropy(back, born_p[torch.from_numpy(seen)])
    for q in params:
        q.grad = None
    loss.backward()
    with torch.no_grad():  # plain SGD (no momentum, no decay)
        for q in params:
            if q.grad is not None:
                q.sub_(q.grad, alpha=lr)
