"""The language-model studies: ``forkpop study text`` (the population against one model on all
niches pooled and FedAvg of the LMs, at equal training tokens) and ``forkpop study collapse``
(learning from their own text: replace at several real shares, and accumulate).

A study file names its ``kind`` (``text`` or ``collapse``), its ``base`` config, its run
``seeds`` and, for collapse, its ``arms``; ``--set`` overrides apply to every run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from forkpop.experiments.config import ConfigError, ExperimentConfig, build_config, deep_merge, load_config

KINDS = ("text", "collapse")


def study_kind(path: Path) -> str | None:
    """The ``kind`` a study file names (None: a classification study of modes)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if kind in KINDS else None


def load_text_study(path: Path) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"kind", "base", "seeds", "arms", "baselines", "set"}
    if unknown:
        raise ConfigError(
            f"study {path}: unknown key {sorted(unknown)[0]!r}; use kind, base, seeds, set, arms, baselines"
        )
    sets = raw.get("set", [])
    if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
        raise ConfigError(f"study {path}: 'set' must be a list of key=value overrides")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"study {path}: 'seeds' must be a list of non-negative integers")
    arms = raw.get("arms", [])
    if raw["kind"] == "collapse" and (not isinstance(arms, list) or not arms):
        raise ConfigError(f"study {path}: give the arms, a list of {{name, mode, real_fraction, temperature}}")
    return {
        "kind": raw["kind"],
        "base": raw.get("base", "text"),
        "seeds": seeds,
        "arms": arms,
        "baselines": raw.get("baselines", {}),
        "set": sets,
    }


def _with_seed(cfg: ExperimentConfig, seed: int, name: str, backend: str | None) -> ExperimentConfig:
    run = {"seed": seed, "name": name, **({"backend": backend} if backend else {})}
    return cfg.model_copy(update={"run": cfg.run.model_copy(update=run)})


def _run(cfg: ExperimentConfig, uri: str | None, quiet: bool) -> Any:
    from forkpop.experiments.runner import PopulationRun

    return PopulationRun(cfg, tracking_uri=uri, progress=not quiet).run()


def total_tokens(summary: Any) -> float:
    """Training tokens of a population run: every fork's and every student's."""
    return float(sum(h["world"].get("tokens", 0.0) for h in summary.history))


# -- baselines ---------------------------------------------------------------------------------
def pooled_baseline(
    cfg: ExperimentConfig, tokens: float, seed: int, lrs: tuple[float, ...], batch: int
) -> dict[str, Any]:
    """One model trained on all niches pooled for ``tokens`` training tokens (AdamW, the same
    model and start as the population's root seed), one per learning rate in ``lrs`` side by side
    (one :class:`PopulationLM`); the one best on the probe (validation) is reported on test."""
    from forkpop.experiments import core
    from forkpop.experiments.runner import PopulationRun

    run = PopulationRun(cfg, tracking=False, progress=False)
    run.load_data()
    world = run.world
    torch.set_num_threads(world.driver_threads)
    st = core.start(world, seed, run.spec.initial())
    T = world.arch.context
    steps = max(1, int(round(tokens / (batch * T))))
    eng = world.engine(st.seeds[0].weights.expand(len(lrs), -1).contiguous(), lr=list(lrs), clip=1.0)
    data = world.corpus.pooled_train()
    rng = np.random.default_rng([seed, 101])
    t0 = time.perf_counter()
    for _ in range(steps):
        starts = rng.integers(0, len(data) - T - 1, size=(len(lrs), batch))
        x = torch.from_numpy(data[starts[..., None] + np.arange(T + 1)].astype(np.int64))
        eng.step(x)
    w = eng.flat()
    probe = [world.bpb(w[i], "probe") for i in range(len(lrs))]
    best = int(np.nanargmin(probe))
    return {
        "bits_per_byte": world.bpb(w[best], "test"),
        "val_bits_per_byte": probe[best],
        "lr": lrs[best],
        "steps": steps,
        "batch": batch,
        "tokens": steps * batch * T,
        "seconds": time.perf_counter() - t0,
    }


