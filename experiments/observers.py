"""Observers: what happens to a generation's result — test figures, diversity, the collapse
alarm, backdoor probes, MLflow records, checkpoints, the progress bar.

The runner hands each observer the same :class:`~forkpop.experiments.core.GenerationResult`.
``measure`` returns figures that join the generation's :class:`GenerationRecord` (probes);
``on_generation`` records the result with that record; ``on_record`` runs once the
generation is complete (its checkpoint written), with its timings.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from forkpop.experiments.checkpoint import state_to_checkpoint, write_checkpoint, write_seconds
from forkpop.experiments.core import GenerationResult
from forkpop.experiments.tracking import variant_runs_for, variants_table
from forkpop.population.diversity import (
    PAIRWISE_CAP,
    disagreement_matrix,
    distance_to_seeds,
    functional_diversity,
    genotype_spread,
    lineage_stats,
    pairwise_sample,
    representation_similarity,
    weight_distances,
)
from forkpop.population.genome import Genome, GenomeSpec
from forkpop.population.world import World
from forkpop.workers.classification import ClassificationWorld

# A world's figures are recorded as lm.<name> (the text world's), except those a world names itself.
NAMESPACED = ("budget.", "env.")


@dataclass
class GenerationRecord:
    """Per-generation figures; these are also the parent run's metrics at step ``generation``."""

    generation: int
    seed_id: str
    seed_val_accuracy: float
    seed_test_accuracy: float
    best_fitness: float
    mean_fitness: float
    best_individual_test_accuracy: float
    ensemble_test_accuracy: float
    student_val_accuracy: float
    student_accepted: bool
    diverged: int
    teachers: list[str]
    seed_entropy: float = float("nan")  # mean prediction entropy of the seed on the validation split (nats)
    collapse_alarm: bool = False  # seed, student or population: accuracy and spread both fell, window generations
    collapse_of: str = ""  # which of seed, student, population raised it
    poisoned_teachers: int = 0  # teachers that learned on a poisoned niche
    backdoor_success: float = float("nan")  # share of triggered test inputs the seed sends to the target
    audited_variants: int = 0  # variants whose niche labels the label audit changed
    label_screened: int = 0  # variants kept from teaching because their peers contradict their niche's labels
    unaudited_poisoned_teachers: int = 0  # poisoned teachers that learned labels the audit left as they were
    transfer_real_fraction: float = 1.0  # lowest share of real inputs in a distillation's transfer set
    transfer_generated: int = 0  # generated, pseudo-labelled inputs in the transfer sets
    accept_gain: float = float("nan")  # the best student's mean paired gain over its seed on the acceptance split
    accept_z: float = float("nan")  # that gain in standard errors (elitism accepts at distill.accept_z or more)
    student_entropy: float = float("nan")  # the best student's prediction entropy on the validation split (nats)
    genes: dict[str, float] = field(default_factory=dict)  # mean gene of the forks, and teacher.<gene> of the teachers
    seconds: dict[str, float] = field(default_factory=dict)
    diversity: dict[str, float] = field(default_factory=dict)  # see population.diversity
    world: dict[str, float] = field(default_factory=dict)  # the world's own figures (the text world: lm.*)

    def metrics(self) -> dict[str, float]:
        m = {
            k: float(v)
            for k, v in asdict(self).items()
            if isinstance(v, (int, float, bool)) and k not in ("generation",) and math.isfinite(float(v))
        }
        m.update({f"time_{k}": v for k, v in self.seconds.items()})
        m.update({f"gene.{k}": v for k, v in self.genes.items() if math.isfinite(v)})
        m.update({f"div.{k}": v for k, v in self.diversity.items() if math.isfinite(v)})
        m.update(
            {
                k if k.startswith(NAMESPACED) else f"lm.{k}": v
                for k, v in self.world.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            }
        )
        return m

    @classmethod
    def of(cls, r: GenerationResult, figures: dict[str, Any], poisoned: tuple[int, ...]) -> GenerationRecord:
        """The record of ``r``: the core's figures and the probes' ``figures``."""
        state, ev = r.state, r.evals
        seed = state.seeds[state.best_slot()]
        ok = [f for f in ev.fitness if math.isfinite(f)]
        teachers = r.teacher_ids
        screened = r.screened.get("peer_labels", set())
        best = max(range(len(r.students)), key=lambda j: r.students[j].val, default=None)
        acc = r.acceptance[best] if best is not None and best < len(r.acceptance) else {}
        return cls(
            generation=r.generation,
            seed_id=seed.variant.id,
            seed_val_accuracy=seed.val,
            seed_test_accuracy=figures.get("seed_test_accuracy", float("nan")),
            best_fitness=max(ok, default=float("nan")),
            mean_fitness=float(np.mean(ok)) if ok else float("nan"),
            best_individual_test_accuracy=figures.get("best_individual_test_accuracy", float("nan")),
            ensemble_test_accuracy=figures.get("ensemble_test_accuracy", float("nan")),
            student_val_accuracy=max((st.val for st in r.students), default=float("nan")),
            student_accepted=any(r.accepted),
            diverged=len(ev) - len(ok),
            teachers=sorted(ev.variants[i].id for i in teachers),
            poisoned_teachers=int(sum(ev.variants[i].niche in poisoned for i in teachers)),
            audited_variants=sum(bool(getattr(x, "audit", "")) for x in ev.results),
            label_screened=len(screened),
            unaudited_poisoned_teachers=sum(
                ev.variants[i].niche in poisoned and not getattr(ev.results[i], "audit", "") for i in teachers
            ),
            transfer_real_fraction=min((st.real_fraction for st in r.students), default=1.0),
            transfer_generated=sum(st.generated for st in r.students),
            seed_entropy=figures.get("seed_entropy", float("nan")),
            collapse_alarm=bool(figures.get("collapse_alarm", False)),
            collapse_of=str(figures.get("collapse_of", "")),
            backdoor_success=figures.get("backdoor_success", float("nan")),
            diversity=figures.get("diversity", {}),
            accept_gain=acc.get("gain", float("nan")),
            accept_z=acc.get("z", float("nan")),
            student_entropy=figures.get("student_entropy", float("nan")),
            genes=gene_means(ev.variants, teachers),
            world=figures.get("world", {}),
        )


