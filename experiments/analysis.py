"""Reports from MLflow alone: the lineage tree, diversity plots, an HTML report, run comparisons.

Everything here reads a finished (or running) population run through the tracking store,
so a run made on another machine is analysed the same way once its store is reachable.
"""

from __future__ import annotations

import base64
import html
import json
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forkpop.population.lineage import Lineage
from forkpop.population.variant import Origin

# Parent-run metrics, grouped into one plot each.
PLOTS: dict[str, tuple[str, list[str]]] = {
    "fitness": ("Fitness (validation accuracy of the forks)", ["best_fitness", "mean_fitness"]),
    "seed_accuracy": (
        "Accuracy of the seed, the best individual and the ensemble",
        ["seed_val_accuracy", "seed_test_accuracy", "best_individual_test_accuracy", "ensemble_test_accuracy"],
    ),
    "diversity_function": (
        "Functional diversity on the probe",
        ["div.disagreement", "div.js", "div.ambiguity_accuracy"],
    ),
    "diversity_divergence": ("Predictive divergence (nats)", ["div.kl", "div.ambiguity"]),
    "diversity_parameters": ("Parameter distances", ["div.weight_l2", "div.weight_to_seed"]),
    "diversity_cosine": ("Parameter cosine distance", ["div.weight_cosine"]),
    "diversity_representations": ("Representation similarity (linear CKA, 1 = alike)", ["div.cka"]),
    "diversity_genotype": ("Genotype spread (genes scaled to [0, 1])", ["div.genome_distance"]),
    "lineage_stats": (
        "Lineage",
        ["div.founders_alive", "div.effective_parents", "div.tmrca", "div.alive"],
    ),
    # The text world (lm.*): held-out bits per byte on real text, and what its own text is like.
    "lm_bits_per_byte": (
        "Held-out bits per byte of the seed (test; 4-grams rare or frequent in the real corpus)",
        ["lm.test_bpb", "lm.test_bpb_rare4", "lm.test_bpb_frequent4"],
    ),
    "lm_generated_text": (
        "The generated text: distinct 4-grams, gzip ratio, rare-4-gram recall",
        ["lm.gen_distinct4", "lm.gen_gzip_ratio", "lm.gen_rare4_recall"],
    ),
    # The label-budget and environment worlds (budget.*, env.*): System M's lifetimes.
    "budget_lifetimes": (
        "System M's lifetimes: budget spent after the stream's midpoint, share observed, share spent",
        ["budget.late_share", "budget.observe_share", "budget.spent_share"],
    ),
    "budget_switches": ("System M's switches between observing and buying (median per lifetime)", ["budget.switches"]),
    "env_returns": (
        "Greedy return (reported episodes): the seed, the median fork at the end of its life",
        ["env.seed_return", "env.median_return"],
    ),
    "env_modes": ("System M's lifetimes: share of the steps observing", ["env.observe_share"]),
    "lm_generated_scores": (
        "The generated text scored: generation 0's bits per byte on it, the seed's entropy",
        ["lm.gen_bpb_by_gen0", "lm.gen_entropy_bits"],
    ),
}


class AnalysisError(ValueError):
    """A run that cannot be read: one line saying why."""


@dataclass
class RunData:
    run_id: str
    name: str
    metrics: dict[str, list[tuple[int, float]]]
    params: dict[str, str]
    lineage: Lineage
    matrices: dict[int, dict] = field(default_factory=dict)
    samples: str = ""  # the text world: samples of the final seed (artifact samples.txt)
    modes: dict[int, dict] = field(default_factory=dict)  # System M's traces per generation (artifact modes/)


