"""The experiment config: a typed schema, YAML loading and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from forkpop.population.genome import Gene, GenomeSpec, default_genome_spec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem a user can fix; its message is one line that says what to change."""


def _leaves_root(relative: str) -> bool:
    """Whether ``relative`` may name a place outside its root: empty, absolute, a ``..`` component,
    a backslash (a separator on Windows) or a control character."""
    p = PurePosixPath(relative)
    return not relative or p.is_absolute() or ".." in p.parts or "\\" in relative or not relative.isprintable()


def contained(root: str | Path, relative: str, key: str = "path") -> Path:
    """``root / relative`` for ``relative`` taken from the config value ``key``; a :class:`ConfigError`
    when it could lead out of ``root`` (see :func:`_leaves_root`)."""
    if _leaves_root(relative):
        raise ConfigError(f"{key}={relative!r} must stay inside {root}; give a relative path without '..' or '\\'")
    return Path(root) / relative


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(_Strict):
    name: str = Field("forkpop", description="Name of the run (MLflow run name, run directory prefix).")
    seed: int = Field(0, ge=0, description="Seeds fork noise, selection, mutation and distillation.")
    generations: int = Field(10, ge=1, description="Number of fork → learn → select → distill rounds.")
    backend: Literal["auto", "ray", "local"] = Field(
        "auto",
        description="Where learners run: Ray actors (ray), in this process (local), or auto: Ray when a "
        "cluster address is given (run.address, --address, RAY_ADDRESS), else in this process.",
    )
    address: str | None = Field(None, description="Ray cluster address; None (with backend ray) starts a local Ray.")
    workers: int | None = Field(
        None,
        ge=1,
        description="Number of Ray actors; None: one per GPU Ray reports, else one per CPU "
        "(at most one per 64 variants with the batched engine).",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray; None: all.")
    reachable_ray: bool = Field(
        False,
        description="Start the local Ray on this machine's network address so that other nodes can join "
        "(needs Ray token authentication configured); off: it listens on loopback only.",
    )
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs each Ray actor asks for (Ray's num_cpus); actors never outnumber the slots."
    )
    torch_threads: int = Field(1, ge=1, description="Torch threads per learner process.")
    retries: int = Field(
        2, ge=0, description="Re-runs of a group whose Ray actor died; then its variants are recorded as failed."
    )
    engine: Literal["batched", "loop"] = Field(
        "batched", description="batched: each actor's variants learn as one stacked step; loop: one by one."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where learners compute: auto takes a GPU when Ray (or this process) has one."
    )
    kernel: Literal["auto", "native", "torch"] = Field(
        "auto",
        description="How the batched engine and the distiller compute on a CPU: native is forkpop's C kernel "
        "(built once with the machine's C compiler) for Linear/activation chains, torch the torch ops; auto "
        "takes native where it applies and builds, torch elsewhere.",
    )
    run_dir: str = Field("runs", description="Root folder of run directories (checkpoints, config).")

    @field_validator("name")
    @classmethod
    def _one_folder(cls, v: str) -> str:
        # The name starts a folder's name, run_dir/<name>-s<seed>-<time>, which must stay in run_dir.
        if "/" in v or _leaves_root(v):
            raise ValueError("must be one folder name inside run.run_dir, without '/', '\\' or '..'; e.g. digits-2")
        return v


class PoisonConfig(_Strict):
    kind: Literal["none", "label_flip", "backdoor", "noise"] = Field(
        "none", description="How poisoned niches are altered: flipped labels, a backdoor trigger, input noise."
    )
    niches: int = Field(0, ge=0, description="How many niches are poisoned (chosen by data.seed).")
    rate: float = Field(1.0, gt=0, le=1, description="Share of a poisoned niche's samples that are altered.")
    target: int = Field(0, ge=0, description="The label a backdoor trigger maps to.")
    noise_std: float = Field(0.5, gt=0, description="Standard deviation of the input noise for kind=noise.")


class AuditConfig(_Strict):
    mode: Literal["none", "relabel"] = Field(
        "relabel",
        description="relabel: a niche whose labels disagree with the seed far more than the validation split "
        "does is read through the seed (a systematic label flip is undone; see workers.learner.AuditSpec).",
    )
    min_seed_accuracy: float = Field(
        0.7, ge=0, le=1, description="The audit acts only once the seed reaches this validation accuracy."
    )
    min_class_recall: float = Field(
        0.5, ge=0, le=1, description="The seed judges only labels of classes it recalls this well on validation."
    )
    suspect: float = Field(
        0.5, gt=0, le=1, description="A niche is suspect when its label agreement < suspect x seed accuracy."
    )
    share: float = Field(
        0.5, gt=0, le=1, description="In a suspect niche, label j reads as i when the seed calls >= share of j's i."
    )
    min_count: int = Field(3, ge=1, description="In a suspect niche, a label is read anew only with this many samples.")
    confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="In a suspect niche, a label the seed contradicts takes its prediction when this sure.",
    )