def gene_means(variants: Any, teachers: list[int]) -> dict[str, float]:
    """Each gene's mean over the generation's forks (``lr``, ...) and over its teachers
    (``teacher.lr``, ...): the genes' trajectory across generations."""
    out: dict[str, float] = {}
    names = list(variants[0].genome.as_dict()) if len(variants) else []
    for name in names:
        vals = [float(v.genome.as_dict()[name]) for v in variants]
        out[name] = float(np.mean(vals))
        if teachers:
            out[f"teacher.{name}"] = float(np.mean([vals[i] for i in teachers]))
    return out


class Observer:
    """Receives every generation's result (see the module docstring). ``name`` keys its time."""

    name = "observer"

    def measure(self, result: GenerationResult) -> dict[str, Any]:
        return {}

    def on_generation(self, result: GenerationResult, record: GenerationRecord) -> None:
        pass

    def on_record(self, result: GenerationResult, record: GenerationRecord) -> None:
        pass


class HeldOutReport(Observer):
    """Test-split figures (reported only, never used for a decision): the best seed, each
    student, the best teacher and the teachers' ensemble."""

    name = "evaluate"

    def __init__(self, world: World):
        self.world = world

    def measure(self, r: GenerationResult) -> dict[str, Any]:
        model, w = r.model, self.world
        out: dict[str, Any] = {"student_test": [w.fitness(model, st.weights, "test") for st in r.students]}
        if r.teacher_ids:
            tw = r.evals.weights[r.teacher_ids]
            out["best_individual_test_accuracy"] = w.fitness(model, tw[0], "test")
            probs, _ = w.predict(model, tw, w.inputs("test"))
            out["ensemble_test_accuracy"] = float(w.fitness_of(probs.mean(0, keepdim=True), "test")[0])
        seed = r.state.seeds[r.state.best_slot()]
        out["seed_test_accuracy"] = w.fitness(model, seed.weights, "test")
        return out


