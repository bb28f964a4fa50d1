"""Where a generation of the default experiment spends its time, and a 256-variant run's memory.

    python benchmarks/generation.py [--json PATH] [--config digits] [--large 256] [--set key=value ...]

Runs the default experiment (``experiments/configs/digits.yaml``: 16 variants, 10
generations, local Ray) in this process, with MLflow in a temporary SQLite store, and splits
each generation's wall time (as the driver sees it) into phases:

- ``learning``: the slowest worker's compute (fork, learn, validate);
- ``ray``: the rest of the learning call (scheduling, object transfers, result decoding);
- ``plan``, ``selection``, ``distillation`` and ``other``;
- the report of the generation (``evaluation``: test accuracies; ``tracking``: queueing
  records for the tracking process; ``checkpoint``), which runs while the workers learn the
  next generation: listed apart, and counted where learning did not hide it (``ray``);
- ``tracking_flush``: the wait at the end of the run for MLflow writes still queued, shared out
  over the generations.

``overhead_fraction`` = the share of (generations' wall time + final flush) outside learning and
distillation. Then a population of ``--large`` variants runs 10 generations and the peak
resident memory of the driver and of each worker is reported (0 skips it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.experiments.cli import _resolve_config  # noqa: E402
from forkpop.experiments.config import load_config  # noqa: E402
from forkpop.experiments.runner import PopulationRun  # noqa: E402

PHASES = ("learning", "ray", "plan", "selection", "distillation", "other")
REPORT = ("evaluation", "tracking", "checkpoint")


def _phases(rec: dict) -> dict[str, float]:
    """One generation's wall time by phase; the report's parts are listed apart.

    The report of generation g (test accuracies, MLflow records, checkpoint) runs while the
    workers learn generation g + 1, so it is inside ``learn`` there: what learning did not
    hide of it shows as ``ray``. The last generation's report is not hidden: it is ``other``.
    """
    s = rec["seconds"]
    out = {
        "learning": s["learn_compute"],
        "ray": max(0.0, s["learn"] - s["learn_compute"]),
        "plan": s["plan"],
        "selection": s["select"],
        "distillation": s["distill"],
    }
    out["other"] = max(0.0, s["generation"] - s["learn"] - s["plan"] - s["select"] - s["distill"])
    out["generation"] = s["generation"]
    out.update({"evaluation": s["evaluate"], "tracking": s["tracking"], "checkpoint": s["checkpoint"]})
    return out


def run(config: str, overrides: list[str], root: Path) -> tuple[dict, float]:
    cfg = load_config(_resolve_config(config), overrides + [f"run.run_dir={root / 'runs'}"])
    t0 = time.perf_counter()
    summary = PopulationRun(cfg, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False).run()
    return summary.__dict__, time.perf_counter() - t0


def breakdown(summary: dict) -> dict:
    gens = [_phases(h) for h in summary["history"]]
    n = len(gens)
    flush = summary["seconds"].get("tracking_flush", 0.0)
    total = sum(g["generation"] for g in gens) + flush
    inside = sum(g["learning"] + g["distillation"] for g in gens)
    mean = {k: sum(g[k] for g in gens) / n for k in (*PHASES, *REPORT, "generation")}
    mean["tracking_flush"] = flush / n
    steady = gens[1:] or gens
    steady_total = sum(g["generation"] for g in steady) + flush
    steady_inside = sum(g["learning"] + g["distillation"] for g in steady)
    return {
        "generations": n,
        "seconds_per_generation": mean,
        "overhead_fraction": (total - inside) / total,
        "overhead_fraction_after_first": (steady_total - steady_inside) / steady_total,
        "per_generation": gens,
        "tracking_writer_cpu_seconds": summary["seconds"].get("tracking_writer_cpu", 0.0),
        "startup_seconds": summary["seconds"].get("startup", 0.0),
        "run_wall_seconds": summary["wall_seconds"],
        "seed_test_accuracy": summary["seed_test_accuracy"],
        "workers": summary["workers"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the breakdown here as JSON")
    ap.add_argument("--config", default="digits", help="experiment config (default: the bundled digits)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--large", type=int, default=256, help="variants of the memory run (0: skip it)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    with tempfile.TemporaryDirectory(prefix="forkpop-bench-") as tmp:
        summary, _ = run(args.config, args.set, Path(tmp) / "default")
        out = breakdown(summary)
        m = out["seconds_per_generation"]
        acc = out["seed_test_accuracy"]
        print(f"default experiment: {out['generations']} generations, seed test accuracy {acc:.4f}")
        print(f"workers: {[(w['engine'], w['device']) for w in out['workers']]}")
        print("\n| phase | seconds per generation | share |\n|---|---|---|")
        total = m["generation"] + m["tracking_flush"]
        for k in (*PHASES, "tracking_flush"):
            print(f"| {k} | {m[k]:.4f} | {m[k] / total:.1%} |")
        print(f"| **generation** | {total:.4f} | 100% |")
        print("\nthe report of each generation, overlapped with the next one's learning (seconds):")
        print(", ".join(f"{k} {m[k]:.4f}" for k in REPORT))
        print(
            f"\noverhead_fraction (outside learning and distillation) = {out['overhead_fraction']:.3f} "
            f"(after the first generation: {out['overhead_fraction_after_first']:.3f}); "
            f"tracking process CPU {out['tracking_writer_cpu_seconds']:.2f}s in all, "
            f"start-up {out['startup_seconds']:.2f}s"
        )
        if args.large:
            sets = args.set + [f"population.size={args.large}", "data.n_niches=16", "run.generations=10"]
            big, wall = run(args.config, sets, Path(tmp) / "large")
            mib = 2**20
            out["large"] = {
                "n_variants": args.large,
                "generations": len(big["history"]),
                "wall_seconds": wall,
                "driver_peak_rss_mib": big["driver_peak_rss"] / mib,
                "worker_peak_rss_mib": [w["peak_rss"] / mib for w in big["workers"]],
                "seed_test_accuracy": big["seed_test_accuracy"],
                "diverged_per_generation": [h["diverged"] for h in big["history"]],
            }
            lg = out["large"]
            print(
                f"\n{args.large} variants x {lg['generations']} generations: {wall:.1f}s, "
                f"peak memory driver {lg['driver_peak_rss_mib']:.0f} MiB, workers "
                f"{', '.join(f'{x:.0f}' for x in lg['worker_peak_rss_mib'])} MiB, "
                f"seed test accuracy {lg['seed_test_accuracy']:.4f}"
            )
    import ray

    ray.shutdown()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