class DataConfig(_Strict):
    world: str = Field(
        "classification",
        description="What the population learns: classification (feature vectors, cross-entropy), or a world "
        "plug-in by registered name, import path package.module:attr or entry point (group forkpop.worlds).",
    )
    source: Literal["digits", "file", "stdlib", "pydoc", "text"] = Field(
        "digits",
        description="scikit-learn digits or your own table (data.world: classification); for data.world: text, "
        "the Python standard library's own sources (one niche per package), the Python docs' topics (pydoc), "
        "or your own text files (data.niches).",
    )
    niches: dict[str, str] = Field(
        default_factory=dict,
        description="data.source: text: one niche per entry, name: a folder, a file or a glob (** recursive); "
        "data.source: stdlib: optional package names (the values are ignored).",
    )
    path: str | None = Field(
        None,
        description="A .csv or .parquet table (a CSV's header row optional), an .npz with arrays x (N, F) or "
        "(N, C, H, W) and y (N,), or an .npy of x with y beside it in <stem>_labels.npy (y.npy for x.npy).",
    )
    label_column: int = Field(
        -1, description="Label column's index in a CSV without a header row (with one: used unless -1 or data.label)."
    )
    label: str | None = Field(
        None, description="Label column's name in a file with a header; None: label, target, y or class, else the last."
    )
    standardize: bool | None = Field(
        None, description="Standardize inputs with the training split's mean/std; None: on for files, off for digits."
    )
    val_fraction: float = Field(
        0.08,
        gt=0,
        lt=1,
        description="Share of the non-test data held out as the validation split: fitness, screens, novelty, "
        "species and the distillation's early stopping.",
    )
    accept_fraction: float = Field(
        0.08,
        ge=0,
        lt=1,
        description="Share of the non-test data held out as the acceptance split: only elitism's paired test "
        "reads it; 0: elitism reads the validation split.",
    )
    split_seed: int = Field(
        0, ge=0, description="Seeds the test, validation and acceptance splits (0: scikit-learn's random_state=0)."
    )
    partition: Literal["iid", "dirichlet", "shards"] = Field("dirichlet", description="How niches are cut.")
    n_niches: int | None = Field(None, ge=1, description="Number of niches; None: one per variant.")
    alpha: float = Field(0.3, gt=0, description="Dirichlet concentration over labels (smaller: more skewed).")
    shards_per_niche: int = Field(2, ge=1, description="Label shards per niche for partition=shards.")
    min_niche_size: int = Field(8, ge=1, description="Smallest niche a Dirichlet draw may leave.")
    seed: int = Field(
        0, ge=0, description="Seeds the partition into niches (independent of run.seed: studies vary both)."
    )
    batch_size: int = Field(16, ge=1, description="Mini-batch size of the niche streams.")
    poison: PoisonConfig = Field(default_factory=PoisonConfig, description="Poisoned niches (Tay scenario).")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="Label audit of the niches against the seed.")


# The built-in plug-ins' names, known without importing the modules that register them
# (torch's import, seconds, would come before MLflow's process starts); a test checks they agree.
BUILTIN_FAMILIES = ("mlp", "linear", "cnn")
BUILTIN_PLUGINS = {
    "strategies": ("best", "tournament", "nsga2", "niche", "random"),
    "distillers": ("kd",),
}


