"""From a config to what the run is made of: the data, model and learner specs the workers
rebuild from, and the classification world."""

from __future__ import annotations

from pathlib import Path

from forkpop.experiments.config import ExperimentConfig
from forkpop.workers.classification import ClassificationWorld
from forkpop.workers.data import DataError, DataSpec, SplitPlan, load_data
from forkpop.workers.learner import AuditSpec, LearnerSpec, ModelSpec

from forkpop.plugins import import_roots, register, resolve


def data_spec(cfg: ExperimentConfig) -> DataSpec:
    """The data spec of ``cfg``: enough for any worker to load the same splits and niches."""
    d = cfg.data
    return DataSpec(
        source=d.source,
        path=str(Path(d.path).resolve()) if d.path else None,
        label_column=d.label_column,
        label=d.label,
        standardize=d.standardize,
        val_fraction=d.val_fraction,
        accept_fraction=d.accept_fraction,
        split_seed=d.split_seed,
        partition=d.partition,
        n_niches=cfg.n_niches,
        alpha=d.alpha,
        shards_per_niche=d.shards_per_niche,
        min_niche_size=d.min_niche_size,
        seed=d.seed,
        poison_kind=d.poison.kind,
        poison_niches=d.poison.niches,
        poison_rate=d.poison.rate,
        backdoor_target=d.poison.target,
        noise_std=d.poison.noise_std,
    )


def model_spec(cfg: ExperimentConfig) -> ModelSpec:
    """The model spec of ``cfg``: the family every variant shares, resolved here (a name that
    does not resolve is a one-line ``PluginError`` naming model.family) with the folders its
    import path needs in a worker."""
    m = cfg.model
    resolve("models", m.family, "model.family")
    return ModelSpec(m.family, tuple(m.hidden), m.options, import_roots(m.family))


def learner_spec(cfg: ExperimentConfig, plan: SplitPlan | None = None) -> LearnerSpec:
    """What every learner of the run shares; ``plan`` is the driver's split of the data."""
    run = cfg.run
    return LearnerSpec(
        data_spec(cfg),
        model_spec(cfg),
        cfg.data.batch_size,
        run.torch_threads,
        plan,
        engine=run.engine,
        device=run.device,
        kernel=run.kernel,
        audit=AuditSpec(**cfg.data.audit.model_dump()),
    )


def classification_world(cfg: ExperimentConfig) -> ClassificationWorld:
    """The classification world of ``cfg`` (``data.world: classification``): its data loaded
    and checked here, in the driver, before Ray or MLflow start."""
    data = load_data(data_spec(cfg))
    bsz = cfg.data.batch_size
    small = [i for i, n in enumerate(data.niches) if len(n) < bsz]
    if small:
        least = min(len(data.niches[i]) for i in small)
        raise DataError(
            f"niches {small} hold fewer samples (the least {least}) than one batch (data.batch_size={bsz}); "
            f"lower data.batch_size, raise data.min_niche_size to {bsz} or use fewer niches"
        )
    return ClassificationWorld(data, learner_spec(cfg, data.plan))


def text_world(cfg: ExperimentConfig):  # noqa: ANN201 - a TextWorld, imported when asked for
    """The language-model world of ``cfg`` (``data.world: text``; see :mod:`forkpop.workers.text_world`)."""
    from forkpop.selection import lm_distiller  # noqa: F401 - registers distill.method lm_kd
    from forkpop.workers.text_world import text_world as build

    return build(cfg)


# A world plug-in is a factory ``(ExperimentConfig) -> World`` registered as kind ``worlds``.
def budget_world(cfg: ExperimentConfig):  # noqa: ANN201 - a BudgetWorld, imported when asked for
    """The label-budget world of ``cfg`` (``data.world: budget``; see :mod:`forkpop.workers.budget_world`)."""
    from forkpop.workers.budget_world import budget_world as build

    return build(cfg)


def env_world(cfg: ExperimentConfig):  # noqa: ANN201 - an EnvWorld, imported when asked for
    """The environment world of ``cfg`` (``data.world: env``; see :mod:`forkpop.workers.env_world`)."""
    from forkpop.workers.env_world import env_world as build

    return build(cfg)


register("worlds", "classification", classification_world)
register("worlds", "text", text_world)
register("worlds", "budget", budget_world)
register("worlds", "env", env_world)
