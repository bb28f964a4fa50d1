"""The online learner: forks a seed into variants and trains each prequentially on its niche."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from forkpop.population.forking import perturb_weights
from forkpop.population.models import accuracy, build_model, class_rates, flat_weights, load_flat_weights, predict_many
from forkpop.population.optim import sgd_step
from forkpop.workers.data import DataBundle, DataSpec, SplitPlan, load_data
from forkpop.workers.engine import (
    ENGINES,
    EXPLODED,
    BatchedEngine,
    EnginePlan,
    diverged_reason,
    online_accuracy,
    plan_engine,
    resolve_device,
)
from forkpop.workers.niches import stream_batches

from forkpop.plugins import add_import_roots


@dataclass(frozen=True)
class ModelSpec:
    """The model every variant shares: ``family`` (a name or import path, see
    :func:`population.models.build_model`), ``hidden``, the factory's extra keyword arguments
    ``options`` (JSON, so the spec stays hashable; a dict is accepted) and the folders an
    import path needs on ``sys.path`` in a worker (``forkpop.plugins.import_roots``)."""

    family: str = "mlp"
    hidden: tuple[int, ...] = (128,)
    options: str = "{}"
    import_roots: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.options, str):
            object.__setattr__(self, "options", json.dumps(dict(self.options), sort_keys=True))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        object.__setattr__(self, "import_roots", tuple(self.import_roots))

    @property
    def kwargs(self) -> dict:
        """``options`` as keyword arguments."""
        return json.loads(self.options)

    def build(
        self, in_dim: int, n_classes: int, seed: int = 0, input_shape: tuple[int, ...] | None = None
    ) -> torch.nn.Module:
        """A freshly initialised model of this spec (importable here once its roots are added).

        ``input_shape`` (``(C, H, W)`` for images; the inputs travel flat) reaches a factory
        that takes an ``input_shape`` argument (``cnn``) unless ``options`` set it."""
        add_import_roots(self.import_roots)
        opts = self.kwargs
        if input_shape is not None and len(input_shape) > 1 and "input_shape" not in opts:
            from forkpop.plugins import accepts, resolve

            if accepts(resolve("models", self.family, "model.family"), "input_shape", through_kwargs=False):
                opts["input_shape"] = tuple(input_shape)
        return build_model(self.family, in_dim, n_classes, self.hidden, seed, options=opts)


@dataclass(frozen=True)
class AuditSpec:
    """The label audit: each niche's labels checked against the population's seed.

    A niche whose labels agree with the seed's predictions on its samples far less than the
    seed agrees with the validation split (``agreement < suspect x seed accuracy``) is
    suspect. In a suspect niche a label ``j`` whose samples the seed mostly (``>= share``)
    calls ``i`` is read as ``i`` (a systematic flip is undone, and the niche still teaches);
    a sample whose label is neither its mapped label nor the seed's prediction is given the
    seed's prediction when the seed is sure of it (probability >= ``confidence``). The seed
    judges only labels of classes it recognises, and maps only onto such classes (validation
    recall >= ``min_class_recall``): a niche that holds a class the seed has not learned yet
    keeps its labels, for that class is what the niche teaches. Nothing happens while the
    seed is weaker than ``min_seed_accuracy`` on the validation split (at generation 0 it
    knows nothing yet).
    """

    mode: str = "relabel"  # none | relabel
    min_seed_accuracy: float = 0.7
    suspect: float = 0.5
    share: float = 0.5
    min_class_recall: float = 0.5
    confidence: float = 0.0
    min_count: int = 3


@dataclass(frozen=True)
class NicheAudit:
    niche: int
    agreement: float  # share of the niche's labels the seed predicts
    suspect: bool
    mapped: dict[int, int] = field(default_factory=dict)  # label -> label read instead
    relabelled: int = 0  # samples whose label the audit changed

    def describe(self) -> str:
        if not self.suspect:
            return ""
        pairs = ",".join(f"{j}->{i}" for j, i in sorted(self.mapped.items()))
        return f"agreement {self.agreement:.2f}; relabelled {self.relabelled}" + (f"; map {pairs}" if pairs else "")


def audit_labels(
    pred: np.ndarray,
    y: np.ndarray,
    niches: tuple[np.ndarray, ...],
    seed_accuracy: float,
    recall: np.ndarray,
    spec: AuditSpec,
    confidence: np.ndarray | None = None,
    precision: np.ndarray | None = None,
) -> tuple[np.ndarray, list[NicheAudit]]:
    """The labels ``y`` (of the pool) as the audit reads them, and what it found per niche.

    ``pred`` holds the seed's predicted class of every pool sample, ``seed_accuracy`` its
    accuracy on the validation split and ``recall[c]`` its recall of class ``c`` there (NaN:
    no validation sample of ``c``) and ``confidence`` its probability of ``pred`` (None: sure).
    Pure: same inputs, same answer.
    """
    sure = np.ones(len(pred), dtype=bool) if confidence is None else np.asarray(confidence) >= spec.confidence
    out = np.array(y, copy=True)
    known = np.nan_to_num(np.asarray(recall, dtype=np.float64), nan=0.0) >= spec.min_class_recall
    trusted = known.copy()  # classes the seed may map onto: it recalls them and is right when it says them
    if precision is not None:
        trusted &= np.nan_to_num(np.asarray(precision, dtype=np.float64), nan=0.0) >= spec.min_class_recall
    reports = []
    active = spec.mode != "none" and seed_accuracy >= spec.min_seed_accuracy
    for j, idx in enumerate(niches):
        if len(idx) == 0:
            reports.append(NicheAudit(j, float("nan"), False))
            continue
        yn, pn = y[idx], pred[idx]
        agreement = float((yn == pn).mean())
        if not active or agreement >= spec.suspect * seed_accuracy:
            reports.append(NicheAudit(j, agreement, False))
            continue
        candidates = {}  # label -> (target, support)
        for label in np.unique(yn):
            seen = pn[yn == label]
            counts = np.bincount(seen, minlength=int(seen.max()) + 1)
            top = int(counts.argmax())
            ok = counts[top] >= max(spec.share * len(seen), spec.min_count)
            if top != int(label) and ok and known[int(label)] and trusted[top]:
                candidates[int(label)] = (top, int(counts[top]))
        # A relabelling is one-to-one: of labels that would read as the same class, the best
        # supported keeps it and the others are left as they are.
        mapped = {}
        for label, (top, _support) in sorted(candidates.items(), key=lambda kv: (-kv[1][1], kv[0])):
            if top not in mapped.values():
                mapped[label] = top
        read = yn.copy()
        for a, b in mapped.items():
            read[yn == a] = b
        # Neither the map nor the seed supports it, and the seed knows the class it is given.
        doubtful = ~np.isin(yn, list(mapped)) & (yn != pn) & known[yn] & sure[idx]
        read[doubtful] = pn[doubtful]
        out[idx] = read
        reports.append(NicheAudit(j, agreement, True, mapped, int((read != yn).sum())))
    return out, reports


@dataclass(frozen=True)
class LearnerSpec:
    """What every learner of a run shares: data, model, stream batch size, threads.

    ``plan`` is the driver's split of the data, so workers need not derive it again.
    ``engine`` is ``batched`` (the group learns as one stacked step, see
    :mod:`workers.engine`; models it cannot batch fall back to the loop) or ``loop`` (one
    variant after another); ``device`` is ``auto`` (CUDA when visible), ``cpu`` or ``cuda``.
    """

    data: DataSpec
    model: ModelSpec = ModelSpec()
    batch_size: int = 16
    torch_threads: int = 1
    plan: SplitPlan | None = field(default=None, compare=False)
    engine: str = "batched"
    device: str = "auto"
    kernel: str = "auto"
    audit: AuditSpec = AuditSpec()


@dataclass(frozen=True)
class ForkTask:
    """The plan for one variant: who it is, what it learns from, with which recipe.

    ``seed`` drives its fork noise; the learner is otherwise deterministic.
    """

    variant_id: str
    niche: int
    genome: dict[str, float]
    seed: int
    cost: float = 1.0  # expected work (samples x passes), for balancing groups across workers
    seed_index: int = 0  # which row of a stack of seeds ``(n_species, n_params)`` it forks
    payload: Any = field(default=None, compare=False)  # what the world adds to its niche (generated text)


def fork_weights(seed_weights: torch.Tensor, task: ForkTask) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's seed and its variant at birth: the seed's weights with the task's own seeded
    fork noise (gene ``fork_noise``). ``seed_weights`` is one seed ``(n_params,)`` or one per
    species ``(n_species, n_params)``; every world's learner forks through this."""
    seed = seed_weights[task.seed_index] if seed_weights.dim() == 2 else seed_weights
    gen = torch.Generator().manual_seed(task.seed)
    return seed, perturb_weights(seed, float(task.genome.get("fork_noise", 0.0)), gen)