class ModelConfig(_Strict):
    family: str = Field(
        "mlp",
        description="Model family every variant shares: mlp, linear, cnn, a registered name, an import path "
        "'package.module:attr' or an entry point of group forkpop.models (resolved when the run starts).",
    )
    hidden: list[int] = Field([128], description="Hidden widths (mlp) or channels (cnn).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Extra keyword arguments to the family's factory."
    )

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v in BUILTIN_FAMILIES:  # known without torch's import (seconds, before MLflow's process starts)
            return v
        from forkpop.population import models  # noqa: F401 - registers the built-in families

        from forkpop import plugins

        if not plugins.known("models", v):
            offered = plugins.registered("models") + plugins.entry_point_names("models")
            raise ValueError(
                f"unknown model family {v!r}; use one of {sorted(set(offered))} or an import path 'package.module:attr'"
            )
        return v

    @field_validator("hidden")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(h < 1 for h in v):
            raise ValueError("every hidden width must be >= 1")
        return v


class GeneConfig(_Strict):
    low: float
    high: float
    init: float
    kind: Literal["float", "log", "int"] = "float"

    @model_validator(mode="after")
    def _bounds(self) -> GeneConfig:
        if self.low > self.high:
            raise ValueError(f"low {self.low} > high {self.high}; set low <= high")
        if self.kind == "log" and self.low <= 0:
            raise ValueError(f"a log-scale gene needs low > 0 (got {self.low})")
        if not self.low <= self.init <= self.high:
            raise ValueError(f"init {self.init} outside [{self.low}, {self.high}]; move init inside the bounds")
        return self


def _default_genes() -> dict[str, GeneConfig]:
    return {g.name: GeneConfig(low=g.low, high=g.high, init=g.init, kind=g.kind) for g in default_genome_spec().genes}


class PopulationConfig(_Strict):
    size: int = Field(16, ge=1, description="Variants forked from the seed each generation.")
    genes: dict[str, GeneConfig] = Field(default_factory=_default_genes, description="Genes with bounds.")
    mutation_eta: float = Field(20.0, gt=0, description="Polynomial mutation crowding (larger: smaller steps).")
    mutation_indpb: float = Field(0.3, ge=0, le=1, description="Probability each gene mutates at a fork.")
    rotate_niches: int = Field(
        0, ge=0, description="Variant i learns niche (i + generation * rotate_niches) mod n_niches; 0: niche i."
    )

    @field_validator("genes")
    @classmethod
    def _known_genes(cls, v: dict[str, GeneConfig]) -> dict[str, GeneConfig]:
        required = {"lr", "epochs"}
        missing = required - set(v)
        if missing:
            raise ValueError(f"genes {sorted(missing)} are required")
        return v

    def genome_spec(self) -> GenomeSpec:
        return GenomeSpec(tuple(Gene(n, g.low, g.high, g.init, g.kind) for n, g in self.genes.items()))


class SelectionConfig(_Strict):
    method: str = Field(
        "niche",
        description="The strategy choosing teachers: niche (the fittest of each niche), best, tournament, nsga2 "
        "(NSGA-II over fitness and novelty), random (a control), or a plug-in by registered name, import path "
        "package.module:attr or entry point.",
    )
    k: int | None = Field(
        None,
        ge=1,
        description="Teachers distilled into the next seed; None: every variant (nsga2: half; niche: "
        "per_niche of each niche).",
    )
    per_niche: int = Field(1, ge=1, description="With method=niche: the fittest of each niche that teach.")
    tournament_size: int = Field(3, ge=2, description="Tournament size for method=tournament.")
    inherit: Literal["crossover", "best", "choice"] = Field("crossover", description="Seed genome from teachers.")
    screen: float = Field(
        0.0,
        ge=0,
        description="Variants whose validation fitness is below median - screen x MAD are never teachers; 0: off.",
    )
    species: int = Field(
        1, ge=1, description="Seeds kept: teachers are clustered by what they predict, each cluster its own seed."
    )
    species_from: int = Field(
        0, ge=0, description="With species: the generation from which teachers split into species (one seed before)."
    )
    merge_species: bool = Field(
        True, description="With species: the last generation's teachers all distill one final seed."
    )

    @field_validator("method")
    @classmethod
    def _strategy(cls, v: str) -> str:
        return _plugin("strategies", v, "forkpop.selection.strategies")