class DiversityProbe(Observer):
    """The population's diversity on the probe split (see :mod:`forkpop.population.diversity`)
    and the pairwise disagreement matrix of its learned variants (artifact ``diversity/``).

    Above ``pairwise_cap`` learned variants the pairwise measures (``genome_distance``,
    ``weight_l2``, ``weight_cosine``, ``disagreement``, ``kl``, ``js``, ``cka``) and the
    matrix are over ``pairwise_cap`` of them, drawn by :func:`pairwise_sample` from
    ``default_rng([run seed, generation, 0xD17])`` (the same on a resume); ``pairwise_variants``
    says how many. The per-variant measures (``gene_std.*``, ``weight_to_seed``, ambiguity)
    are over all of them."""

    name = "diversity"

    def __init__(self, world: World, spec: GenomeSpec, pairwise_cap: int = PAIRWISE_CAP):
        self.world, self.spec, self.pairwise_cap = world, spec, pairwise_cap

    def measure(self, r: GenerationResult) -> dict[str, Any]:
        ev = r.evals
        alive = [i for i, x in enumerate(ev.results) if x.status == "ok"]
        rows = pairwise_sample(len(alive), self.pairwise_cap, [r.state.run_seed, r.generation, 0xD17])
        pairs = None if len(rows) == len(alive) else rows
        out = genotype_spread([ev.variants[i].genome.as_dict() for i in alive], self.spec, pairs)
        sub = [alive[k] for k in rows]
        matrix: dict = {"ids": [ev.variants[i].id for i in sub], "disagreement": []}
        if alive:
            w = ev.weights if len(alive) == len(ev) else ev.weights[alive]
            out.update(weight_distances(w, None, pairs))
            # each variant's distance to its own seed (the one it forked)
            out["weight_to_seed"] = distance_to_seeds(w, ev.fork_seeds, [ev.plan.slots[i] for i in alive])
            p = ev.probs("probe", alive).double().numpy()
            labels = self.world.labels("probe")
            out.update(functional_diversity(p, None if labels is None else labels.numpy(), pairs))
            out.update(representation_similarity([h.double().numpy() for h in ev.hidden("probe", sub)]))
            matrix["disagreement"] = disagreement_matrix(p[rows]).round(4).tolist()
        out["pairwise_variants"] = float(len(rows))
        out.update(lineage_stats(r.state.lineage, r.generation))
        out["alive"] = float(len(alive))
        out["species"] = float(len({s.variant.id for s in r.state.seeds}))
        return {"diversity": out, "artifacts": {f"diversity/gen-{r.generation:04d}.json": json.dumps(matrix)}}