def population_run(run_id: str, tracking_uri: str | None) -> tuple[Any, Any]:
    """An MLflow client of the store and the population run ``run_id`` in it; a run that is
    not there, or not a population run, is one line (:class:`AnalysisError`)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise AnalysisError(
            f"no MLflow run {run_id!r} in {tracking_uri or 'the default store'}; check the id and --tracking-uri"
        ) from None
    if run.data.tags.get("forkpop.kind") != "population":
        raise AnalysisError(f"run {run_id} is not a forkpop population run (a variant's run? give its parent)")
    return client, run


def load_run(run_id: str, tracking_uri: str | None, matrices: bool = True) -> RunData:
    """A population run's per-generation metrics, config, lineage and disagreement matrices."""
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from forkpop.experiments.tracking import artifact_jsons, lineage_from_mlflow

    client, run = population_run(run_id, tracking_uri)
    metrics = {}
    for key in run.data.metrics:
        hist = client.get_metric_history(run_id, key)
        metrics[key] = sorted((m.step, m.value) for m in hist)
    out = RunData(
        run_id, run.info.run_name or run_id, metrics, dict(run.data.params), lineage_from_mlflow(run_id, tracking_uri)
    )
    if matrices:
        with tempfile.TemporaryDirectory() as tmp:
            for name, m in artifact_jsons(client, run, "diversity", tmp).items():
                if name.startswith("gen-"):
                    out.matrices[int(Path(name).stem.split("-")[1])] = m
            if run.data.tags.get("forkpop.world") in ("budget", "env"):
                for name, m in artifact_jsons(client, run, "modes", tmp).items():
                    if name.startswith("gen-"):
                        out.modes[int(Path(name).stem.split("-")[1])] = m
            if run.data.tags.get("forkpop.world") == "text":
                try:
                    out.samples = Path(client.download_artifacts(run_id, "samples.txt", tmp)).read_text()
                except Exception:  # a run killed before its end has none
                    out.samples = ""
    return out


# -- the lineage --------------------------------------------------------------------------------


def lineage_text(lin: Lineage, max_forks: int = 6) -> str:
    """The lineage as an indented tree: each seed, its forks, and the seed distilled from them.

    A distilled seed lists all its teachers as parents; forks beyond ``max_forks`` per seed
    are summarised in one line.
    """
    lines = []
    seeds = sorted((v for v in lin if v.origin is not Origin.FORK), key=lambda v: (v.generation, v.id))
    children: dict[str, list] = {}
    for v in lin:
        for p in v.parents:
            children.setdefault(p, []).append(v)
    for s in seeds:
        parents = f" <- {len(s.parents)} teachers: {', '.join(s.parents)}" if s.parents else ""
        lines.append(f"{s.id} [{s.origin.value}, generation {s.generation}]{parents}")
        forks = sorted((c for c in children.get(s.id, []) if c.origin is Origin.FORK), key=lambda v: v.id)
        shown = forks[:max_forks]
        for i, f in enumerate(shown):
            branch = "└──" if i == len(shown) - 1 and len(forks) <= max_forks else "├──"
            kids = [c.id for c in children.get(f.id, [])]
            to = f" -> {', '.join(kids)}" if kids else ""
            lines.append(f"  {branch} {f.id} (niche {f.niche}){to}")
        if len(forks) > max_forks:
            lines.append(f"  └── ... {len(forks) - max_forks} more forks")
    return "\n".join(lines)


