"""The label-budget world's ground: drifting unlabelled streams, the oracle, the label ledger.

A niche of the label-budget world arrives as a stream of inputs whose class mix drifts: its
classes are dealt into phases (one deal for the whole world by default, the phases' timing
differing per niche; or a deal per niche), and each stretch of the stream draws mostly from
its phase's classes. Labels are not in the stream. A small share arrives
free; every other label is bought from the :class:`Oracle` out of a per-lifetime budget. The
oracle is the only path to a label, and every label any part of a run reads (free, queried,
and those of the validation and acceptance splits) is written in the :class:`LabelLedger`,
which the run records. The test split's labels never pass through it: they are reported only.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("free", "query", "validation", "acceptance")


def deal_classes(classes: np.ndarray, phases: int, rng: np.random.Generator) -> dict[int, int]:
    """The phase of each class: ``classes`` dealt at random into ``phases`` groups."""
    order = rng.permutation(np.asarray(classes))
    return {int(c): i % phases for i, c in enumerate(order)}


def drift_order(
    labels: np.ndarray,
    rows: np.ndarray,
    phases: int,
    rng: np.random.Generator,
    purity: float = 1.0,
    deal: dict[int, int] | None = None,
    jitter: float = 0.0,
) -> np.ndarray:
    """``rows`` (indices into ``labels``) reordered into a drifting stream.

    The classes present are dealt into ``phases`` groups (at random here, or as ``deal``
    gives: one deal for a whole world, whose niches then drift alike); the stream is cut into
    ``phases`` stretches, of equal length or, with ``jitter``, each boundary moved by up to
    ``jitter`` of a stretch (the phases' timing differs per niche), and a stretch takes its
    samples from its group's classes with probability ``purity`` (from the others
    otherwise), for as long as either has samples left. The default, 1, is "some classes
    early, others late": what arrives in one phase says nothing of the next one's classes.
    Within that, the order is random. ``phases=1`` is a plain shuffle.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if phases < 1:
        raise ValueError(f"budget.phases must be >= 1 (got {phases})")
    if not 0.0 <= purity <= 1.0:
        raise ValueError(f"budget.purity must be in [0, 1] (got {purity})")
    rows = rows[rng.permutation(len(rows))]
    if phases == 1 or len(rows) == 0:
        return rows
    group_of = deal if deal is not None else deal_classes(np.unique(labels[rows]), phases, rng)
    pools = [[int(r) for r in rows if group_of.get(int(labels[r]), 0) == p] for p in range(phases)]
    out: list[int] = []
    cuts = np.linspace(0, 1, phases + 1)
    if jitter > 0:
        cuts[1:-1] += rng.uniform(-jitter, jitter, phases - 1) / phases
    bounds = (cuts * len(rows)).round().astype(int)
    for p in range(phases):
        for _ in range(bounds[p + 1] - bounds[p]):
            own = pools[p]
            others = [q for q in range(phases) if q != p and pools[q]]
            take_own = own and (not others or rng.random() < purity)
            src = own if take_own else pools[others[int(rng.integers(len(others)))]]
            out.append(src.pop())
    return np.asarray(out, dtype=np.int64)


class BudgetExhausted(RuntimeError):
    """A query past the lifetime's budget: the caller asked for a label it cannot pay for."""


@dataclass
class LabelLedger:
    """Every label a run read, by kind (``free``, ``query``, ``validation``, ``acceptance``)
    and by whom; ``counts()`` is what the run records."""

    entries: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, reader, row)

    def add(self, kind: str, reader: str, rows: Sequence[int]) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown label kind {kind!r}; one of {KINDS}")
        self.entries.extend((kind, reader, int(r)) for r in rows)

    def counts(self) -> dict[str, int]:
        c = Counter(kind for kind, _, _ in self.entries)
        return {k: c.get(k, 0) for k in KINDS}

    def by_reader(self, kind: str) -> dict[str, int]:
        return dict(Counter(reader for k, reader, _ in self.entries if k == kind))

    def merge(self, other: LabelLedger) -> None:
        self.entries.extend(other.entries)


class Oracle:
    """The only path to the labels of one niche's stream during one lifetime.

    ``stream`` is the niche's rows in arrival order; ``labels`` the pool's labels (the oracle
    never sees the test split's). ``free`` of the stream's positions carry their label free
    (chosen by ``rng`` among the stream, at least one when ``free_share > 0``); ``budget`` is
    the number of queries the lifetime may make. Every label handed out goes to ``ledger``
    under ``reader``. A row is paid for once: asking again for a label already read is free.
    """

    def __init__(
        self,
        labels: np.ndarray,
        stream: np.ndarray,
        budget: int,
        free_share: float,
        rng: np.random.Generator,
        ledger: LabelLedger,
        reader: str,
    ):
        if budget < 0:
            raise ValueError(f"a budget is >= 0 labels (got {budget})")
        self._labels = labels
        self.stream = np.asarray(stream, dtype=np.int64)
        self.budget = int(budget)
        n_free = 0 if free_share <= 0 else max(1, int(round(free_share * len(self.stream))))
        pos = np.sort(rng.choice(len(self.stream), size=min(n_free, len(self.stream)), replace=False))
        self.free_positions = frozenset(int(p) for p in pos)
        self.ledger, self.reader = ledger, reader
        self.spent = 0
        self.known: dict[int, int] = {}  # row -> label read this lifetime
        self.spent_at: list[int] = []  # the stream position of each query, in order

    @property
    def left(self) -> int:
        return self.budget - self.spent

    def free(self, position: int) -> int | None:
        """The label at stream ``position`` if it arrives free (None otherwise)."""
        if position not in self.free_positions:
            return None
        row = int(self.stream[position])
        if row not in self.known:
            self.known[row] = int(self._labels[row])
            self.ledger.add("free", self.reader, [row])
        return self.known[row]

    def query(self, position: int) -> int:
        """Buy the label at stream ``position`` (raises :class:`BudgetExhausted` past the budget)."""
        row = int(self.stream[position])
        if row in self.known:
            return self.known[row]
        if self.spent >= self.budget:
            raise BudgetExhausted(f"{self.reader}: budget of {self.budget} labels spent (position {position})")
        self.spent += 1
        self.spent_at.append(int(position))
        self.known[row] = int(self._labels[row])
        self.ledger.add("query", self.reader, [row])
        return self.known[row]