class CollapseAlarm(Observer):
    """Prediction entropies on the probe split and the model-collapse alarm. It watches three
    things, each over the last ``window`` generations: the accepted seed (its probe accuracy
    and entropy), the distilled student before elitism decides (its probe accuracy and
    entropy: elitism cannot hide a collapse that the students show), and the population (its
    mean fitness and functional diversity). Any one whose accuracy and spread have both fallen
    at each step raises the alarm (said once on stderr)."""

    name = "alarm"

    def __init__(self, world: World, window: int):
        self.world, self.window = world, window
        self._said = False

    def _entropy(self, r: GenerationResult, weights: torch.Tensor) -> float:
        p, _ = self.world.predict(r.model, weights[None], self.world.inputs("probe"))
        return float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())

    def measure(self, r: GenerationResult) -> dict[str, Any]:
        seed = r.state.seeds[r.state.best_slot()]
        entropy = self._entropy(r, seed.weights)
        student = max(r.students, key=lambda st: st.val, default=None)
        s_val = student.val if student is not None else float("nan")
        s_ent = self._entropy(r, student.weights) if student is not None else float("nan")
        ok = [f for f in r.evals.fitness if math.isfinite(f)]
        pop_fit = float(np.mean(ok)) if ok else float("nan")
        pop_div = float(r.figures.get("diversity", {}).get("disagreement", float("nan")))  # the DiversityProbe's
        h = list(r.history)
        watched = {
            "seed": ([x.seed_val_accuracy for x in h] + [seed.val], [x.seed_entropy for x in h] + [entropy]),
            "student": (
                [x.student_val_accuracy for x in h] + [s_val],
                [x.student_entropy for x in h] + [s_ent],
            ),
            "population": (
                [x.mean_fitness for x in h] + [pop_fit],
                [x.diversity.get("disagreement", float("nan")) for x in h] + [pop_div],
            ),
        }
        which = [name for name, (acc, spread) in watched.items() if falling(acc, spread, self.window)]
        alarm = bool(which)
        if alarm and not self._said and not any(x.collapse_alarm for x in h):
            print(
                f"forkpop: collapse alarm at generation {r.generation}: the {' and the '.join(which)}'s validation "
                f"accuracy and spread (entropy or diversity) have both fallen for {self.window} generations",
                file=sys.stderr,
            )
            self._said = True
        return {
            "seed_entropy": entropy,
            "student_entropy": s_ent,
            "collapse_alarm": alarm,
            "collapse_of": ",".join(which),
        }


def falling(accuracy: list[float], spread: list[float], window: int) -> bool:
    """Whether ``accuracy`` and ``spread`` (per generation, the latest last) have both fallen
    at each of the last ``window`` generations (the model-collapse signature)."""
    if window <= 0 or len(accuracy) < window + 1 or len(spread) < window + 1:
        return False
    a, e = accuracy[-window - 1 :], spread[-window - 1 :]
    return all(a[i + 1] < a[i] and e[i + 1] < e[i] for i in range(window))


def collapse(history: list[GenerationRecord], val: float, entropy: float, window: int) -> bool:
    """Whether the seed's probe accuracy and prediction entropy have both fallen at each of the
    last ``window`` generations."""
    return falling(
        [h.seed_val_accuracy for h in history] + [val], [h.seed_entropy for h in history] + [entropy], window
    )


class WorldProbe(Observer):
    """The world's own per-generation figures (:meth:`World.measure`; the text world's bits per
    byte and collapse measures), recorded as ``lm.<name>`` metrics."""

    name = "world"

    def __init__(self, world: World):
        self.world = world

    def measure(self, r: GenerationResult) -> dict[str, Any]:
        return self.world.measure(r)


class BackdoorProbe(Observer):
    """Share of triggered test inputs the best seed sends to the backdoor's target."""

    name = "backdoor"

    def __init__(self, world: ClassificationWorld, target: int):
        self.world, self.target = world, target

    def measure(self, r: GenerationResult) -> dict[str, Any]:
        seed = r.state.seeds[r.state.best_slot()]
        return {"backdoor_success": self.world.backdoor_success(r.model, seed.weights, self.target)}


