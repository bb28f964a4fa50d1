"""Where a generation of the default experiment spends its time, and how time and memory grow with the population.

    python benchmarks/generation.py [--json PATH] [--config digits] [--large 256] [--set key=value ...]
                                    [--large-set key=value ...] [--generations 5] [--no-default]

First (unless ``--no-default``) the default experiment (``experiments/configs/digits.yaml``:
32 variants, 10 generations, on the backend it names) runs in this process, with MLflow in a
temporary SQLite store, and each generation's wall time (as the driver sees it) is split into
phases:

- ``learning``: the slowest worker's compute (fork, learn, validate);
- ``ray``: the rest of the learning call (scheduling, object transfers, result decoding);
- ``plan``, ``selection``, ``distillation`` and ``other``;
- the report of the generation (``evaluation``: test accuracies; ``tracking``: queueing
  records for the tracking process; ``checkpoint``), which runs while the workers learn the
  next generation: listed apart, and counted where learning did not hide it (``ray``);
- ``tracking_flush``: the wait at the end of the run for MLflow writes still queued, shared out
  over the generations.

``overhead_fraction`` = the share of (generations' wall time + final flush) outside learning and
distillation.

Then the scaling runs (``--large N``; 0 skips them): populations of 256, 1,024, 4,096, ...
(times 4, up to N; N itself last when it is not one of them) each run ``--generations`` (5)
generations of the same experiment (``population.size=N``, 16 niches, ``--large-set`` on
top: say ``--large-set population.genes.epochs.init=5`` for shorter learning), a real
``forkpop`` run with ``run.backend=local`` (the learning in the driver's process, so the
driver's memory is the whole run's) and MLflow in a temporary SQLite store as a run keeps it,
each in a fresh Python process. For each size and phase (``plan``, ``learn``,
``select``, ``distill``, and the observers ``evaluate``, ``diversity``, ``alarm``,
``tracking`` (the driver's share: building and queueing the records), ``tracking_wait`` (the
driver waiting for the MLflow writer process to store them: ``Tracker.flush`` and
``wait_flushed``, during the generations and at the end of the run), ``checkpoint``, ``progress``; ``other``: start-up,
the summary) it reports the seconds (summed over the generations and per generation) and the
driver's peak resident memory while in that phase (Linux: the kernel's high-water mark
``VmHWM``, reset through ``/proc/self/clear_refs`` at each phase change, so no spike is
missed; elsewhere a 2 ms sampler), also as the peak above the memory on entering the phase;
then how each grows between sizes (``exponent = log(x2 / x1) / log(N2 / N1)``: 1 is linear,
2 quadratic), the checkpoint bytes of each generation and the MLflow store's size. The peak of
the tracking writer process is reported apart (``tracking_writer_peak_rss_mib``). With
``--large 4096`` the whole benchmark takes about 7 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.experiments.cli import _resolve_config  # noqa: E402
from forkpop.experiments.config import load_config  # noqa: E402
from forkpop.experiments.runner import PopulationRun  # noqa: E402

PHASES = ("learning", "ray", "plan", "selection", "distillation", "other")
REPORT = ("evaluation", "tracking", "checkpoint")
# The scaling runs' phases, in the order a generation goes through them.
SCALE_PHASES = (
    "plan", "learn", "select", "distill", "evaluate", "diversity", "alarm", "tracking", "tracking_wait", "checkpoint",
    "progress", "other",
)  # fmt: skip
MIB = 2**20
# What the scaling runs change in the config besides population.size (and --large-set on top):
# a real run of the experiment, in-process, with its niches and the number of generations.
SCALE_SETTINGS = ("run.backend=local", "data.n_niches=16")


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


def run(config: str, overrides: list[str], root: Path, cls: type = PopulationRun) -> tuple[dict, float]:
    cfg = load_config(_resolve_config(config), overrides + [f"run.run_dir={root / 'runs'}"])
    t0 = time.perf_counter()
    summary = cls(cfg, tracking_uri=f"sqlite:///{root / 'mlflow.db'}", progress=False).run()
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


# -- peak memory per phase ----------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    from forkpop.workers.pool import peak_rss_bytes

    return peak_rss_bytes()


class PhaseMeter:
    """Seconds and peak resident memory of the driver per phase (a watcher of
    :data:`forkpop.experiments.core.PHASE_WATCHERS`; nested phases count for the innermost).

    Each change of phase closes a segment: its time goes to the phase that was running and so
    does the segment's peak RSS (``VmHWM``, then reset), or, where the high-water mark cannot
    be reset, the peak a 2 ms sampling thread saw."""

    def __init__(self) -> None:
        self.stack = ["other"]
        self.seconds: dict[str, float] = defaultdict(float)
        self.peak: dict[str, int] = defaultdict(int)
        self.above: dict[str, int] = defaultdict(int)  # peak minus the RSS on entering
        self.entry = [_rss_bytes()]
        self.baseline = self.entry[0]
        self.hwm = _reset_hwm() and _status_kib("VmHWM") is not None
        self._sampled = 0
        self._stop = threading.Event()
        if not self.hwm:
            threading.Thread(target=self._sample, daemon=True).start()
        self._t = time.perf_counter()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss_bytes())

    def _segment_peak(self) -> int:
        if self.hwm:
            peak = (_status_kib("VmHWM") or 0) * 1024
            _reset_hwm()
            return peak
        peak, self._sampled = max(self._sampled, _rss_bytes()), 0
        return peak

    def _close(self) -> None:
        now, top = time.perf_counter(), self.stack[-1]
        self.seconds[top] += now - self._t
        self._t = now
        peak = self._segment_peak()
        self.peak[top] = max(self.peak[top], peak)
        self.above[top] = max(self.above[top], peak - self.entry[-1])

    def __call__(self, name: str, entering: bool) -> None:
        self._close()
        if entering:
            self.stack.append(name)
            self.entry.append(_rss_bytes())
        elif len(self.stack) > 1:
            self.stack.pop()
            self.entry.pop()

    def finish(self) -> dict:
        self._close()
        self._stop.set()
        return {
            "method": "VmHWM reset per phase" if self.hwm else "2 ms RSS sampler",
            "baseline_rss_mib": self.baseline / MIB,
            "peak_rss_mib": max(self.peak.values(), default=0) / MIB,
            "seconds": dict(self.seconds),
            "peak_rss_mib_by_phase": {k: v / MIB for k, v in self.peak.items()},
            "peak_above_entry_mib_by_phase": {k: max(0, v) / MIB for k, v in self.above.items()},
        }


class MeteredRun(PopulationRun):
    """A population run whose observers tell the phase watchers when each of them runs."""

    def observers(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        from forkpop.experiments.core import phase

        obs = super().observers(*args, **kwargs)
        tracker = args[1] if len(args) > 1 else kwargs.get("tracker")
        for method in ("flush", "wait_flushed"):  # the driver waiting for the MLflow writer process
            inner = getattr(tracker, method, None)
            if inner is None:
                continue

            def waited(*a, _inner=inner, **kw):  # noqa: ANN002, ANN003, ANN202
                with phase("tracking_wait"):
                    return _inner(*a, **kw)

            setattr(tracker, method, waited)
        for o in obs:
            for method in ("measure", "on_generation", "on_record"):
                inner = getattr(o, method)

                def wrapped(*a, _inner=inner, _name=o.name, **kw):  # noqa: ANN002, ANN003, ANN202
                    with phase(_name):
                        return _inner(*a, **kw)

                setattr(o, method, wrapped)
        return obs


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _whole_lineage_bytes(folder: Path) -> int:
    """The size ``state.json`` of checkpoint ``folder`` would have, written as checkpoints were
    before they held only their generation's births: with the whole lineage in it."""
    from forkpop.experiments.checkpoint import read_checkpoint

    _, body = read_checkpoint(folder)
    lineage = body["lineage"]
    old = {k: v for k, v in body.items() if k not in ("births", "lineage_base", "lineage_size", "lineage")}
    return len(json.dumps({**old, "lineage": lineage}, indent=1).encode())