class GeneratedConfig(_Strict):
    kind: Literal["none", "mixup", "noise"] = Field(
        "none",
        description="Inputs the population makes for its own transfer set, labelled by the teachers: mixup "
        "(convex blends of two real inputs) or noise (real inputs plus Gaussian noise); none: real data only.",
    )
    per_generation: float = Field(
        0.5, gt=0, description="New generated inputs each generation, as a share of the real transfer set."
    )
    keep: bool = Field(
        True, description="Earlier generations' generated inputs stay, with their old pseudo-labels (self-consuming)."
    )
    noise_std: float = Field(0.1, gt=0, description="Standard deviation of the noise for kind=noise.")
    min_real_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The transfer set holds at least this share of real data; the oldest generated inputs go first.",
    )


def _plugin(kind: str, name: str, builtins: str) -> str:
    """``name`` if it resolves to a plug-in of ``kind`` (``builtins`` registers the built-in ones)."""
    if name in BUILTIN_PLUGINS.get(kind, ()):
        return name
    import importlib

    from forkpop.plugins import PluginError, resolve

    importlib.import_module(builtins)
    try:
        resolve(kind, name, "")
    except PluginError as e:
        text = str(e).replace(f"{kind}={name!r}", repr(name), 1)
        raise ValueError(text.rsplit("; change ", 1)[0] + "; change it") from None
    return name


class DistillConfig(_Strict):
    method: str = Field(
        "kd",
        description="The distiller: kd (knowledge distillation of the teachers' output distributions), "
        "or a plug-in by registered name or import path package.module:attr.",
    )
    init: Literal["previous", "best", "average", "data_average"] = Field(
        "data_average", description="Student's starting weights."
    )
    transfer: Literal["all", "teachers"] = Field("all", description="Transfer inputs: all niches or teachers'.")
    temperature: float = Field(4.0, gt=0, description="Softmax temperature of teachers and student.")
    steps: int = Field(100, ge=0, description="Student optimisation steps.")
    lr: float = Field(1e-3, gt=0, description="Student Adam learning rate.")
    batch_size: int = Field(128, ge=1, description="Transfer mini-batch size.")
    aggregate: Literal["mean", "median", "trimmed_mean", "class_reliability"] = Field(
        "mean", description="Soft-target aggregation."
    )
    eval_every: int = Field(
        25, ge=0, description="Score the student on validation every N steps, keep the best; 0: off."
    )
    screen: float = Field(
        0.0,
        ge=0,
        description="Drop teachers whose agreement with the others on the transfer set is below "
        "median - screen x MAD; 0: keep all.",
    )
    species_mix: float = Field(
        0.0,
        ge=0,
        le=1,
        description="With species: share of each seed's soft targets from the other clusters' teachers.",
    )
    own_niche: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of each transfer input's soft target taken from the teachers that learned its niche "
        "(the rest from the whole group); 0: every teacher speaks alike on every input.",
    )
    hard: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Text world (lm_kd): share of each position's target that is the true next byte (the rest is "
        "the teachers' distribution): the student learns from the real text beside its teachers.",
    )
    elitism: bool = Field(
        True,
        description="A student replaces its seed only when it is better with confidence on the acceptance split "
        "(data.accept_fraction): a paired test, see accept_z; off: every student is accepted.",
    )
    accept_z: float = Field(
        1.0,
        ge=0,
        description="With elitism: the student's mean per-sample gain over the seed must be positive and at least "
        "this many standard errors (1: one standard error; 0: any gain).",
    )

    @field_validator("method")
    @classmethod
    def _distiller(cls, v: str) -> str:
        return _plugin("distillers", v, "forkpop.selection.distiller")

    generated: GeneratedConfig = Field(
        default_factory=GeneratedConfig, description="Generated, pseudo-labelled transfer data (model-collapse study)."
    )


