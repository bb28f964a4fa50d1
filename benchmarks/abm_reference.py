"""Does timing matter on the label-budget world's streams? A one-learner reference.

    python benchmarks/abm_reference.py [--partitions 0,1,2,3,4] [--budgets 0.05,0.1] [--phases 2]
                                       [--niches 1] [--json PATH]

One learner (scikit-learn's logistic regression, refit on the labels it holds) reads each
niche's drifting stream (:func:`forkpop.workers.budget.drift_order`) once, with 1 % of the
labels free and the rest bought from the :class:`~forkpop.workers.budget.Oracle` under a
budget of each ``--budgets`` share of the niche. Policies:

- ``fixed_a``: the free labels only;
- ``greedy_b``: buy every arriving label until the budget is gone;
- ``paced_b``: buy the least confident input (smallest margin between the top two classes)
  of each stretch of ``len(stream) / budget`` arrivals, so the budget lasts the stream;
- ``random``: buy each arriving label with probability budget / stream length.

Reported per partition (``data.seed``) and budget: the final model's test accuracy (the test
split is read only here, for the report) and the labels read, from the oracle's ledger. With
``--niches 1`` the stream is the whole training pool, as the issue's reference measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.workers import DataSpec, load_data  # noqa: E402
from forkpop.workers.budget import LabelLedger, Oracle, budget_labels, drift_order  # noqa: E402

POLICIES = ("fixed_a", "greedy_b", "paced_b", "random")


def _fit(x: np.ndarray, y: np.ndarray, n_classes: int):
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


def run_stream(policy: str, x, labels, stream, budget: int, seed: list[int], ledger: LabelLedger, reader):
    """One pass over ``stream``; returns the labelled rows the learner ends with. ``seed``
    draws the free labels' positions (the same for every policy and budget) and, apart, the
    random policy's choices."""
    free_rng, rng = np.random.default_rng([*seed, 1]), np.random.default_rng([*seed, 2])
    oracle = Oracle(labels, stream, budget if policy != "fixed_a" else 0, 0.01, free_rng, ledger, reader)
    held: dict[int, int] = {}
    model = None
    n = len(stream)
    stretch = max(1, n // max(budget, 1))
    best_pos, best_margin = -1, np.inf
    for t, row in enumerate(stream):
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
        if lab is not None or (policy != "fixed_a" and oracle.spent_at and oracle.spent_at[-1] == t):
            rows = np.fromiter(held, dtype=np.int64)
            model = _fit(x[rows], labels[rows], int(labels.max()) + 1)
        elif policy == "paced_b" and (t + 1) % stretch == 0:
            rows = np.fromiter(held, dtype=np.int64)
            model = _fit(x[rows], labels[rows], int(labels.max()) + 1) if len(rows) else None
    assert oracle.spent <= budget
    return np.fromiter(held, dtype=np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", default="0,1,2,3,4")
    ap.add_argument("--budgets", default="0.05,0.1")
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--niches", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows_out = []
    for part in [int(p) for p in args.partitions.split(",")]:
        data = load_data(DataSpec(n_niches=args.niches, partition="iid", seed=part))
        x, labels = data.x_pool, data.y_pool
        for share in budgets:
            for policy in POLICIES:
                ledger = LabelLedger()
                accs = []
                for j, niche in enumerate(data.niches):
                    # the same stream and free labels for every policy and budget: paired comparisons
                    stream = drift_order(labels, niche, args.phases, np.random.default_rng([part, j]))
                    b = budget_labels(share, len(niche))
                    held = run_stream(policy, x, labels, stream, b, [part, j], ledger, f"n{j}")
                    model = _fit(x[held], labels[held], data.n_classes)
                    accs.append(float((model.predict(data.x_test) == data.y_test).mean()) if model else 0.0)
                c = ledger.counts()
                row = {"partition": part, "budget": share, "policy": policy, "test_accuracy": float(np.mean(accs)),
                       "labels": c, "stream": int(sum(len(n) for n in data.niches))}  # fmt: skip
                rows_out.append(row)
                print(f"data.seed={part} budget={share:.2f} {policy:>8}: test {row['test_accuracy']:.3f}  labels {c}")
    print("\n| budget | policy | test accuracy (mean ± sd over partitions) |\n|---|---|---|")
    for share in budgets:
        for policy in POLICIES:
            a = [r["test_accuracy"] for r in rows_out if r["budget"] == share and r["policy"] == policy]
            print(f"| {share:.2f} | {policy} | {np.mean(a):.3f} ± {np.std(a, ddof=1) if len(a) > 1 else 0:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(rows_out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