def one_size(config: str, overrides: list[str], n: int, generations: int) -> dict:
    """One scaling run (in this process): figures of ``n`` variants x ``generations``."""
    from forkpop.experiments import core

    sets = [f"population.size={n}", f"run.generations={generations}", *SCALE_SETTINGS, *overrides]
    with tempfile.TemporaryDirectory(prefix=f"forkpop-bench-{n}-") as tmp:
        root = Path(tmp)
        meter = PhaseMeter()
        core.PHASE_WATCHERS.append(meter)
        try:
            summary, wall = run(config, sets, root, MeteredRun)
        finally:
            core.PHASE_WATCHERS.remove(meter)
        mem = meter.finish()
        import resource

        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        run_dir = Path(summary["run_dir"])
        ckpts = sorted((run_dir / "checkpoints").glob("gen-[0-9]*"))
        ckpt_bytes = [_folder_bytes(c) for c in ckpts]
        state_bytes = [(c / "state.json").stat().st_size for c in ckpts]
        whole = [b - s + _whole_lineage_bytes(c) for c, b, s in zip(ckpts, ckpt_bytes, state_bytes, strict=True)]
        store = sum(f.stat().st_size for f in root.glob("mlflow.db*"))
        artifacts = _folder_bytes(root / "runs" / "mlartifacts")
    hist = summary["history"]
    g = len(hist)
    run_secs = summary["seconds"]
    seconds = {k: mem["seconds"].get(k, 0.0) for k in SCALE_PHASES}
    return {
        "n_variants": n,
        "generations": g,
        "settings": sets,
        "wall_seconds": wall,
        "seconds": seconds,
        "seconds_per_generation": {k: v / g for k, v in seconds.items()},
        "peak_rss_mib": mem["peak_rss_mib_by_phase"],
        "peak_above_entry_mib": mem["peak_above_entry_mib_by_phase"],
        "driver_peak_rss_mib": mem["peak_rss_mib"],
        "driver_baseline_rss_mib": mem["baseline_rss_mib"],
        "memory_method": mem["method"],
        "tracking_writer_peak_rss_mib": children / MIB,
        "tracking_writer_cpu_seconds": run_secs.get("tracking_writer_cpu", 0.0),
        "tracking_final_flush_seconds": run_secs.get("tracking_flush", 0.0),
        "startup_seconds": run_secs.get("startup", 0.0),
        "learn_compute_seconds": sum(h["seconds"].get("learn_compute", 0.0) for h in hist),
        "checkpoint_bytes_per_generation": ckpt_bytes,
        "checkpoint_state_json_bytes_per_generation": state_bytes,
        "checkpoint_bytes_total": sum(ckpt_bytes),
        "checkpoint_bytes_per_generation_whole_lineage": whole,
        "mlflow_store_bytes": store,
        "mlflow_artifact_bytes": artifacts,
        "seed_test_accuracy": summary["seed_test_accuracy"],
        "diverged_per_generation": [h["diverged"] for h in hist],
        "pairwise_variants": [h["diversity"].get("pairwise_variants") for h in hist],
    }


