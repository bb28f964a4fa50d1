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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.workers import DataSpec, load_data  # noqa: E402
from forkpop.workers.budget import REFERENCE_POLICIES as POLICIES  # noqa: E402
from forkpop.workers.budget import LabelLedger, budget_labels, drift_order, fit_reference, reference_stream  # noqa: E402


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
                    held = reference_stream(policy, x, labels, stream, b, [part, j], ledger, f"n{j}")
                    model = fit_reference(x[held], labels[held])
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
