"""Reference points on forkpop's own splits and partitions: FedAvg and one centralized model.

    python benchmarks/baselines.py [--partitions 0,1,2,3] [--seeds 1] [--json PATH] [--config PATH]

Both baselines get what forkpop gets: the niches of the config (``data.seed`` = the partition)
to learn from, the validation and acceptance splits to choose their settings on, the same MLP,
and a small grid over their own hyper-parameters, chosen per partition on validation accuracy
(validation and acceptance splits together). The test split is only reported.

- **FedAvg**: every niche trains a copy of the global model (SGD with momentum 0.9, the
  config's batch size, ``E`` local epochs), the copies are averaged weighted by niche size,
  ``--rounds`` times (default 10, as forkpop's 10 generations). Grid: lr in {0.03, 0.1},
  E in {5, 20} (lr 0.1, E 20 is the setting forkpop was first compared with).
- **Centralized**: one model on all niches' data pooled, SGD with momentum 0.9 and a cosine
  learning-rate schedule over ``--central-epochs`` epochs, the config's batch size. Grid: lr in
  {0.01, 0.03, 0.1}. An upper reference: no federated method sees pooled labels.

Rows: ``{"method", "partition", "seed", "test_accuracy", "val_accuracy", "settings", "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.experiments.config import load_config  # noqa: E402
from forkpop.experiments.runner import PopulationRun  # noqa: E402
from forkpop.population import flat_weights  # noqa: E402
from forkpop.population.models import load_flat_weights  # noqa: E402
from forkpop.selection import accuracy_of  # noqa: E402
from forkpop.workers import ForkTask, GroupLearner  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments/configs/digits.yaml"
FEDAVG_GRID = [{"lr": lr, "epochs": e} for lr in (0.03, 0.1) for e in (5, 20)]
CENTRAL_GRID = [{"lr": lr} for lr in (0.01, 0.03, 0.1)]


def fedavg(learner: GroupLearner, spec, d, rounds: int, lr: float, epochs: int, seed: int) -> torch.Tensor:  # noqa: ANN001
    """FedAvg's global model after ``rounds`` rounds."""
    sizes = torch.tensor([len(n) for n in d.niches], dtype=torch.float32)
    genome = {"lr": lr, "momentum": 0.9, "weight_decay": 0.0, "epochs": epochs, "fork_noise": 0.0}
    w = flat_weights(spec.build(d.n_features, d.n_classes, seed))
    for r in range(rounds):
        tasks = [ForkTask(f"c{i}", i, genome, seed * 10_000 + r) for i in range(len(d.niches))]
        ws, _ = learner.learn(w, tasks)
        w = (sizes[:, None] * ws).sum(0) / sizes.sum()
    return w


def centralized(spec, d, lr: float, epochs: int, batch_size: int, seed: int) -> torch.Tensor:  # noqa: ANN001
    """One model on the pooled niches: SGD (momentum 0.9), cosine schedule, ``epochs`` passes."""
    torch.manual_seed(seed)
    model = spec.build(d.n_features, d.n_classes, seed)
    rows = np.concatenate(d.niches)
    x, y = torch.from_numpy(d.x_pool[rows]), torch.from_numpy(d.y_pool[rows])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    n = len(x)
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return flat_weights(model)


def run_partition(config: str, partition: int, seeds: int, rounds: int, central_epochs: int) -> list[dict]:
    cfg = load_config(config, [f"data.seed={partition}", "data.audit.mode=none"])
    run = PopulationRun(cfg, progress=False)
    run.load_data()
    learner = GroupLearner(run.learner_spec())
    d, spec = learner.data, run.learner_spec().model
    model = spec.build(d.n_features, d.n_classes)
    xs = [d.x_val] + ([d.x_accept] if d.x_accept is not None else [])
    ys = [d.y_val] + ([d.y_accept] if d.y_accept is not None else [])
    x_val, y_val = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    x_test, y_test = torch.from_numpy(d.x_test), torch.from_numpy(d.y_test)
    rows = []
    for seed in range(seeds):
        for method, grid in (("fedavg", FEDAVG_GRID), ("centralized", CENTRAL_GRID)):
            t0 = time.perf_counter()
            best = None
            for settings in grid:
                if method == "fedavg":
                    w = fedavg(learner, spec, d, rounds, settings["lr"], settings["epochs"], seed)
                else:
                    w = centralized(spec, d, settings["lr"], central_epochs, cfg.data.batch_size, seed)
                val = accuracy_of(model, w, x_val, y_val) if torch.isfinite(w).all() else float("nan")
                if best is None or (math.isfinite(val) and not val <= best[0]):
                    best = (val, settings, w)
            val, settings, w = best
            rows.append(
                {
                    "method": method,
                    "partition": partition,
                    "seed": seed,
                    "test_accuracy": accuracy_of(model, w, x_test, y_test),
                    "val_accuracy": val,
                    "settings": settings,
                    "seconds": time.perf_counter() - t0,
                }
            )
            print(
                f"{method:<12} partition {partition} seed {seed}: test {rows[-1]['test_accuracy']:.4f} "
                f"(validation {val:.4f}, {settings})",
                flush=True,
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--partitions", default="0", help="data.seed values, comma-separated (e.g. 0,1,2,3)")
    ap.add_argument("--seeds", type=int, default=1, help="model-initialisation seeds per partition")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--central-epochs", type=int, default=60)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        partitions = [int(p) for p in args.partitions.split(",") if p.strip()]
    except ValueError:
        print(f"baselines: --partitions {args.partitions!r}: give integers separated by commas, e.g. 0,1,2,3")
        sys.exit(2)
    torch.set_num_threads(1)
    rows = []
    for p in partitions:
        rows += run_partition(args.config, p, args.seeds, args.rounds, args.central_epochs)
    for m in ("fedavg", "centralized"):
        accs = [r["test_accuracy"] for r in rows if r["method"] == m]
        print(f"{m:<12} mean test accuracy {np.mean(accs):.4f} ± {np.std(accs, ddof=1) if len(accs) > 1 else 0:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
