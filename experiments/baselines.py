"""Baselines on forkpop's own splits and partitions: FedAvg and one centralized model.

Both get what a forkpop run gets: the niches of the config (``data.seed`` is the partition) to
learn from, the validation and acceptance splits to choose their settings on, the same model,
and a small grid over their own hyper-parameters, chosen per partition on validation accuracy
(validation and acceptance splits together). The test split is only reported.

- **FedAvg**: every niche trains a copy of the global model (SGD with momentum 0.9, the
  config's batch size, ``E`` local epochs), the copies are averaged weighted by niche size,
  ``rounds`` times (default 10, as the default experiment's 10 generations). Grid: lr in
  {0.03, 0.1}, E in {5, 20}.
- **Centralized**: one model on all niches' data pooled, SGD with momentum 0.9 and a cosine
  learning-rate schedule over ``central_epochs`` epochs, the config's batch size. Grid: lr in
  {0.01, 0.03, 0.1}. An upper reference: no federated method sees pooled labels.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from forkpop.experiments.config import ExperimentConfig
from forkpop.experiments.specs import learner_spec
from forkpop.population.models import flat_weights
from forkpop.selection.distill import accuracy_of
from forkpop.workers.learner import ForkTask, GroupLearner

BASELINES = ("fedavg", "centralized")
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


def run_partition(
    cfg: ExperimentConfig,
    partition: int,
    seeds: int = 1,
    rounds: int = 10,
    central_epochs: int = 60,
    methods: tuple[str, ...] = BASELINES,
    log=lambda line: print(line, flush=True),  # noqa: ANN001
) -> list[dict]:
    """Rows ``{"method", "partition", "seed", "test_accuracy", "val_accuracy", "settings",
    "seconds"}`` of each baseline in ``methods`` on partition ``partition`` (``data.seed``) of
    ``cfg``'s data, for model seeds ``0 .. seeds - 1``."""
    data = cfg.data.model_copy(update={"seed": partition, "audit": cfg.data.audit.model_copy(update={"mode": "none"})})
    cfg = cfg.model_copy(update={"data": data})
    learner = GroupLearner(learner_spec(cfg))  # it loads the data and makes the split itself
    d, spec = learner.data, learner_spec(cfg).model
    model = spec.build(d.n_features, d.n_classes)
    xs = [d.x_val] + ([d.x_accept] if d.x_accept is not None else [])
    ys = [d.y_val] + ([d.y_accept] if d.y_accept is not None else [])
    x_val, y_val = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    x_test, y_test = torch.from_numpy(d.x_test), torch.from_numpy(d.y_test)
    rows = []
    for seed in range(seeds):
        for method, grid in (("fedavg", FEDAVG_GRID), ("centralized", CENTRAL_GRID)):
            if method not in methods:
                continue
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
            log(
                f"{method:<12} partition {partition} seed {seed}: test {rows[-1]['test_accuracy']:.4f} "
                f"(validation {val:.4f}, {settings})",
            )
    return rows