def sizes_up_to(n: int) -> list[int]:
    out, s = [], 256
    while s <= n:
        out.append(s)
        s *= 4
    if not out or out[-1] != n:
        out.append(n)
    return out


def exponent(x1: float, x2: float, n1: int, n2: int) -> float | None:
    """``log(x2 / x1) / log(n2 / n1)``: how ``x`` grows with the population (None when not defined)."""
    if x1 <= 0 or x2 <= 0 or n1 == n2:
        return None
    return math.log(x2 / x1) / math.log(n2 / n1)


def growth(runs: list[dict]) -> list[dict]:
    """Exponents between consecutive sizes: of each phase's seconds, of its peak memory above
    the driver's baseline (imports, data), of the wall time and the checkpoint bytes."""
    out = []
    for a, b in zip(runs, runs[1:], strict=False):
        n1, n2 = a["n_variants"], b["n_variants"]
        above = {
            k: exponent(
                a["peak_rss_mib"].get(k, 0) - a["driver_baseline_rss_mib"],
                b["peak_rss_mib"].get(k, 0) - b["driver_baseline_rss_mib"],
                n1,
                n2,
            )
            for k in SCALE_PHASES
        }
        out.append(
            {
                "from": n1,
                "to": n2,
                "seconds": {k: exponent(a["seconds"][k], b["seconds"][k], n1, n2) for k in SCALE_PHASES},
                "peak_rss_above_baseline": above,
                "wall_seconds": exponent(a["wall_seconds"], b["wall_seconds"], n1, n2),
                "driver_peak_rss_above_baseline": exponent(
                    a["driver_peak_rss_mib"] - a["driver_baseline_rss_mib"],
                    b["driver_peak_rss_mib"] - b["driver_baseline_rss_mib"],
                    n1,
                    n2,
                ),
                "checkpoint_bytes_total": exponent(a["checkpoint_bytes_total"], b["checkpoint_bytes_total"], n1, n2),
                "tracking_writer_cpu_seconds": exponent(
                    a["tracking_writer_cpu_seconds"], b["tracking_writer_cpu_seconds"], n1, n2
                ),
            }
        )
    return out


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_scaling(runs: list[dict], grow: list[dict]) -> None:
    print(f"\nscaling: {runs[0]['generations']} generations each; settings {' '.join(runs[0]['settings'][1:])}")
    head = " | ".join(f"{r['n_variants']} s | {r['n_variants']} MiB" for r in runs)
    print(f"\n| phase | {head} |" + "".join(f" exp {g['from']}→{g['to']} s |" for g in grow))
    print("|---|" + "---|" * (2 * len(runs) + len(grow)))
    for k in SCALE_PHASES:
        cells = " | ".join(f"{r['seconds'][k]:.2f} | {r['peak_rss_mib'].get(k, 0):.0f}" for r in runs)
        print(f"| {k} | {cells} |" + "".join(f" {_fmt(g['seconds'][k])} |" for g in grow))
    cells = " | ".join(f"{r['wall_seconds']:.1f} | {r['driver_peak_rss_mib']:.0f}" for r in runs)
    print(f"| **run** | {cells} |" + "".join(f" {_fmt(g['wall_seconds'])} |" for g in grow))
    print("\n(seconds: summed over the generations; MiB: the driver's peak RSS while in the phase)")
    print("\npeak above the RSS on entering the phase (MiB): what the phase itself adds")
    print("\n| phase | " + " | ".join(str(r["n_variants"]) for r in runs) + " |\n|---|" + "---|" * len(runs))
    for k in SCALE_PHASES:
        print(f"| {k} | " + " | ".join(f"{r['peak_above_entry_mib'].get(k, 0):.0f}" for r in runs) + " |")
    print()
    for r in runs:
        kib = ", ".join(f"{b / 1024:.0f}" for b in r["checkpoint_bytes_per_generation"])
        was = ", ".join(f"{b / 1024:.0f}" for b in r["checkpoint_bytes_per_generation_whole_lineage"])
        print(
            f"{r['n_variants']}: wall {r['wall_seconds']:.1f}s, driver peak {r['driver_peak_rss_mib']:.0f} MiB "
            f"(baseline {r['driver_baseline_rss_mib']:.0f}), tracking writer peak "
            f"{r['tracking_writer_peak_rss_mib']:.0f} MiB and {r['tracking_writer_cpu_seconds']:.1f} CPU s, "
            f"MLflow store {r['mlflow_store_bytes'] / MIB:.1f} MiB; checkpoint KiB per generation [{kib}] "
            f"(with the whole lineage in each, as before: [{was}]); "
            f"seed test accuracy {r['seed_test_accuracy']:.4f}"
        )
    for g in grow:
        mem = _fmt(g["driver_peak_rss_above_baseline"])
        print(
            f"growth {g['from']}→{g['to']}: wall exponent {_fmt(g['wall_seconds'])}, driver peak above baseline "
            f"{mem}, checkpoint bytes {_fmt(g['checkpoint_bytes_total'])}, tracking writer CPU "
            f"{_fmt(g['tracking_writer_cpu_seconds'])}"
        )