class Tracking(Observer):
    """MLflow: a nested run per student and per fork (lineage tags, genes, curves), the
    per-batch curves and diversity matrices as artifacts, the record as parent-run metrics."""

    name = "tracking"

    def __init__(
        self, tracker: Any, step_metrics: str, poisoned: tuple[int, ...], variant_runs: str = "all", uri: str = ""
    ):
        self.tracker, self.step_metrics, self.poisoned = tracker, step_metrics, poisoned
        self.variant_runs, self.uri = variant_runs, uri
        self.marks: list[tuple[int, int]] = []  # (generation, flush token) not yet confirmed
        self.done: list[int] = []

    def on_generation(self, r: GenerationResult, record: GenerationRecord) -> None:
        t, ev = self.tracker, r.evals
        tests = r.figures.get("student_test", [])
        for j, (st, ok) in enumerate(zip(r.students, r.accepted, strict=True)):
            t.log_variant(
                st.variant,
                {"val_accuracy": st.val, **({"test_accuracy": tests[j]} if j < len(tests) else {})},
                tags={"forkpop.accepted": str(ok).lower(), "forkpop.species": str(st.slot)},
            )
        curves = {
            x.variant_id: {"preq_accuracy": x.preq_accuracy, "train_accuracy": x.train_accuracy, "loss": x.loss}
            for x in ev.results
        }
        t.log_text(json.dumps(curves), f"steps/gen-{r.generation:04d}.json")
        teacher_ids = {ev.variants[i].id for i in r.teacher_ids}
        label_screened = r.screened.get("peer_labels", set())
        nested = variant_runs_for(self.variant_runs, len(ev.variants), self.uri)
        rows = [
            _table_row(
                st.variant,
                {"val_accuracy": st.val, **({"test_accuracy": tests[j]} if j < len(tests) else {})},
                {"accepted": ok, "species": st.slot},
            )
            for j, (st, ok) in enumerate(zip(r.students, r.accepted, strict=True))
        ]
        for i, (v, x) in enumerate(zip(ev.variants, ev.results, strict=True)):
            tags = {"forkpop.status": x.status, "forkpop.teacher": str(v.id in teacher_ids).lower()}
            if r.state.n_species > 1:
                tags["forkpop.species"] = str(ev.plan.slots[i])
            if self.poisoned:
                tags["forkpop.poisoned"] = str(v.niche in self.poisoned).lower()
            if x.reason:
                tags["forkpop.reason"] = x.reason
            if x.audit:
                tags["forkpop.label_audit"] = x.audit
            if i in label_screened:
                tags["forkpop.label_screened"] = "true"
            final = {"samples": x.samples, "learn_seconds": x.seconds, **getattr(x, "metrics", {})}
            if math.isfinite(x.val_accuracy):
                final["val_accuracy"] = x.val_accuracy
            if x.preq_accuracy:
                final["preq_accuracy_final"] = x.preq_accuracy[-1]
            if getattr(x, "train_accuracy", None):
                final["train_accuracy_final"] = x.train_accuracy[-1]
            rows.append(_table_row(v, final, {k.removeprefix("forkpop."): val for k, val in tags.items()}))
            if nested:
                t.log_variant(v, final, step_metrics(x, self.step_metrics), tags)
        t.log_text(variants_table(rows), f"variants/gen-{r.generation:04d}.json")
        for name, text in r.figures.get("artifacts", {}).items():
            t.log_text(text, name)
        # The writer may lag the learners by one generation, no more: it writes this one's
        # records while the next one learns. A generation is vouched for (``confirmed``; the
        # runner marks its checkpoint ``tracked``) once the writer has passed the mark after
        # its records: a resume starts from the last such checkpoint, so it never lacks a
        # record (those of later generations it deletes and makes again). Until the writer
        # has opened the run (MLflow's import takes seconds) nothing is waited for: its
        # backlog is a few generations of small records, written once it is up.
        self.marks.append((r.generation, t.flush_async()))
        while len(self.marks) > 1 and t.started():
            g, token = self.marks.pop(0)
            t.wait_flushed(token)
            self.done.append(g)

    def confirmed(self, everything: bool = False) -> list[int]:
        """Generations whose records are all in MLflow since the last call (``everything``:
        after the run's final flush, every generation recorded)."""
        if everything:
            self.done += [g for g, _ in self.marks]
            self.marks = []
        out, self.done = self.done, []
        return out

    def on_record(self, r: GenerationResult, record: GenerationRecord) -> None:
        self.tracker.log_generation(r.generation, record.metrics())


