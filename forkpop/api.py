"""The Python API: :func:`run` a population from a config, :func:`load` one from its run directory.

Both give a :class:`Result`: the summary (what ``forkpop run --summary`` writes), the final seed
as an ``nn.Module``, the lineage, the config and the run directory. Errors are exceptions with
one-line messages (``ConfigError``, ``DataError``, ``PluginError``, ``CheckpointError``: all
``ValueError``\\ s).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from forkpop.experiments.config import ExperimentConfig
    from forkpop.population.lineage import Lineage

WORLD_FILE = "world.json"  # the run's world: class names and input shape, so load() needs no data


@dataclass
class Result:
    """A population run's outcome.

    ``summary``: the dict ``forkpop run --summary`` writes (``seed_test_accuracy``,
    ``history``, ``workers`` ...; empty for a run that did not finish); ``seed_model``: the
    final seed, an ``nn.Module`` in eval mode; ``lineage``: every birth and its parents
    (:class:`forkpop.population.lineage.Lineage`); ``config``: the ``ExperimentConfig`` it ran;
    ``run_dir``: its run directory; ``generation``: the generation of the checkpoint read;
    ``seed_id``: the final seed's id in the lineage.
    """

    summary: dict[str, Any]
    seed_model: torch.nn.Module
    lineage: Lineage
    config: ExperimentConfig
    run_dir: Path
    generation: int
    seed_id: str

    def __repr__(self) -> str:
        acc = self.summary.get("seed_test_accuracy")
        shown = f"{acc:.4f}" if isinstance(acc, float) else "unfinished"
        return (
            f"Result(run_dir={str(self.run_dir)!r}, family={self.config.model.family!r}, "
            f"generations={self.generation + 1}, births={len(self.lineage)}, seed_test_accuracy={shown})"
        )


def _overrides(raw: dict, overrides: Sequence[str] | Mapping[str, Any] | str | None) -> dict:
    """``raw`` with ``overrides``: ``key=value`` strings (as ``--set``) or a dict of dotted keys
    (``{"run.generations": 2}``) or sections (``{"run": {"generations": 2}}``)."""
    from forkpop.experiments.config import ConfigError, apply_overrides, deep_merge

    if overrides is None:
        return raw
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            parts = str(key).split(".")
            if not all(parts):
                raise ConfigError(f"override {key!r}: the key is malformed; use dotted names like data.alpha")
            nested: Any = value
            for p in reversed(parts):
                nested = {p: nested}
            raw = deep_merge(raw, nested)
        return raw
    if not all(isinstance(o, str) for o in overrides):
        raise ConfigError("overrides: give a list of 'key=value' strings or a dict {key: value}")
    return apply_overrides(raw, list(overrides))


def _raw_config(config: str | Path | Mapping[str, Any] | ExperimentConfig) -> dict:
    """The config as a mapping laid over the defaults, as a YAML file is."""
    from forkpop.experiments import config as c
    from forkpop.experiments.cli import _resolve_config

    defaults = c.ExperimentConfig().model_dump(mode="json")
    if isinstance(config, c.ExperimentConfig):
        return config.model_dump(mode="json")
    if isinstance(config, Mapping):
        raw = dict(config)
        base = raw.pop("base", None)
        if base is not None:  # as in a YAML file: a bundled name or a path
            raw = c.deep_merge(c._read_yaml(Path(_resolve_config(str(base)))), raw)
        return c.deep_merge(defaults, raw)
    if isinstance(config, (str, Path)):
        return c.deep_merge(defaults, c._read_yaml(Path(_resolve_config(str(config)))))
    raise c.ConfigError(f"config: give a YAML path, a bundled name ('digits') or a dict, not a {type(config).__name__}")


def make_config(
    config: str | Path | Mapping[str, Any] | ExperimentConfig,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    seed: int | None = None,
    backend: str | None = None,
) -> ExperimentConfig:
    """The checked ``ExperimentConfig`` :func:`run` would run (``ConfigError`` in one line)."""
    from forkpop.experiments.config import ConfigError, build_config

    raw = _overrides(_raw_config(config), overrides)
    for key, value in (("seed", seed), ("backend", backend)):
        if value is not None:
            if not isinstance(raw.get("run", {}), dict):
                raise ConfigError("run must be a section (a mapping)")
            raw.setdefault("run", {})[key] = value
    return build_config(raw)


def run(
    config: str | Path | Mapping[str, Any] | ExperimentConfig,
    *,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    seed: int | None = None,
    backend: str | None = None,
    tracking: bool = True,
    tracking_uri: str | None = None,
    address: str | None = None,
    progress: bool = False,
) -> Result:
    """Run a population and return its :class:`Result`.

    ``config``: a YAML path, a bundled name (``"digits"``) or a dict (laid over the defaults
    like a YAML file; ``base`` works too). ``overrides``: ``key=value`` strings, as
    ``--set``, or a dict. ``seed``/``backend`` (``ray`` or ``local``) set ``run.seed`` /
    ``run.backend``. ``tracking=False`` writes no MLflow records (the run directory still gets
    its config and checkpoints); ``tracking_uri``/``address`` as ``--tracking-uri``/``--address``.
    """
    from forkpop.experiments.runner import PopulationRun

    cfg = make_config(config, overrides, seed, backend)
    pr = PopulationRun(cfg, tracking_uri=tracking_uri, address=address, progress=progress, tracking=tracking)
    pr.load_data()
    # As --summary and summary.json hold it (JSON: tuples are lists, unknown types strings).
    summary = json.loads(json.dumps(asdict(pr.run()), default=str))
    run_dir = Path(summary.get("run_dir") or pr.run_dir)
    return _load(run_dir, cfg, summary, _shape(run_dir))


def load(run_dir: str | Path) -> Result:
    """The :class:`Result` of the run in ``run_dir`` (``runs/<name>-s<seed>-<time>``), from its
    config, its last checkpoint and its ``summary.json`` (empty if the run did not finish)."""
    from forkpop.experiments.checkpoint import CheckpointError
    from forkpop.experiments.config import load_config

    folder = Path(run_dir)
    if not (folder / "config.yaml").is_file():
        raise CheckpointError(
            f"{str(folder)!r} is not a run directory (no config.yaml); give runs/<name>-s<seed>-<time>"
        )
    cfg = load_config(folder / "config.yaml")
    summary_file = folder / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return _load(folder, cfg, summary, _shape(folder))


def _shape(run_dir: Path) -> tuple[int, int, tuple[int, ...]] | None:
    """The model's input size, classes and input shape from the run's ``world.json``."""
    f = run_dir / WORLD_FILE
    if not f.is_file():
        return None
    w = json.loads(f.read_text())
    if "input_shape" not in w or "classes" not in w:
        return None
    shape = tuple(int(v) for v in w["input_shape"])
    return int(np.prod(shape)), len(w["classes"]), shape


def _load(
    run_dir: Path, cfg: ExperimentConfig, summary: dict, sizes: tuple[int, int, tuple[int, ...]] | None
) -> Result:
    from forkpop.experiments.checkpoint import CheckpointError, read_checkpoint
    from forkpop.experiments.specs import data_spec, model_spec
    from forkpop.population.lineage import Lineage
    from forkpop.population.models import load_flat_weights

    folders = sorted(p for p in (run_dir / "checkpoints").glob("gen-*") if p.is_dir())
    if not folders:
        raise CheckpointError(
            f"{str(run_dir)!r} holds no checkpoints (checkpoints/gen-NNNN): the run stopped before its first "
            "generation ended; run it again"
        )
    tensors, state = read_checkpoint(folders[-1])
    if sizes is None:  # a run made by the CLI: the data tell the model's input and output sizes
        from forkpop.workers.data import load_data

        bundle = load_data(data_spec(cfg))
        sizes = (bundle.n_features, bundle.n_classes, bundle.input_shape)
    model = model_spec(cfg).build(sizes[0], sizes[1], input_shape=sizes[2])
    load_flat_weights(model, tensors["seed"]).eval()
    return Result(
        summary=summary,
        seed_model=model,
        lineage=Lineage.from_dict(state["lineage"]),
        config=cfg,
        run_dir=run_dir,
        generation=int(state.get("generation", len(folders) - 1)),
        seed_id=str(state["seed"]["id"]),
    )