def lineage_graphml(lin: Lineage) -> str:
    """The lineage as GraphML (nodes with generation, origin, niche and genes; parent -> child edges)."""
    keys = [("generation", "int"), ("origin", "string"), ("niche", "int")]
    genes = sorted({k for v in lin for k in v.genome.as_dict()})
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">']
    for k, t in keys + [(f"gene.{g}", "double") for g in genes]:
        out.append(f'  <key id="{k}" for="node" attr.name="{k}" attr.type="{t}"/>')
    out.append('  <graph id="lineage" edgedefault="directed">')
    for v in lin:
        out.append(f'    <node id="{html.escape(v.id)}">')
        out.append(f'      <data key="generation">{v.generation}</data>')
        out.append(f'      <data key="origin">{v.origin.value}</data>')
        if v.niche is not None:
            out.append(f'      <data key="niche">{v.niche}</data>')
        for g, val in v.genome.as_dict().items():
            out.append(f'      <data key="gene.{g}">{val!r}</data>')
        out.append("    </node>")
    for i, (p, c) in enumerate(lin.edges()):
        out.append(f'    <edge id="e{i}" source="{html.escape(p)}" target="{html.escape(c)}"/>')
    out += ["  </graph>", "</graphml>"]
    return "\n".join(out) + "\n"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_lineage(lin: Lineage, paths: list[Path]) -> None:
    """The lineage as a picture: generations top to bottom, seeds as squares, forks as dots."""
    plt = _plt()
    rows: dict[tuple[int, bool], list] = {}
    for v in lin:
        # Forks of generation g on row 2g + 1, the seed distilled after it on row 2g + 2.
        rows.setdefault((v.generation, v.origin is Origin.FORK), []).append(v)
    pos = {}
    for (g, is_fork), vs in rows.items():
        y = -(2 * g + 1) if is_fork else -(2 * g)
        vs = sorted(vs, key=lambda v: v.id)
        for i, v in enumerate(vs):
            pos[v.id] = ((i + 0.5) / len(vs), y)
    gens = max((v.generation for v in lin), default=0)
    fig, ax = plt.subplots(figsize=(10, max(4, 0.9 * (gens + 1))))
    for p, c in lin.edges():
        (x0, y0), (x1, y1) = pos[p], pos[c]
        ax.plot([x0, x1], [y0, y1], color="0.75", lw=0.5, zorder=1)
    forks = [v for v in lin if v.origin is Origin.FORK]
    seeds = [v for v in lin if v.origin is not Origin.FORK]
    ax.scatter([pos[v.id][0] for v in forks], [pos[v.id][1] for v in forks], s=14, c="tab:blue", label="fork", zorder=2)
    ax.scatter(
        [pos[v.id][0] for v in seeds],
        [pos[v.id][1] for v in seeds],
        s=60,
        marker="s",
        c="tab:red",
        label="seed",
        zorder=3,
    )
    ax.set_yticks([-(2 * g) for g in range(gens + 1)], [f"gen {g}" for g in range(gens + 1)])
    ax.set_xticks([])
    ax.set_xlabel("variants of a generation, side by side")
    ax.set_title(f"Lineage: {len(lin)} births; a distilled seed's parents are all its teachers")
    ax.legend(loc="lower right")
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)


def write_lineage(data: RunData, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "lineage.png", out / "lineage.svg", out / "lineage.graphml", out / "lineage.json"]
    draw_lineage(data.lineage, files[:2])
    files[2].write_text(lineage_graphml(data.lineage))
    files[3].write_text(data.lineage.to_json())
    return files


# -- plots and the report -----------------------------------------------------------------------