def _table_row(v: Any, metrics: dict[str, float], tags: dict[str, Any]) -> dict[str, Any]:
    """One birth as a row of the generation's ``variants/`` table: lineage, genes, figures."""
    return {
        "id": v.id,
        "generation": v.generation,
        "origin": v.origin.value,
        "parents": ",".join(v.parents),
        "niche": v.niche,
        **{f"gene.{k}": float(g) for k, g in v.genome.as_dict().items()},
        **tags,
        **{k: float(m) for k, m in metrics.items()},
    }


class Checkpoints(Observer):
    """The run directory's ``checkpoints/gen-NNNN/``: the state (seeds, lineage, generated
    pool, RNG), the generation's record and teachers; then its timings beside it."""

    name = "checkpoint"

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_generation(self, r: GenerationResult, record: GenerationRecord) -> None:
        teachers = r.evals.weights[r.teacher_ids] if r.teacher_ids else None
        # The lineage goes in as this generation's births, on top of the previous generation's
        # checkpoint (which holds r.before's lineage): checkpoints grow linearly, not
        # quadratically, with the generations. The first one (or one whose predecessor is
        # gone) holds the whole lineage.
        prev = r.generation - 1
        linked = prev >= 0 and (self.run_dir / "checkpoints" / f"gen-{prev:04d}" / "state.json").is_file()
        tensors, body = state_to_checkpoint(r.state, teachers, base=(prev, r.before.lineage) if linked else None)
        body.update(
            record=asdict(record),
            genomes={v.id: v.genome.as_dict() for v in r.evals.variants},
            # Each generation's generator is default_rng([run.seed, generation]); its state
            # after this generation is kept to show the stream is reproduced on resume.
            rng={"scheme": "numpy.default_rng([run.seed, generation])", "state": r.rng_state},
        )
        write_checkpoint(self.run_dir, r.generation, tensors, jsonable(body))

    def on_record(self, r: GenerationResult, record: GenerationRecord) -> None:
        # The timings are known only once the checkpoint is written: kept beside it, so a
        # resume after a kill before they reached MLflow logs them with the rest.
        write_seconds(self.run_dir, r.generation, record.seconds)


class Progress(Observer):
    """The progress bar: one step per generation, with the seed's probe and test accuracy."""

    name = "progress"

    def __init__(self, total: int, done: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="generations", unit="gen", disable=not enabled, leave=True)
        self.bar.update(done)

    def on_record(self, r: GenerationResult, record: GenerationRecord) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            seed_val=f"{record.seed_val_accuracy:.3f}",
            seed_test=f"{record.seed_test_accuracy:.3f}",
            best=f"{record.best_fitness:.3f}",
        )

    def close(self) -> None:
        self.bar.close()


def step_metrics(x: Any, mode: str) -> dict[str, Any] | None:
    """A variant's learning curve as MLflow metric series, at the resolution ``mode`` asks for."""
    train = list(getattr(x, "train_accuracy", []))
    if mode == "batch":  # train_accuracy's steps go on from the first pass's, as the loss's do
        return {"preq_accuracy": x.preq_accuracy, "train_accuracy": (len(x.preq_accuracy), train), "loss": x.loss}
    if mode == "epoch":
        bounds = [0, *x.epoch_ends]
        spans = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        first = len(x.preq_accuracy)  # steps of the first pass
        later = [train[b - 1 - first] for a, b in spans if a >= first and b - first <= len(train)]
        loss = np.asarray(x.loss)  # once, not once per pass (the same means as np.mean of each slice)
        return {  # step e is pass e over the niche
            "preq_accuracy_epoch": [x.preq_accuracy[-1]] if first else [],  # the first pass only: unseen data
            "train_accuracy_epoch": (1, later),
            "loss_epoch": [float(loss[a:b].mean()) for a, b in spans],
        }
    return None


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, Genome):
        return x.as_dict()
    return x
