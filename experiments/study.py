"""Studies: several modes of one base experiment over several run seeds, side by side."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from forkpop.experiments.config import ConfigError, build_config, deep_merge, load_config


def load_study(path: Path) -> dict[str, Any]:
    """A study file: ``base`` (a config path or bundled name), ``seeds``, ``modes`` (name ->
    config sections laid over the base), ``report`` (metrics of the last generation)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"study {path} cannot be read ({type(e).__name__})") from None
    unknown = set(raw) - {"base", "seeds", "modes", "report"}
    if unknown:
        raise ConfigError(f"study {path}: unknown key {sorted(unknown)[0]!r}; use base, seeds, modes, report")
    if not isinstance(raw.get("modes"), dict) or not raw["modes"]:
        raise ConfigError(f"study {path}: give at least one mode under 'modes'")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"study {path}: 'seeds' must be a list of non-negative integers")
    return {
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


def summarize(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, float]]:
    """Mean and standard deviation of ``keys`` per mode over the seeds."""
    table: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        vals = [r for r in rows if r["mode"] == mode]
        t: dict[str, float] = {"runs": float(len(vals))}
        for k in keys:
            xs = [r[k] for r in vals if isinstance(r.get(k), float) and math.isfinite(r[k])]
            t[k] = float(np.mean(xs)) if xs else float("nan")
            t[f"{k}.std"] = float(np.std(xs)) if xs else float("nan")
        table[mode] = t
    return table


def format_table(table: dict[str, dict[str, float]], keys: list[str]) -> str:
    head = "| mode | runs | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for mode, t in table.items():
        cells = [f"{t[k]:.4f} ± {t[k + '.std']:.4f}" for k in keys]
        lines.append(f"| {mode} | {int(t['runs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(out: Path, rows: list[dict[str, Any]], table: dict[str, dict[str, float]]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = out / "study.json"
    p.write_text(json.dumps({"runs": rows, "summary": table}, indent=1))
    return p
