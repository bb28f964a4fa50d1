"""Studies: several modes of one base experiment over partitions and run seeds, side by side,
with the baselines (FedAvg, centralized) on the same partitions where the study asks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from forkpop.experiments.config import ConfigError, build_config, deep_merge, load_config


def load_study(path: Path) -> dict[str, Any]:
    """A study file: ``base`` (a config path or bundled name), ``seeds`` (run seeds),
    ``partitions`` (``data.seed`` values; default: the base's), ``modes`` (name -> config
    sections laid over the base), ``baselines`` (of ``fedavg``, ``centralized``: run on each
    partition), ``report`` (metrics of the last generation)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"study {path} cannot be read ({type(e).__name__})") from None
    unknown = set(raw) - {"base", "seeds", "partitions", "modes", "baselines", "report"}
    if unknown:
        raise ConfigError(
            f"study {path}: unknown key {sorted(unknown)[0]!r}; use base, seeds, partitions, modes, baselines, report"
        )
    if not isinstance(raw.get("modes"), dict) or not raw["modes"]:
        raise ConfigError(f"study {path}: give at least one mode under 'modes'")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"study {path}: 'seeds' must be a list of non-negative integers")
    partitions = raw.get("partitions")
    if partitions is not None and (
        not isinstance(partitions, list) or not all(isinstance(s, int) and s >= 0 for s in partitions)
    ):
        raise ConfigError(f"study {path}: 'partitions' must be a list of non-negative integers (data.seed values)")
    from forkpop.experiments.baselines import BASELINES

    baselines = raw.get("baselines", [])
    if not isinstance(baselines, list) or any(b not in BASELINES for b in baselines):
        raise ConfigError(f"study {path}: 'baselines' must be a list of {list(BASELINES)}")
    return {
        "partitions": partitions,
        "baselines": baselines,
        "base": raw.get("base", "digits"),
        "seeds": seeds,
        "modes": raw["modes"],
        "report": raw.get("report", ["seed_test_accuracy", "div.disagreement"]),
    }


def mode_configs(study: dict[str, Any], base_path: str, overrides: list[str]) -> dict[str, Any]:
    """Each mode's checked config (base, then the mode's sections, then ``--set`` overrides)."""
    base = load_config(base_path, overrides)
    out = {}
    for name, sections in study["modes"].items():
        try:
            cfg = build_config(deep_merge(base.model_dump(mode="json"), sections or {}))
        except ConfigError as e:
            raise ConfigError(f"study mode {name!r}: {e}") from None
        out[name] = cfg
    return out


def _finite(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def summarize(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    """Per mode: mean and sample standard deviation of ``keys`` over its runs (partitions x
    seeds), the sd of the per-partition means (``.sd_partitions``), and the mean paired
    difference to the first mode over the (partition, seed) pairs both ran (``.vs_first``, with
    its sd ``.vs_first.std``)."""
    table: dict[str, dict[str, float]] = {}
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    first = {(r.get("partition"), r.get("seed")): r for r in rows if r["mode"] == modes[0]} if modes else {}
    for mode in modes:
        vals = [r for r in rows if r["mode"] == mode]
        t: dict[str, float] = {"runs": float(len(vals))}
        for k in keys:
            xs = [r[k] for r in vals if _finite(r.get(k))]
            t[k] = float(np.mean(xs)) if xs else float("nan")
            t[f"{k}.std"] = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0 if xs else float("nan")
            parts = {}
            for r in vals:
                if _finite(r.get(k)):
                    parts.setdefault(r.get("partition"), []).append(r[k])
            means = [float(np.mean(v)) for v in parts.values()]
            t[f"{k}.sd_partitions"] = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
            for part, v in parts.items():
                t[f"{k}.partition{part}"] = float(np.mean(v))
            diffs = []
            for r in vals:  # paired with the first mode's run on the same partition (and seed)
                key = (r.get("partition"), r.get("seed"))
                other = first.get(key) or first.get((key[0], 0))
                if other is not None and _finite(r.get(k)) and _finite(other.get(k)):
                    diffs.append(r[k] - other[k])
            t[f"{k}.vs_first"] = float(np.mean(diffs)) if diffs else float("nan")
            t[f"{k}.vs_first.std"] = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0
        table[mode] = t
    return table


def format_table(table: dict[str, dict[str, float]], keys: list[str]) -> str:
    """Mean ± sd over runs, and the paired difference to the first mode, per mode and key."""
    first = next(iter(table), "")
    head = "| mode | runs | " + " | ".join(f"{k} | vs {first}" for k in keys) + " |"
    lines = [head, "|" + "---|" * (2 * len(keys) + 2)]
    for mode, t in table.items():
        cells = []
        for k in keys:
            cells.append(f"{t[k]:.4f} ± {t[k + '.std']:.4f}")
            d = t.get(f"{k}.vs_first", float("nan"))
            cells.append("" if mode == first or not math.isfinite(d) else f"{d:+.4f} ± {t[k + '.vs_first.std']:.4f}")
        lines.append(f"| {mode} | {int(t['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, rows: list[dict[str, Any]], table: dict[str, dict[str, float]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "study.json"
    p.write_text(json.dumps({"runs": rows, "summary": table}, indent=1))
    return p