class SelfTrainConfig(_Strict):
    mode: Literal["none", "replace", "accumulate"] = Field(
        "none",
        description="Text the population generates joins its training text: replace (this generation's samples "
        "replace earlier ones), accumulate (they add up beside all the real text), none (real text only).",
    )
    real_fraction: float = Field(
        1.0,
        ge=0,
        le=1,
        description="With replace: share of each generation's training text that is real (the rest is the previous "
        "generation's samples); the collapse guard. accumulate keeps all the real text.",
    )
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the generated text (0: greedy).")
    samples: int = Field(128, ge=1, description="Samples generated per niche each generation.")
    length: int | None = Field(None, ge=2, description="Bytes per sample, prompt included; None: lm.context + 1.")
    prompt: int = Field(8, ge=1, description="Real bytes of the niche that start each sample.")
    by: Literal["teachers", "seed"] = Field(
        "teachers", description="Who generates: each niche's teacher (its own niche's text), or the seed."
    )
    into: Literal["both", "niches", "transfer"] = Field(
        "both", description="Where generated text goes: the niches' training text, the transfer corpus, or both."
    )


class BudgetConfig(_Strict):
    """The label-budget world (``data.world: budget``): labels bought from an oracle."""

    share: float = Field(0.05, ge=0, le=1, description="Labels a lifetime may buy, as a share of its niche.")
    free: float = Field(0.01, ge=0, le=1, description="Share of a niche's labels that arrive free.")
    phases: int = Field(2, ge=1, description="Phases of a niche's drifting class mix (1: no drift).")
    deal: Literal["world", "niche"] = Field(
        "world",
        description="How classes are dealt into phases: world (one deal for every niche, the world drifts as a "
        "whole and each niche's phases change at their own time) or niche (a deal per niche).",
    )
    policy: Literal["evolved", "shuffled_m", "fixed_a", "greedy_b", "paced_b", "random", "bandit"] = Field(
        "evolved",
        description="When to buy: evolved (System M, the genome's m_* genes; shuffled_m: M fed its own "
        "lifetime's signals in another order, the control), or a fixed policy: fixed_a (free "
        "labels only), greedy_b (buy until the budget is spent), paced_b (unsure inputs at a steady pace), "
        "random, bandit (EXP3 over query strategies: margin, distance to the labelled, pace; paced as paced_b).",
    )
    replay: int = Field(
        16, ge=1, description="Mini-batch of a labelled arrival: it and earlier labels drawn at random."
    )
    observe_weight: float = Field(
        0.5, ge=0, description="Weight of an observed arrival's pseudo-label in its step (0: System A learns nothing)."
    )
    anchor: float = Field(
        0.0,
        ge=0,
        description="System A's consistency with what the variant knew at birth: each step also fits, at this "
        "weight, its birth predictions on up to `replay` inputs of its stream seen so far (0: off).",
    )
    neighbour: float | None = Field(
        None,
        ge=0,
        description="System A's neighbour method: an unsure arrival takes the label of the nearest input the variant "
        "holds a label for when that one is within this many times the stream's mean nearest-neighbour distance; "
        "farther, the arrival teaches nothing itself (null: always the nearest label's).",
    )


class EnvConfig(_Strict):
    """The environment world (``data.world: env``): policies living in a gymnasium environment."""

    id: str = Field("CartPole-v1", description="A gymnasium environment with discrete actions (classic control).")
    lifetime_steps: int = Field(5000, ge=1, description="Environment steps of a variant's lifetime.")
    eval_episodes: int = Field(5, ge=1, description="Greedy episodes of fitness (seeds only selection uses).")
    accept_episodes: int = Field(20, ge=2, description="Greedy episodes elitism compares a student and its seed on.")
    report_episodes: int = Field(10, ge=1, description="Greedy episodes of the reported returns (never selection's).")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount of the returns a variant that acts learns from.")
    policy: Literal["evolved", "act", "observe", "random"] = Field(
        "evolved",
        description="How a lifetime's episodes are spent: evolved (System M, the m_* genes), or fixed: act "
        "(System B, REINFORCE on its own episodes), observe (System A, imitating the seed's), random.",
    )
    probe_states: int = Field(256, ge=8, description="Fixed states (random actions) learning progress is read on.")