@dataclass
class LearnResult:
    """What a worker returns for one variant. Workers never log; the driver does.

    ``loss`` holds one value per learning step (the batch loss). Each batch is predicted
    before it is learned: ``preq_accuracy`` is the running accuracy over the first pass over
    the niche only (prequential: data not seen before), ``train_accuracy`` the running
    accuracy within each later pass (data seen before), one value per step after the first
    pass. Fitness is ``val_accuracy``, on the validation split.
    ``epoch_ends[e]`` is the number of steps done when pass ``e`` over the niche ended.
    """

    variant_id: str
    val_accuracy: float
    loss: list[float] = field(default_factory=list)
    preq_accuracy: list[float] = field(default_factory=list)
    epoch_ends: list[int] = field(default_factory=list)
    samples: int = 0
    seconds: float = 0.0
    status: str = "ok"
    reason: str = ""
    audit: str = ""  # what the label audit changed in this variant's niche ("" nothing)
    train_accuracy: list[float] = field(default_factory=list)  # later passes (seen data)
    metrics: dict[str, float] = field(default_factory=dict)  # a world's own figures (bits per byte, tokens, ...)
    trace: dict[str, list] = field(default_factory=dict)  # a world's series (System M's modes, budget spent over time)


class GroupLearner:
    """Hosts a group of variants of one model spec on one data set (in a process or an actor)."""

    def __init__(self, spec: LearnerSpec):
        torch.set_num_threads(spec.torch_threads)
        self.data: DataBundle = load_data(spec.data, spec.plan)
        self.batch_size = spec.batch_size
        d = self.data  # building the model adds its import roots to sys.path
        self.model = spec.model.build(d.n_features, d.n_classes, input_shape=d.input_shape)
        self.x_pool = torch.from_numpy(self.data.x_pool)
        self.y_pool = torch.from_numpy(self.data.y_pool)
        self.x_val = torch.from_numpy(self.data.x_val)
        self.y_val = torch.from_numpy(self.data.y_val)
        self.streams = [stream_batches(n, spec.batch_size) for n in self.data.niches]
        self.plan = engine_plan(spec, self.model, self.data.n_features, self.data.n_classes)
        self.audit_spec = spec.audit
        self.y_read = self.y_pool  # the labels as last audited
        self.engine: BatchedEngine | None = None
        if self.plan.kind != "loop":
            self.engine = BatchedEngine(
                self.model,
                self.plan,
                self.x_pool,
                self.y_pool,
                self.x_val,
                self.y_val,
                self.streams,
                spec.batch_size,
                resolve_device(spec.device),
                spec.kernel,
            )

    def describe(self) -> dict:
        """How this group computes: device, engine (``stacked``, ``vmap``, ``loop``) and why,
        and the batched engine's kernel (``native`` or ``torch``) and why not native."""
        native = self.engine is not None and self.engine.native is not None
        return {
            "device": str(self.engine.device) if self.engine else "cpu",
            "engine": self.plan.kind,
            "reason": self.plan.reason,
            "kernel": "native" if native else "torch",
            "kernel_reason": self.engine.kernel_reason if self.engine is not None else "",
        }

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        """Fork ``seed_weights`` into each task's variant and learn online on its niche.

        Returns the learned weights stacked ``(len(tasks), n_params)`` and one result per task.
        """
        notes = self._audit(seed_weights)
        if self.engine is not None:
            weights, results = self._learn_batched(seed_weights, tasks)
        else:
            flats, results = [], []
            for task in tasks:
                w, r = self._learn_one(seed_weights, task)
                flats.append(w)
                results.append(r)
            weights = torch.stack(flats) if flats else torch.empty(0, seed_weights.shape[-1])
        for t, r in zip(tasks, results, strict=True):
            r.audit = notes[t.niche % len(notes)] if notes else ""
        return weights, results

    def _audit(self, seed_weights: torch.Tensor) -> list[str]:
        """Read the niches' labels through the audit (see :class:`AuditSpec`) against the
        seeds' consensus (their mean predicted probabilities); one note per niche."""
        self.y_read = self.y_pool
        if self.audit_spec.mode == "none":
            return []
        seeds = seed_weights if seed_weights.dim() == 2 else seed_weights.unsqueeze(0)
        conf, pred = predict_many(self.model, seeds, self.x_pool)[0].mean(0).max(-1)
        pred_val, y_val = predict_many(self.model, seeds, self.x_val)[0].mean(0).argmax(-1).numpy(), self.y_val.numpy()
        recall, precision = class_rates(pred_val, y_val, self.data.n_classes)
        y, reports = audit_labels(
            pred.numpy(),
            self.y_pool.numpy(),
            self.data.niches,
            float((pred_val == y_val).mean()),
            recall,
            self.audit_spec,
            conf.numpy(),
            precision,
        )
        self.y_read = torch.from_numpy(y)
        return [r.describe() for r in reports]

    def fork(self, seed_weights: torch.Tensor, task: ForkTask) -> torch.Tensor:
        return fork_weights(seed_weights, task)[1]

    def _learn_batched(
        self, seed_weights: torch.Tensor, tasks: list[ForkTask]
    ) -> tuple[torch.Tensor, list[LearnResult]]:
        assert self.engine is not None
        t0 = time.perf_counter()
        if not tasks:
            return torch.empty(0, seed_weights.shape[-1]), []
        flats = torch.stack([self.fork(seed_weights, t) for t in tasks])
        weights, records = self.engine.train(
            flats,
            niches=[t.niche for t in tasks],
            epochs=[int(t.genome.get("epochs", 1)) for t in tasks],
            lr=[t.genome["lr"] for t in tasks],
            momentum=[t.genome.get("momentum", 0.0) for t in tasks],
            weight_decay=[t.genome.get("weight_decay", 0.0) for t in tasks],
            clip=[float(t.genome.get("clip", 0.0)) for t in tasks],
            labels=self.y_read if self.y_read is not self.y_pool else None,
        )
        # The group learns as one; each variant is charged its share of the group's time.
        share = (time.perf_counter() - t0) / len(tasks)
        results = [
            LearnResult(
                t.variant_id,
                val_accuracy=r.val_accuracy,
                loss=r.loss,
                preq_accuracy=r.preq_accuracy,
                train_accuracy=r.train_accuracy,
                epoch_ends=r.epoch_ends,
                samples=r.samples,
                seconds=share,
                status=r.status,
                reason=r.reason,
            )
            for t, r in zip(tasks, records, strict=True)
        ]
        return weights, results

    def _learn_one(self, seed_weights: torch.Tensor, task: ForkTask) -> tuple[torch.Tensor, LearnResult]:
        t0 = time.perf_counter()
        g = task.genome
        model = load_flat_weights(self.model, self.fork(seed_weights, task))
        params = list(model.parameters())
        bufs: list[torch.Tensor | None] = [None] * len(params)
        lr, momentum, wd = g["lr"], g.get("momentum", 0.0), g.get("weight_decay", 0.0)
        clip = float(g.get("clip", 0.0))
        result = LearnResult(task.variant_id, val_accuracy=float("nan"))
        hits: list[int] = []
        sizes: list[int] = []
        unlearned = 0  # the batch a variant died on: seen, not learned
        batches = self.streams[task.niche % len(self.streams)]
        model.train()
        for _ in range(int(g.get("epochs", 1))):
            for idx in batches:
                x, y = self.x_pool[idx], self.y_read[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                hit = int((logits.detach().argmax(1) == y).sum())
                lv = float(loss.detach())
                if not math.isfinite(lv) or (result.loss and lv > EXPLODED * max(result.loss[0], 1e-3)):
                    first = result.loss[0] if result.loss else lv
                    result.status, result.reason = "diverged", diverged_reason(len(result.loss), lv, first)
                    unlearned = len(y)
                    break
                grads = torch.autograd.grad(loss, params)
                if clip > 0:  # as torch.nn.utils.clip_grad_norm_: the global norm at most ``clip``
                    norm = torch.sqrt(sum((gr.detach() ** 2).sum() for gr in grads))
                    coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
                    grads = [gr * coef for gr in grads]
                sgd_step(params, grads, bufs, lr, momentum, wd)
                result.loss.append(lv)
                hits.append(hit)
                sizes.append(len(y))
            result.epoch_ends.append(len(result.loss))
            if result.status != "ok":
                break
        w = flat_weights(model)
        if result.status == "ok" and not torch.isfinite(w).all():
            result.status, result.reason = "diverged", "non-finite weights after learning"
        result.preq_accuracy, result.train_accuracy = online_accuracy(hits, sizes, len(batches))
        result.samples = sum(sizes) + unlearned
        if result.status == "ok":
            result.val_accuracy = accuracy(model, self.x_val, self.y_val)
        result.seconds = time.perf_counter() - t0
        return w, result


def pack_results(results: list[LearnResult]) -> dict:
    """Results as a few flat arrays (curves concatenated), cheap to move between processes."""
    lens = [len(r.loss) for r in results]
    ends = [len(r.epoch_ends) for r in results]
    return {
        "ids": [r.variant_id for r in results],
        "val": np.array([r.val_accuracy for r in results], dtype=np.float64),
        "samples": np.array([r.samples for r in results], dtype=np.int64),
        "seconds": np.array([r.seconds for r in results], dtype=np.float64),
        "status": [r.status for r in results],
        "reason": [r.reason for r in results],
        "audit": [r.audit for r in results],
        "loss": np.concatenate([np.asarray(r.loss, dtype=np.float64) for r in results] or [np.zeros(0)]),
        "preq": np.concatenate([np.asarray(r.preq_accuracy, dtype=np.float64) for r in results] or [np.zeros(0)]),
        "train": np.concatenate([np.asarray(r.train_accuracy, dtype=np.float64) for r in results] or [np.zeros(0)]),
        "n_preq": np.array([len(r.preq_accuracy) for r in results], dtype=np.int64),
        "lens": np.array(lens, dtype=np.int64),
        "ends": np.concatenate([np.asarray(r.epoch_ends, dtype=np.int64) for r in results] or [np.zeros(0, np.int64)]),
        "n_ends": np.array(ends, dtype=np.int64),
        "metrics": [dict(r.metrics) for r in results],
    }


def unpack_results(p: dict) -> list[LearnResult]:
    """The inverse of :func:`pack_results`."""
    out = []
    o = e = q = 0
    loss, preq, ends = p["loss"].tolist(), p["preq"].tolist(), p["ends"].tolist()
    train = p["train"].tolist()
    for i, vid in enumerate(p["ids"]):
        n, m = int(p["lens"][i]), int(p["n_ends"][i])
        out.append(
            LearnResult(
                vid,
                val_accuracy=float(p["val"][i]),
                loss=loss[o : o + n],
                preq_accuracy=preq[q : q + int(p["n_preq"][i])],
                train_accuracy=train[o - q : o - q + n - int(p["n_preq"][i])],
                epoch_ends=ends[e : e + m],
                samples=int(p["samples"][i]),
                seconds=float(p["seconds"][i]),
                status=p["status"][i],
                reason=p["reason"][i],
                audit=p["audit"][i],
                metrics=dict(p["metrics"][i]) if "metrics" in p else {},
            )
        )
        o, e, q = o + n, e + m, q + int(p["n_preq"][i])
    return out


def build_learner(spec: Any) -> Any:
    """The learner a worker hosts for ``spec`` (in this process or a Ray actor).

    A world's learner spec names its learner class in ``spec.learner`` (a registered name of
    kind ``learners`` or an import path); the classification world's :class:`LearnerSpec`
    names none and gets :class:`GroupLearner`. A learner has ``learn(seed_weights, tasks) ->
    (weights, results)`` and ``describe() -> dict`` (device, engine, reason).
    """
    name = getattr(spec, "learner", None)
    if not name:
        return GroupLearner(spec)
    from forkpop.plugins import add_import_roots, resolve

    add_import_roots(tuple(getattr(spec, "import_roots", ())))
    return resolve("learners", name, "learner")(spec)


def engine_plan(spec: LearnerSpec, model: torch.nn.Module, n_features: int, n_classes: int) -> EnginePlan:
    """How ``spec``'s model learns as a group: its batching plan, or ``loop`` when asked for."""
    if spec.engine == "loop":
        return EnginePlan("loop", "run.engine=loop")
    if spec.engine not in ENGINES:
        raise ValueError(f"unknown run.engine {spec.engine!r}; use one of {ENGINES}")
    return plan_engine(model, n_features, n_classes)


def split_tasks(tasks: list[ForkTask], n_groups: int) -> list[list[ForkTask]]:
    """Groups of about equal total ``cost`` (greedy: largest first to the lightest group).

    Niches differ in size by tens of times under a skewed partition, so equal counts would
    leave one worker idle while another learns. Empty groups are dropped; within a group the
    tasks keep their original order, and the split depends only on the tasks.
    """
    n_groups = max(1, min(n_groups, len(tasks)))
    load = [0.0] * n_groups
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for i in sorted(range(len(tasks)), key=lambda i: (-tasks[i].cost, i)):
        j = min(range(n_groups), key=lambda j: (load[j], j))
        load[j] += tasks[i].cost
        members[j].append(i)
    return [[tasks[i] for i in sorted(m)] for m in members if m]