def budget_labels(share: float, niche_size: int) -> int:
    """A lifetime's query budget: ``share`` of the niche, rounded, at least 1 when share > 0."""
    if share < 0:
        raise ValueError(f"budget.share must be >= 0 (got {share})")
    return 0 if share == 0 else max(1, int(round(share * niche_size)))


# -- a one-learner reference (scikit-learn's logistic regression, refit on what it holds) -----


REFERENCE_POLICIES = ("fixed_a", "greedy_b", "paced_b", "random")


def fit_reference(x: np.ndarray, y: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(y)) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LogisticRegression(max_iter=500, C=1.0).fit(x, y)


def _margin(model, x: np.ndarray) -> float:
    if model is None:
        return 0.0
    p = np.sort(model.predict_proba(x[None])[0])
    return float(p[-1] - (p[-2] if len(p) > 1 else 0.0))


def reference_stream(policy: str, x, labels, stream, budget: int, seed: list[int], ledger: LabelLedger, reader):
    """One logistic regression's pass over ``stream`` with ``policy`` (``fixed_a``, ``greedy_b``,
    ``paced_b``: the least confident input of each stretch of len(stream) / budget arrivals,
    ``random``), refit whenever it gains a label; returns the labelled rows it ends with.
    ``seed`` draws the free labels' positions (the same for every policy and budget) and,
    apart, the random policy's choices."""
    free_rng, rng = np.random.default_rng([*seed, 1]), np.random.default_rng([*seed, 2])
    oracle = Oracle(labels, stream, budget if policy != "fixed_a" else 0, 0.01, free_rng, ledger, reader)
    held: dict[int, int] = {}
    model = None
    n = len(stream)
    stretch = max(1, n // max(budget, 1))
    best_pos, best_margin = -1, np.inf
    for t, row in enumerate(stream):
        before = len(held)
        lab = oracle.free(t)
        if lab is not None:
            held[int(row)] = lab
        elif policy == "greedy_b" and oracle.left > 0:
            held[int(row)] = oracle.query(t)
        elif policy == "random" and oracle.left > 0 and rng.random() < budget / n:
            held[int(row)] = oracle.query(t)
        elif policy == "paced_b":
            m = _margin(model, x[row])
            if m < best_margin:
                best_pos, best_margin = t, m
            if (t + 1) % stretch == 0 and oracle.left > 0 and best_pos >= 0:
                held[int(stream[best_pos])] = oracle.query(best_pos)
                best_pos, best_margin = -1, np.inf
        if len(held) > before:  # refit on what it holds now
            rows = np.fromiter(held, dtype=np.int64)
            model = fit_reference(x[rows], labels[rows])
    assert oracle.spent <= budget
    return np.fromiter(held, dtype=np.int64)


def spread_labels(x: np.ndarray, labels: np.ndarray, held: np.ndarray, x_new: np.ndarray, fallback=None) -> np.ndarray:
    """Label spreading (scikit-learn's, a 7-nearest-neighbour graph over ``x``) from the
    ``held`` rows' labels; predictions for ``x_new``. A new input the graph does not reach
    takes ``fallback``'s prediction (a fitted classifier), else the most common held label."""
    from sklearn.semi_supervised import LabelSpreading

    y = np.full(len(x), -1, dtype=np.int64)
    y[held] = labels[held]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=1000).fit(x, y)
        proba = model.predict_proba(x_new)
    out = model.classes_[np.nan_to_num(proba, nan=-1.0).argmax(1)]
    lost = ~np.isfinite(proba).all(1) | (proba.sum(1) <= 0)
    if lost.any():
        out[lost] = fallback.predict(x_new[lost]) if fallback is not None else np.bincount(labels[held]).argmax()
    return out


def reference_accuracy(
    data, share: float, policy: str = "paced_b", phases: int = 2, seed: int = 0, deal: dict[int, int] | None = None
) -> dict[str, float]:
    """Test accuracy of one learner over one drifting stream of the whole pool (its classes
    dealt into phases as ``deal`` gives, the world's, or at random), buying ``share`` of it
    with ``policy`` (a logistic regression, refit on what it holds, chooses the queries): the
    pooled reference of the label-budget study. Of the one pass, two learners: ``spreading``,
    label spreading over the whole pool's inputs from the labels bought (:func:`spread_labels`),
    and ``logistic``, the logistic regression alone. The test split is read only for this report."""
    rows = np.concatenate(list(data.niches))
    stream = drift_order(data.y_pool, rows, phases, np.random.default_rng([seed, 99]), deal=deal)
    held = reference_stream(policy, data.x_pool, data.y_pool, stream, budget_labels(share, len(stream)), [seed, 99],
                            LabelLedger(), "pooled")  # fmt: skip
    model = fit_reference(data.x_pool[held], data.y_pool[held])
    if model is None:
        return {"spreading": 0.0, "logistic": 0.0}
    spread = spread_labels(data.x_pool, data.y_pool, held, data.x_test, fallback=model)
    return {
        "spreading": float((spread == data.y_test).mean()),
        "logistic": float((model.predict(data.x_test) == data.y_test).mean()),
    }