class LMConfig(_Strict):
    n_layer: int = Field(2, ge=1, description="Transformer blocks of the byte-level language model.")
    n_head: int = Field(4, ge=1, description="Attention heads.")
    d_model: int = Field(128, ge=8, description="Width.")
    context: int = Field(64, ge=4, description="Context in bytes.")
    steps: int = Field(60, ge=1, description="A fork's learning steps per unit of its epochs gene.")
    batch_size: int = Field(16, ge=1, description="Windows (of context + 1 bytes) per learning step.")
    heldout_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of each niche's files held out (validation, acceptance, test)."
    )
    max_bytes_per_niche: int = Field(
        200_000, ge=1000, description="Cap on each niche's training bytes (files in split order)."
    )
    probe_windows: int = Field(12, ge=1, description="Held-out windows per niche for fitness (validation).")
    accept_windows: int = Field(24, ge=1, description="Held-out windows per niche for elitism only.")
    test_windows: int = Field(48, ge=1, description="Held-out windows per niche for the test split (reported).")
    report_samples: int = Field(4, ge=0, description="Samples of the final seed in the run's records and report.")
    pretrain_steps: int = Field(
        0,
        ge=0,
        description="Steps the root seed learns the pooled real text before generation 0 (batch lm.batch_size "
        "x 4, AdamW at pretrain_lr; cached per run seed under run.run_dir): the collapse study starts from a "
        "model that writes text; 0: the root seed starts from its random initialisation.",
    )
    pretrain_lr: float = Field(3e-3, gt=0, description="Learning rate of the root seed's pretraining.")
    self_train: SelfTrainConfig = Field(
        default_factory=SelfTrainConfig, description="Learning from their own text (the model-collapse study)."
    )

    @model_validator(mode="after")
    def _heads(self) -> LMConfig:
        if self.d_model % self.n_head:
            raise ValueError(f"lm.d_model={self.d_model} must be a multiple of lm.n_head={self.n_head}")
        return self


