"""Reference points on forkpop's own split and partition: FedAvg and centralized training.

    python benchmarks/baselines.py [--rounds 10] [--json PATH]

FedAvg: every niche trains a copy of the global model (SGD, ``--epochs`` local epochs), the
copies are averaged weighted by niche size, ``--rounds`` times. Centralized: one model trained
on all niches' data pooled. Both use the data of the default experiment (digits, 16
Dirichlet(0.3) niches, validation split held out as in forkpop) and the same MLP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.experiments.config import load_config  # noqa: E402
from forkpop.experiments.runner import PopulationRun  # noqa: E402
from forkpop.population import flat_weights  # noqa: E402
from forkpop.selection import accuracy_of  # noqa: E402
from forkpop.workers import ForkTask, GroupLearner, stream_batches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "experiments/configs/digits.yaml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    run = PopulationRun(cfg, progress=False)
    run.load_data()
    learner = GroupLearner(run.learner_spec())
    d = learner.data
    x_test, y_test = torch.from_numpy(d.x_test), torch.from_numpy(d.y_test)
    sizes = torch.tensor([len(n) for n in d.niches], dtype=torch.float32)
    genome = {"lr": args.lr, "momentum": 0.9, "weight_decay": 0.0, "epochs": args.epochs, "fork_noise": 0.0}
    spec = run.learner_spec().model  # the family, hidden widths and options of the config
    model = spec.build(d.n_features, d.n_classes)
    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        w = flat_weights(spec.build(d.n_features, d.n_classes, seed))
        curve = []
        for r in range(args.rounds):
            tasks = [ForkTask(f"c{i}", i, genome, seed * 10_000 + r) for i in range(len(d.niches))]
            ws, _ = learner.learn(w, tasks)
            w = (sizes[:, None] * ws).sum(0) / sizes.sum()
            curve.append(accuracy_of(model, w, x_test, y_test))
        rows.append(
            {
                "method": "fedavg",
                "seed": seed,
                "test_accuracy": curve[-1],
                "curve": curve,
                "seconds": time.perf_counter() - t0,
            }
        )
        # Centralized: the same model on all niches pooled, as one niche, for the same epochs in total.
        t0 = time.perf_counter()
        central = GroupLearner(run.learner_spec())
        pooled = np.random.default_rng(seed).permutation(np.concatenate(d.niches))
        central.streams = [stream_batches(pooled, cfg.data.batch_size)]
        w0 = flat_weights(spec.build(d.n_features, d.n_classes, seed))
        wc, _ = central.learn(w0, [ForkTask("central", 0, {**genome, "epochs": args.rounds * args.epochs}, seed)])
        rows.append(
            {
                "method": "centralized",
                "seed": seed,
                "test_accuracy": accuracy_of(model, wc[0], x_test, y_test),
                "seconds": time.perf_counter() - t0,
            }
        )
    print(f"{'method':<12} {'seed':>4} {'test accuracy':>13}")
    for r in rows:
        print(f"{r['method']:<12} {r['seed']:>4} {r['test_accuracy']:>13.4f}")
    for m in ("fedavg", "centralized"):
        accs = [r["test_accuracy"] for r in rows if r["method"] == m]
        print(f"{m:<12} mean {np.mean(accs):.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