def plot_series(runs: list[RunData], keys: list[str], title: str, path: Path) -> bool:
    """One figure with ``keys`` over generations for each run; False when none has data."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    styles = ["-", "--", ":", "-."]
    for r_i, run in enumerate(runs):
        for k_i, key in enumerate(keys):
            pts = run.metrics.get(key)
            if not pts:
                continue
            label = key if len(runs) == 1 else f"{run.name}: {key}"
            ax.plot(
                [s for s, _ in pts],
                [v for _, v in pts],
                styles[k_i % 4],
                marker="o",
                ms=3,
                label=label,
                color=f"C{r_i if len(runs) > 1 else k_i}",
            )
            drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.set_xlabel("generation")
    ax.set_ylabel(", ".join(k.removeprefix("div.") for k in keys) if len(keys) < 3 else "value")
    ax.set_title("\n".join(textwrap.wrap(title, 64)))  # a long title in lines, not cut at the figure's edge
    ax.grid(alpha=0.3)
    if drawn > 4:  # many curves: the legend beside the axes, not over them
        fig.set_size_inches(10, 4.5)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_heatmap(matrix: dict, generation: int, path: Path) -> None:
    plt = _plt()
    import numpy as np

    m = np.asarray(matrix["disagreement"])
    ids = [i.split("-")[-1] for i in matrix["ids"]]
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(m, vmin=0, vmax=max(0.05, float(m.max()) if m.size else 1), cmap="viridis")
    ax.set_xticks(range(len(ids)), ids, rotation=90, fontsize=6)
    ax.set_yticks(range(len(ids)), ids, fontsize=6)
    ax.set_xlabel("variant")
    ax.set_ylabel("variant")
    ax.set_title(f"Pairwise disagreement on the probe, generation {generation}")
    fig.colorbar(im, ax=ax, label="share of probe inputs predicted differently")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


MODE_COLOURS = {"A": "#4c72b0", "B": "#dd8452", "F": "#55a868"}
MODE_NAMES = {"A": "observe (System A)", "B": "act (System B)", "F": "free label"}


def _segments(trace: dict) -> tuple[list[tuple[float, float, str]], float]:
    """A trace's (start, length, mode) segments and its total length: the budget world's are
    one arrival each, the environment world's one episode each (``starts``, ``lengths``)."""
    modes = trace.get("modes", "")
    if "lengths" in trace:
        segs = zip(trace["starts"], trace["lengths"], modes, strict=True)
        return [(float(a), float(n), m) for a, n, m in segs], float(sum(trace["lengths"]))
    return [(float(t), 1.0, m) for t, m in enumerate(modes)], float(len(modes))