def scaling(args: argparse.Namespace) -> list[dict]:
    """Each size in a fresh Python process (``--one-size``): its memory is its own."""
    runs = []
    for n in sizes_up_to(args.large):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = Path(f.name)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one-size", str(n), "--json", str(out)]
        cmd += ["--config", args.config, "--generations", str(args.generations)]
        for s in args.set + args.large_set:
            cmd += ["--large-set", s]
        t0 = time.perf_counter()
        p = subprocess.run(cmd)
        if p.returncode != 0:
            raise SystemExit(f"the {n}-variant run failed (exit {p.returncode})")
        runs.append(json.loads(out.read_text()))
        out.unlink()
        print(f"{n} variants: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the breakdown here as JSON")
    ap.add_argument("--config", default="digits", help="experiment config (default: the bundled digits)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all runs)")
    ap.add_argument(
        "--large-set", action="append", default=[], metavar="KEY=VALUE", help="config override of the scaling runs"
    )
    ap.add_argument("--large", type=int, default=256, help="largest scaling run: 256, 1024, ... up to it (0: none)")
    ap.add_argument("--generations", type=int, default=5, help="generations of each scaling run (default 5)")
    ap.add_argument("--no-default", action="store_true", help="skip the default experiment's breakdown")
    ap.add_argument("--one-size", type=int, help=argparse.SUPPRESS)  # one scaling run, in this process
    args = ap.parse_args(argv)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    if args.one_size:
        res = one_size(args.config, args.large_set, args.one_size, args.generations)
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return 0

    out: dict = {}
    if not args.no_default:
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
        if "ray" in sys.modules:  # the default experiment ran on Ray
            sys.modules["ray"].shutdown()
    if args.large:
        runs = scaling(args)
        grow = growth(runs)
        out["scaling"] = {"runs": runs, "growth": grow}
        print_scaling(runs, grow)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