class TrackingConfig(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; None: a SQLite file under run.run_dir.")
    experiment: str = Field("forkpop", description="MLflow experiment name.")
    step_metrics: Literal["batch", "epoch", "none"] = Field(
        "epoch",
        description="Variant curves as MLflow metrics: per batch (preq_accuracy over the first pass, "
        "train_accuracy over later passes, loss), per pass over the niche (preq_accuracy_epoch: the first pass, "
        "train_accuracy_epoch: the later ones, loss_epoch), or none. Full per-batch curves are always in steps/ "
        "artifacts.",
    )
    variant_runs: Literal["auto", "all", "seeds"] = Field(
        "auto",
        description="Which births get a nested MLflow run of their own: all, or seeds (the seeds and distilled "
        "students; every variant is still a row of the generation's variants/gen-NNNN.json table, which "
        "lineage and analysis read). auto: all while a generation has at most 256 variants on a local store, "
        "64 on a tracking server (a run there costs several requests), else seeds.",
    )
    collapse_window: int = Field(
        3,
        ge=0,
        description="Collapse alarm when, at each of this many generations in a row, the validation accuracy and "
        "the spread have both fallen for the seed (entropy), the distilled student before elitism (entropy) or "
        "the population (mean fitness, functional diversity); 0: off.",
    )
    outage_s: float = Field(
        120.0,
        ge=0,
        description="Seconds a tracking server may stay unreachable (writes buffered and retried with backoff) "
        "before the run stops, resumable; FORKPOP_TRACKING_PATIENCE_S overrides it.",
    )


class ExperimentConfig(_Strict):
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    population: PopulationConfig = PopulationConfig()
    selection: SelectionConfig = SelectionConfig()
    distill: DistillConfig = DistillConfig()
    tracking: TrackingConfig = TrackingConfig()
    lm: LMConfig = LMConfig()
    budget: BudgetConfig = BudgetConfig()
    env: EnvConfig = EnvConfig()

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        if self.selection.k is not None and self.selection.k > self.population.size:
            raise ValueError(
                f"selection.k={self.selection.k} exceeds population.size={self.population.size}; lower selection.k"
            )
        if self.data.val_fraction + self.data.accept_fraction >= 0.9:
            raise ValueError(
                "data.val_fraction + data.accept_fraction leave under a tenth of the data for learning; lower them"
            )
        text_sources = ("stdlib", "pydoc", "text")
        if self.data.world == "text" and self.data.source not in text_sources:
            raise ValueError(f"data.world is 'text' but data.source is {self.data.source!r}; use one of {text_sources}")
        if self.data.source in text_sources and self.data.world != "text":
            raise ValueError(f"data.source={self.data.source!r} is text; set data.world: text")
        if self.data.source == "text" and not self.data.niches:
            raise ValueError("data.source is 'text' but data.niches is empty; give data.niches: {name: glob, ...}")
        if self.data.source == "file" and not self.data.path:
            raise ValueError("data.source is 'file' but data.path is not set; set data.path")
        if self.data.poison.niches > self.n_niches:
            raise ValueError(
                f"data.poison.niches={self.data.poison.niches} exceeds the {self.n_niches} niches; lower it"
            )
        if self.data.poison.kind != "none" and self.data.poison.niches == 0:
            raise ValueError(f"data.poison.kind={self.data.poison.kind} poisons no niche; set data.poison.niches")
        if self.selection.species > self.population.size:
            raise ValueError(
                f"selection.species={self.selection.species} exceeds population.size={self.population.size}; lower it"
            )
        return self

    @property
    def n_teachers(self) -> int:
        """``selection.k``; unset, every variant (NSGA-II: half of them, or it would choose all)."""
        if self.selection.k:
            return self.selection.k
        if self.selection.method == "niche":
            return min(self.population.size, self.n_niches * self.selection.per_niche)
        return max(1, self.population.size // 2) if self.selection.method == "nsga2" else self.population.size

    @property
    def n_niches(self) -> int:
        if self.data.source == "text":
            return len(self.data.niches)
        if self.data.source == "stdlib" and self.data.niches:
            return len(self.data.niches)
        return self.data.n_niches or self.population.size


def _format_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {loc!r}; remove it or check its spelling"
    given = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return f"{loc}: {msg}{given}" if loc else msg


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: write key=value, e.g. --set population.size=32")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: key {key!r} is malformed; use dotted names like data.alpha")
    return parts, value


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` laid over ``base``, section by section (a copy; neither input changes)."""
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def build_config(raw: dict) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping; ``base: NAME_OR_PATH`` lays it over another config first."""
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found; give the path of a YAML config")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"config file {str(p)!r} is not valid YAML ({first}); fix its syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of sections (run, data, ...)")
    base = raw.pop("base", None)
    if base is None:
        return raw
    bp = Path(str(base))
    if not bp.is_absolute() and not bp.exists():
        near = p.parent / bp
        bundled = Path(__file__).parent / "configs" / f"{base}.yaml"
        bp = near if near.exists() else bundled
    if bp.resolve() in seen:
        raise ConfigError(f"config file {str(p)!r}: base {base!r} includes itself; break the cycle")
    return deep_merge(_read_yaml(bp, (*seen, p.resolve())), raw)


def load_config(path: str | Path, overrides: list[str] | None = None, seed: int | None = None) -> ExperimentConfig:
    """Read a YAML config (over its ``base``, if it names one), apply ``--set`` overrides and
    ``--seed``, and check it."""
    raw = _read_yaml(Path(path))
    # Laid over the defaults, so a partial section (one gene's init, say) keeps the rest.
    raw = apply_overrides(deep_merge(ExperimentConfig().model_dump(mode="json"), raw), overrides or [])
    if seed is not None:
        raw.setdefault("run", {})
        if not isinstance(raw["run"], dict):
            raise ConfigError("run must be a section (a mapping)")
        raw["run"]["seed"] = seed
    return build_config(raw)


def config_to_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