def plot_modes(traces: dict, generation: int, path: Path) -> bool:
    """System M's modes over each lifetime of ``generation`` (one row per variant, time as the
    share of the lifetime) beside its spending over time: the share of the budget bought by
    each point of the stream (budget world; the dashed line is an even pace) or the share of
    the steps spent acting (environment world)."""
    if not traces:
        return False
    plt = _plt()
    from matplotlib.patches import Patch

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 0.25 * len(traces) + 2.5))
    seen: set[str] = set()
    for row, (_, tr) in enumerate(sorted(traces.items())):
        segs, total = _segments(tr)
        for a, n, m in segs:
            ax.barh(row, n / max(total, 1), left=a / max(total, 1), height=0.8, color=MODE_COLOURS.get(m, "#999"), lw=0)
            seen.add(m)
        if "spent_at" in tr:  # the budget world: share of the budget spent by each point of the stream
            budget = max(int(tr.get("budget", len(tr["spent_at"]))), 1)
            xs = [p / max(total, 1) for p in tr["spent_at"]]
            bx.step([0, *xs, 1], [0, *[(i + 1) / budget for i in range(len(xs))], len(xs) / budget], where="post", lw=1)
        else:  # the environment world: share of the steps spent acting
            acted = [n if m == "B" else 0.0 for _, n, m in segs]
            cum = [sum(acted[: i + 1]) / max(total, 1) for i in range(len(acted))]
            bx.plot([0.0] + [(a + n) / max(total, 1) for a, n, _ in segs], [0.0, *cum], lw=1)
    ax.set_yticks(range(len(traces)), [v.split("-")[-1] for v in sorted(traces)], fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the lifetime")
    ax.set_title(f"System M's mode over each lifetime, generation {generation}")
    handles = [Patch(color=MODE_COLOURS[m], label=MODE_NAMES[m]) for m in "ABF" if m in seen]
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    budget_world = any("spent_at" in t for t in traces.values())
    if budget_world:
        bx.plot([0, 1], [0, 1], "k--", lw=0.8, label="even pace")
        bx.legend(fontsize=7)
    bx.set_xlabel("share of the stream read" if budget_world else "share of the lifetime")
    bx.set_ylabel("share of the budget spent" if budget_world else "share of the steps spent acting")
    bx.set_title("Budget spent over time" if budget_world else "Acting over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def analyze(
    run_id: str, out: Path, tracking_uri: str | None, heatmaps: list[int] | None = None, progress: bool = True
) -> Path:
    """Write PNG plots and one self-contained ``report.html`` for a run into ``out``."""
    from tqdm import tqdm

    data = load_run(run_id, tracking_uri)  # a bad id fails here, before any output
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(PLOTS) + 4, desc="analyze", unit="step", disable=not progress)
    bar.update(1)
    figures: list[tuple[str, Path]] = []
    for name, (title, keys) in PLOTS.items():
        p = out / f"{name}.png"
        if plot_series([data], keys, title, p):
            figures.append((title, p))
        bar.update(1)
    gens = sorted(data.matrices)
    chosen = heatmaps if heatmaps is not None else sorted({gens[0], gens[len(gens) // 2], gens[-1]}) if gens else []
    for g in chosen:
        if g in data.matrices and data.matrices[g]["disagreement"]:
            p = out / f"disagreement_gen{g:04d}.png"
            plot_heatmap(data.matrices[g], g, p)
            figures.append((f"Pairwise disagreement, generation {g}", p))
    for g in sorted({min(data.modes), max(data.modes)}) if data.modes else []:
        p = out / f"modes_gen{g:04d}.png"
        if plot_modes(data.modes[g], g, p):
            figures.append((f"System M's modes and spending, generation {g}", p))
    bar.update(1)
    for f in write_lineage(data, out):
        if f.suffix == ".png":
            figures.append(("Lineage", f))
    bar.update(1)
    from forkpop.experiments.explorer import ARTIFACT, build

    (out / ARTIFACT).write_text(build(run_id, tracking_uri))
    report = out / "report.html"
    report.write_text(_html(data, figures))
    bar.update(1)
    bar.close()
    return report


def _html(data: RunData, figures: list[tuple[str, Path]]) -> str:
    last = {k: v[-1][1] for k, v in data.metrics.items() if v}
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>"
        for k, v in sorted(last.items())
        if not k.startswith("time_")
    )
    imgs = "".join(
        f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for t, p in figures
    )
    cfg = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in sorted(data.params.items())
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>forkpop run {html.escape(data.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
        "figure{display:inline-block;width:48%;margin:0.5%}td{padding:2px 8px}"
        "table{border-collapse:collapse;font-size:13px}tr:nth-child(even){background:#f3f3f3}</style></head><body>"
        f"<h1>forkpop run {html.escape(data.name)}</h1><p>MLflow run {html.escape(data.run_id)}; "
        f"{len(data.lineage)} births over {1 + max((v.generation for v in data.lineage), default=0)} generations. "
        "The interactive lineage and curves: <a href='explorer.html'>explorer.html</a>, beside this report.</p>"
        f"{imgs}<h2>Last generation</h2><table>{rows}</table>"
        + (
            f"<h2>Samples of the final seed</h2><pre style='white-space:pre-wrap'>{html.escape(data.samples)}</pre>"
            if data.samples
            else ""
        )
        + f"<details><summary>Config</summary><table>{cfg}</table></details></body></html>"
    )


def compare(run_ids: list[str], out: Path, tracking_uri: str | None, progress: bool = True) -> list[Path]:
    """Plot several runs' curves on the same axes, one PNG per group of metrics, plus a table."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    runs = [load_run(r, tracking_uri, matrices=False) for r in tqdm(run_ids, desc="load", disable=not progress)]
    files = []
    for name, (title, keys) in PLOTS.items():
        p = out / f"compare_{name}.png"
        if plot_series(runs, keys, title, p):
            files.append(p)
    table = out / "compare.json"
    table.write_text(
        json.dumps(
            {r.run_id: {"name": r.name, "last": {k: v[-1][1] for k, v in r.metrics.items() if v}} for r in runs},
            indent=1,
        )
    )
    files.append(table)
    return files


def summary_rows(runs: list[RunData], keys: list[str]) -> list[dict[str, Any]]:
    return [
        {"run": r.name, **{k: (r.metrics[k][-1][1] if r.metrics.get(k) else float("nan")) for k in keys}} for r in runs
    ]