def fedavg_baseline(cfg: ExperimentConfig, tokens: float, seed: int, lrs: tuple[float, ...]) -> dict[str, Any]:
    """FedAvg of the LMs: each round every client (the population's forks: the same niches,
    batch and local steps) starts from the global model and learns its niche, then the global
    model is their average weighted by niche size; rounds = the population's generations, local
    steps raised so that the training tokens equal the population's. Each learning rate of
    ``lrs`` runs in full; the one best on the probe (validation) is reported on test."""
    from forkpop.experiments import core
    from forkpop.experiments.runner import PopulationRun

    run = PopulationRun(cfg, tracking=False, progress=False)
    run.load_data()
    world = run.world
    torch.set_num_threads(world.driver_threads)
    st = core.start(world, seed, run.spec.initial())
    T, B = world.arch.context, cfg.lm.batch_size
    clients = cfg.population.size
    niches = [i % world.n_niches for i in range(clients)]
    rounds = cfg.run.generations
    local = max(1, int(round(tokens / (rounds * clients * B * T))))
    sizes = torch.tensor([world.niche_size(j) for j in niches], dtype=torch.float32)
    t0 = time.perf_counter()
    out = []
    for lr in lrs:
        g = st.seeds[0].weights.clone()
        rng = np.random.default_rng([seed, 202])
        for _ in range(rounds):
            eng = world.engine(g.expand(clients, -1).contiguous(), lr=[lr] * clients, clip=1.0)
            for _ in range(local):
                x = np.stack([world.transfer_source(j, None).draw(B, rng) for j in niches])
                eng.step(torch.from_numpy(x))
            w = eng.flat()
            g = (sizes[:, None] * w).sum(0) / sizes.sum()
        out.append((world.bpb(g, "probe"), lr, g))
    best = min(out, key=lambda r: r[0] if math.isfinite(r[0]) else float("inf"))
    return {
        "bits_per_byte": world.bpb(best[2], "test"),
        "val_bits_per_byte": best[0],
        "lr": best[1],
        "rounds": rounds,
        "local_steps": local,
        "tokens": rounds * local * clients * B * T,
        "seconds": time.perf_counter() - t0,
    }


# -- the studies ------------------------------------------------------------------------------
def run_text_study(study: dict, base: ExperimentConfig, seeds: list[int], out: Path, args: Any) -> dict:
    """``forkpop study text``: per run seed, the population, then the pooled model and FedAvg at
    the population's training tokens. Writes ``study.json`` and prints the table."""
    b = study["baselines"] or {}
    lrs = tuple(float(x) for x in b.get("lr", [1e-3, 3e-3]))
    pooled_batch = int(b.get("pooled_batch", base.distill.batch_size))  # the student's batch
    methods: dict[str, dict[str, list]] = {
        k: {"bits_per_byte": [], "runs": []} for k in ("population", "pooled", "fedavg")
    }
    uri = args.tracking_uri
    fork_gain = []
    for seed in seeds:
        cfg = _with_seed(base, seed, "study-text", args.backend)
        print(f"forkpop: study text, population, seed {seed}", file=sys.stderr)
        s = _run(cfg, uri, args.quiet)
        uri = s.tracking_uri
        tokens = total_tokens(s)
        pop = {
            "bits_per_byte": s.world["test_bpb"],
            "val_bits_per_byte": -s.seed_val_accuracy,
            "tokens": tokens,
            "seconds": s.wall_seconds,
            "mlflow_run_id": s.mlflow_run_id,
            "fork_own_gain_median": [h["world"].get("fork_own_gain_median", float("nan")) for h in s.history],
            "tokens_per_s": s.world.get("tokens_per_s", float("nan")),
            "samples": s.samples,
        }
        fork_gain.append(pop["fork_own_gain_median"])
        print(f"forkpop: study text, pooled, seed {seed} ({tokens:.0f} tokens)", file=sys.stderr)
        pooled = pooled_baseline(cfg, tokens, seed, lrs, pooled_batch)
        print(f"forkpop: study text, fedavg, seed {seed}", file=sys.stderr)
        fed = fedavg_baseline(cfg, tokens, seed, lrs)
        for k, r in (("population", pop), ("pooled", pooled), ("fedavg", fed)):
            methods[k]["bits_per_byte"].append(float(r["bits_per_byte"]))
            methods[k]["runs"].append({"seed": seed, **r})
    result = {"kind": "text", "seeds": seeds, "methods": methods}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(result, indent=1, default=float))
    print(format_text(result))
    return result


def format_text(result: dict) -> str:
    m = result["methods"]
    lines = ["| method | bits per byte (test), mean ± sd | per seed | vs population |", "|---|---|---|---|"]
    pop = np.array(m["population"]["bits_per_byte"])
    for k, v in m.items():
        x = np.array(v["bits_per_byte"])
        sd = float(x.std(ddof=1)) if len(x) > 1 else 0.0
        d = x - pop
        vs = "" if k == "population" else f"{d.mean():+.3f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.3f}"
        lines.append(f"| {k} | {x.mean():.3f} ± {sd:.3f} | {', '.join(f'{y:.3f}' for y in x)} | {vs} |")
    return "\n".join(lines)


def arm_config(base: ExperimentConfig, arm: dict) -> ExperimentConfig:
    mode = arm.get("mode", "replace")
    real = arm.get("real_fraction", 1.0)
    st = {"mode": mode, "temperature": float(arm.get("temperature", 1.0))}
    if mode == "replace":
        st["real_fraction"] = float(real)
    raw = deep_merge(base.model_dump(mode="json"), {"lm": {"self_train": st}})
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"study arm {arm.get('name')!r}: {e}") from None


