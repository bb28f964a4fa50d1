"""``forkpop study abm``: System M evolved against fixed policies, at two budgets, paired partitions.

Every policy runs the bundled ``abm`` config (the label-budget world) on the same partitions
(``data.seed``) and budgets (``budget.share`` 0.05 and 0.1): ``fixed_a``, ``greedy_b``,
``paced_b``, ``random``, ``bandit``, ``evolved_m`` (System M, the ``m_*`` genes evolved) and
``shuffled_m`` (the same, with M fed its own lifetime's signals in another order: the control
that M uses its signals' timing). ``DIR/study.json`` holds, per budget and policy, the final
seed's test accuracy per partition (reported only; with ``--seeds 0,1`` the mean over those run
seeds, each run's in ``runs``), the evolved forks' median share of budget
spent after their stream's midpoint and median switches (last generation), and the pooled
reference: one learner over the whole pool with the same share, margin queries paced over the
stream, and label spreading over the pool's inputs from the labels bought (with the logistic
regression that chose the queries alone beside it; :func:`forkpop.workers.budget.reference_accuracy`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

BUDGETS = (0.05, 0.1)
POLICIES = ("fixed_a", "greedy_b", "paced_b", "random", "bandit", "evolved_m", "shuffled_m")
CONFIG_POLICY = {"evolved_m": "evolved"}


def run_study(
    out: Path,
    partitions: list[int],
    overrides: list[str],
    tracking_uri: str | None = None,
    budgets: tuple[float, ...] = BUDGETS,
    progress: bool = True,
    seeds: tuple[int, ...] = (0,),
    jobs: int = 1,
) -> dict[str, Any]:
    from forkpop.experiments.config import load_config
    from forkpop.experiments.specs import data_spec
    from forkpop.workers.budget import reference_accuracy
    from forkpop.workers.budget_world import world_deal
    from forkpop.workers.data import load_data

    base = str(Path(__file__).parent / "configs" / "abm.yaml")
    acc: dict[str, dict[str, list[float]]] = {str(b): {p: [] for p in POLICIES} for b in budgets}
    late: dict[str, list[float]] = {str(b): [] for b in budgets}
    switches: dict[str, list[float]] = {str(b): [] for b in budgets}
    pooled: dict[str, list[float]] = {str(b): [] for b in budgets}
    pooled_lr: dict[str, list[float]] = {str(b): [] for b in budgets}
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    jobs_list = [
        (b, part, policy, run_seed) for b in budgets for part in partitions for policy in POLICIES for run_seed in seeds
    ]

    def sets_of(b: float, part: int, policy: str, run_seed: int) -> list[str]:
        return [f"budget.share={b}", f"data.seed={part}", *overrides,
                f"budget.policy={CONFIG_POLICY.get(policy, policy)}", f"run.seed={run_seed}"]  # fmt: skip

    load_config(base, sets_of(*jobs_list[0]))  # a bad --set fails here, once, before any run
    done: dict[tuple, dict[str, Any]] = {}

    def record(job: tuple, got: dict[str, Any]) -> None:
        done[job] = got
        if progress:
            b, part, policy, run_seed = job
            print(
                f"[{time.perf_counter() - t0:6.0f}s] budget {b} data.seed {part} run.seed {run_seed} "
                f"{policy:>10}: seed test {got['seed_test_accuracy']:.4f}",
                file=sys.stderr,
                flush=True,
            )

    if jobs <= 1:
        for job in jobs_list:
            record(job, _one_run(base, sets_of(*job), tracking_uri))
    else:  # independent runs in separate processes, each on one core's worth of threads
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_one_run, base, sets_of(*job), tracking_uri): job for job in jobs_list}
            for f in as_completed(futures):
                record(futures[f], f.result())
    for b in budgets:
        for part in partitions:
            for policy in POLICIES:
                got = []
                for run_seed in seeds:
                    r = done[(b, part, policy, run_seed)]
                    got.append(float(r["seed_test_accuracy"]))
                    world = r["world"]
                    if policy == "evolved_m":
                        late[str(b)].append(float(world.get("budget.late_share", float("nan"))))
                        switches[str(b)].append(float(world.get("budget.switches", float("nan"))))
                    runs.append({"budget": b, "partition": part, "policy": policy, "run_seed": run_seed, **r})
                acc[str(b)][policy].append(float(np.mean(got)))
            cfg = load_config(base, [f"budget.share={b}", f"data.seed={part}", *overrides])
            data = load_data(data_spec(cfg))
            deal = world_deal(data, cfg.budget.phases, part) if cfg.budget.deal == "world" else None
            ref = reference_accuracy(data, b, "paced_b", cfg.budget.phases, part, deal)
            pooled[str(b)].append(ref["spreading"])
            pooled_lr[str(b)].append(ref["logistic"])
    study = {
        "budgets": acc,
        "late_budget_share": {k: float(np.nanmedian(v)) if v else float("nan") for k, v in late.items()},
        "switches_median": {k: float(np.nanmedian(v)) if v else float("nan") for k, v in switches.items()},
        "pooled_reference": {k: float(np.mean(v)) for k, v in pooled.items()},
        "pooled_reference_per_partition": pooled,
        "pooled_reference_logistic": {k: float(np.mean(v)) for k, v in pooled_lr.items()},
        "pooled_reference_logistic_per_partition": pooled_lr,
        "partitions": partitions,
        "run_seeds": list(seeds),
        "overrides": overrides,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "jobs": jobs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=1))
    return study


def _one_run(base: str, sets: list[str], tracking_uri: str | None) -> dict[str, Any]:
    """One population run of the study (in this process or a pool's): what the study keeps of it."""
    import forkpop

    if multiprocessing.parent_process() is not None:  # a pool's worker: one core's worth of threads
        import torch

        torch.set_num_threads(1)
    r = forkpop.run(base, overrides=sets, backend="local", tracking_uri=tracking_uri)
    s = r.summary
    return {"run_dir": str(r.run_dir), "mlflow_run_id": s.get("mlflow_run_id"),
            "seed_test_accuracy": s["seed_test_accuracy"], "world": s["history"][-1].get("world", {})}  # fmt: skip


def format_table(study: dict[str, Any]) -> str:
    lines = ["| budget | policy | seed test accuracy (mean ± sd) | per partition |", "|---|---|---|---|"]
    for b, pols in study["budgets"].items():
        for p, v in pols.items():
            sd = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            lines.append(f"| {b} | {p} | {np.mean(v):.4f} ± {sd:.4f} | {' '.join(f'{x:.4f}' for x in v)} |")
        lines.append(
            f"| {b} | pooled reference | {study['pooled_reference'][b]:.4f} | "
            f"late share {study['late_budget_share'][b]:.2f}, switches {study['switches_median'][b]:.0f} |"
        )
    return "\n".join(lines)


def cmd_abm_study(args: Any) -> int:
    partitions = [int(x) for x in args.partitions.split(",")] if args.partitions else [0, 1, 2, 3, 4]
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else (0,)
    jobs = getattr(args, "jobs", None)
    if jobs is not None and jobs < 1:
        from forkpop.experiments.config import ConfigError

        raise ConfigError(f"--jobs is how many runs go at once: 1 or more (got {jobs})")
    jobs = jobs or len(os.sched_getaffinity(0))
    study = run_study(
        Path(args.out), partitions, list(args.set), args.tracking_uri, progress=not args.quiet, seeds=seeds, jobs=jobs
    )
    print(format_table(study))
    print(f"study: {Path(args.out) / 'study.json'} ({study['seconds']:.0f} s)")
    return 0