def run_collapse_study(study: dict, base: ExperimentConfig, seeds: list[int], out: Path, args: Any) -> dict:
    """``forkpop study collapse``: each arm over the run seeds; per generation the seed's
    held-out bits per byte on real text, and the generated text's distinct-4-gram ratio and
    rare-4-gram recall. Writes ``study.json`` and the comparison plots."""
    arms = []
    uri = args.tracking_uri
    for arm in study["arms"]:
        cfg0 = arm_config(base, arm)
        rec: dict[str, Any] = {
            "name": arm["name"],
            "mode": arm.get("mode", "replace"),
            "real_fraction": None if arm.get("mode") == "accumulate" else float(arm.get("real_fraction", 1.0)),
            "temperature": float(arm.get("temperature", 1.0)),
            "bits_per_byte": [],
            "distinct4": [],
            "rare4_recall": [],
            "gzip_ratio": [],
            "bpb_by_gen0": [],
            "mlflow_run_ids": [],
        }
        for seed in seeds:
            print(f"forkpop: study collapse, arm {arm['name']}, seed {seed}", file=sys.stderr)
            s = _run(_with_seed(cfg0, seed, f"collapse-{arm['name']}", args.backend), uri, args.quiet)
            uri = s.tracking_uri
            w = [h["world"] for h in s.history]
            rec["bits_per_byte"].append([x["test_bpb"] for x in w])
            rec["distinct4"].append([x.get("gen_distinct4", float("nan")) for x in w])
            rec["rare4_recall"].append([x.get("gen_rare4_recall", float("nan")) for x in w])
            rec["gzip_ratio"].append([x.get("gen_gzip_ratio", float("nan")) for x in w])
            rec["bpb_by_gen0"].append([x.get("gen_bpb_by_gen0", float("nan")) for x in w])
            rec["mlflow_run_ids"].append(s.mlflow_run_id)
        arms.append(rec)
    result = {"kind": "collapse", "seeds": seeds, "arms": arms}
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(result, indent=1))
    plots = plot_collapse(result, out)
    print(format_collapse(result))
    print(f"forkpop: plots {', '.join(str(p) for p in plots)}")
    return result


def format_collapse(result: dict) -> str:
    arms = result["arms"]
    ctrl = next((a for a in arms if a["mode"] == "replace" and a["real_fraction"] == 1.0), arms[0])
    c = np.array(ctrl["bits_per_byte"])
    lines = [
        "| arm | bpb gen 0 | bpb last (mean ± sd) | vs control at last, per seed "
        "| rare-4 recall last / gen 0 | distinct-4 last |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        x = np.array(a["bits_per_byte"])
        d = x[:, -1] - c[:, -1]
        r = np.array(a["rare4_recall"])
        ratio = r[:, -1] / r[:, 0]
        dist = np.array(a["distinct4"])[:, -1]
        sd = x[:, -1].std(ddof=1) if len(x) > 1 else 0.0
        lines.append(
            f"| {a['name']} | {x[:, 0].mean():.3f} | {x[:, -1].mean():.3f} ± {sd:.3f} | "
            f"{', '.join(f'{v:+.3f}' for v in d)} | {np.nanmean(ratio):.2f} | {np.nanmean(dist):.3f} |"
        )
    return "\n".join(lines)


def plot_collapse(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for key, label in (
        ("bits_per_byte", "held-out bits per byte (real text, test)"),
        ("rare4_recall", "rare-4-gram recall of the generated text"),
        ("distinct4", "distinct-4-gram ratio of the generated text"),
        ("bpb_by_gen0", "generation-0 model's bits per byte on the samples"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for a in result["arms"]:
            x = np.array(a[key], dtype=float)
            m = np.nanmean(x, 0)
            sd = np.nanstd(x, 0)
            g = np.arange(len(m))
            ax.plot(g, m, marker="o", ms=3, label=a["name"])
            ax.fill_between(g, m - sd, m + sd, alpha=0.15)
        ax.set_xlabel("generation")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"collapse_{key}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p)
    return files


def cmd_text_study(args: Any, path: Path, resolve_config: Any) -> int:
    """The CLI's ``forkpop study`` for a study of kind text or collapse."""
    study = load_text_study(path)
    base = load_config(resolve_config(str(study["base"])), [*study["set"], *args.set])
    if base.data.world != "text":
        raise ConfigError(f"study {path}: base {study['base']!r} is not a text-world config (data.world: text)")
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else study["seeds"]
    out = Path(args.out)
    if study["kind"] == "text":
        run_text_study(study, base, seeds, out, args)
    else:
        run_collapse_study(study, base, seeds, out, args)
    print(f"forkpop: {out / 'study.json'}")
    return 0
