"""The generation loop: fork → learn online → select → distill, with tracking and checkpoints."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from experiments.checkpoint import CheckpointError, read_checkpoint, read_seconds, write_checkpoint, write_seconds
from experiments.config import ExperimentConfig, config_to_yaml, contained
from experiments.tracking import PATIENCE_ENV, Tracker, redact_tree, resolve_tracking_uri
from population.diversity import (
    disagreement_matrix,
    functional_diversity,
    genotype_spread,
    js_matrix,
    lineage_stats,
    representation_similarity,
    weight_distances,
)
from population.genome import Genome
from population.lineage import Lineage
from population.models import build_model, flat_weights, load_flat_weights, predict_many
from population.variant import Origin, Variant
from selection import accuracy_of, distill, ensemble_accuracy, inherit_genome, mutate_genome, select, student_init
from selection.distill import teacher_targets
from selection.species import (
    assign_slots,
    cluster_by_function,
    fitness_outliers,
    peer_label_screen,
    screen_by_agreement,
)
from workers.data import DataError, DataSpec, load_data, trigger
from workers.learner import AuditSpec, ForkTask, LearnerSpec, LearnResult, ModelSpec
from workers.pool import Pool, make_pool, peak_rss_bytes


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
    collapse_alarm: bool = False  # validation accuracy and entropy both fell over the last generations
    poisoned_teachers: int = 0  # teachers that learned on a poisoned niche
    backdoor_success: float = float("nan")  # share of triggered test inputs the seed sends to the target
    audited_variants: int = 0  # variants whose niche labels the label audit changed
    label_screened: int = 0  # variants kept from teaching because their peers contradict their niche's labels
    unaudited_poisoned_teachers: int = 0  # poisoned teachers that learned labels the audit left as they were
    transfer_real_fraction: float = 1.0  # lowest share of real inputs in a distillation's transfer set
    transfer_generated: int = 0  # generated, pseudo-labelled inputs in the transfer sets
    seconds: dict[str, float] = field(default_factory=dict)
    diversity: dict[str, float] = field(default_factory=dict)  # see population.diversity

    def metrics(self) -> dict[str, float]:
        m = {
            k: float(v)
            for k, v in asdict(self).items()
            if isinstance(v, (int, float, bool)) and k not in ("generation",) and math.isfinite(float(v))
        }
        m.update({f"time_{k}": v for k, v in self.seconds.items()})
        m.update({f"div.{k}": v for k, v in self.diversity.items() if math.isfinite(v)})
        return m


@dataclass
class Seed:
    """A species slot's current seed: whom the next forks of that slot descend from."""

    variant: Variant
    weights: torch.Tensor
    val: float


@dataclass
class Student:
    """A seed distilled from a group of teachers, and whether it replaced its slot's seed."""

    variant: Variant
    weights: torch.Tensor
    val: float
    accepted: bool
    slot: int = 0
    real_fraction: float = 1.0  # share of real inputs in its transfer set
    generated: int = 0  # generated inputs in its transfer set


@dataclass
class RunSummary:
    seed_test_accuracy: float
    best_individual_test_accuracy: float
    ensemble_test_accuracy: float
    wall_seconds: float
    generations: int
    mlflow_run_id: str
    tracking_uri: str
    run_dir: str
    seed_val_accuracy: float
    history: list[dict[str, Any]]
    seconds: dict[str, float]
    workers: list[dict[str, Any]] = field(default_factory=list)  # node, device, engine, peak_rss per worker
    poisoned_niches: list[int] = field(default_factory=list)
    poisoned_teachers: int = 0  # over all generations
    unaudited_poisoned_teachers: int = 0  # of those, teachers whose poisoned labels the audit did not read anew
    backdoor_success: float = float("nan")  # of the final seed
    driver_peak_rss: int = 0


def _seed_of(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**62))


class PopulationRun:
    """One population run. ``run()`` executes every generation and returns the summary."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        *,
        tracking_uri: str | None = None,
        address: str | None = None,
        progress: bool = True,
        resume_dir: Path | None = None,
        allow_unauthenticated_ray: bool = False,
    ):
        self.cfg = cfg
        self.allow_unauthenticated_ray = allow_unauthenticated_ray
        self.progress = progress
        self.address = address or cfg.run.address
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        self.run_root = Path(cfg.run.run_dir)
        self.run_dir = contained(self.run_root, f"{cfg.run.name}-s{cfg.run.seed}-{stamp}", "run.name")
        self.resume: dict | None = None
        # Per species slot: generated transfer inputs, their pseudo-labels, their generation.
        self._generated: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if resume_dir is not None:  # continue that run: its directory, MLflow run and store
            self.run_dir = Path(resume_dir)
            self.resume = json.loads((self.run_dir / "run.json").read_text())
            tracking_uri = tracking_uri or self.resume["tracking_uri"]
        self.tracking_uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri, self.run_root)
        self.spec = cfg.population.genome_spec()
        d = cfg.data
        self.data_spec = DataSpec(
            source=d.source,
            path=str(Path(d.path).resolve()) if d.path else None,
            label_column=d.label_column,
            val_fraction=d.val_fraction,
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
        self.model_spec = ModelSpec(cfg.model.family, tuple(cfg.model.hidden))

    # -- set-up ------------------------------------------------------------------------------
    def load_data(self) -> None:
        """Load (and so check) the data, and check the Ray address: a bad path or partition, or
        an address refused, fails before Ray or MLflow start."""
        if self.cfg.run.backend == "ray":  # refused before anything is recorded
            from workers.ray_pool import check_address

            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                check_address(address, self.allow_unauthenticated_ray)
        self.data = load_data(self.data_spec)
        bsz = self.cfg.data.batch_size
        small = [i for i, n in enumerate(self.data.niches) if len(n) < bsz]
        if small:
            least = min(len(self.data.niches[i]) for i in small)
            raise DataError(
                f"niches {small} hold fewer samples (the least {least}) than one batch (data.batch_size={bsz}); "
                f"lower data.batch_size, raise data.min_niche_size to {bsz} or use fewer niches"
            )

    def learner_spec(self) -> LearnerSpec:
        run = self.cfg.run
        return LearnerSpec(
            self.data_spec,
            self.model_spec,
            self.cfg.data.batch_size,
            run.torch_threads,
            self.data.plan,
            engine=run.engine,
            device=run.device,
            audit=AuditSpec(**self.cfg.data.audit.model_dump()),
        )

    def _start_tracker(self) -> Tracker:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        patience = None if os.environ.get(PATIENCE_ENV) else self.cfg.tracking.outage_s
        tracker = Tracker(self.tracking_uri, self.cfg.tracking.experiment, self.run_root, patience_s=patience)
        if self.resume is not None:
            state = self._restore()
            last = GenerationRecord(**state["records"][-1]).metrics() if state["records"] else None
            tracker.attach(self.resume["mlflow_run_id"], state["generation"], last)
            return tracker
        (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        tracker.start(
            self.cfg.run.name,
            tags={"forkpop.kind": "population", "forkpop.run_dir": str(self.run_dir.resolve())},
            params=_flatten(self.cfg.model_dump(mode="json")),
        )
        return tracker

    def _start_pool(self) -> Pool:
        if self.cfg.run.backend == "ray":
            from workers.ray_pool import ensure_ray

            ensure_ray(self.address, self.cfg.run.num_cpus, self.allow_unauthenticated_ray)
        return make_pool(
            self.cfg.run.backend,
            self.learner_spec(),
            n_workers=self.cfg.run.workers,
            cpus_per_worker=self.cfg.run.cpus_per_worker,
            n_variants=self.cfg.population.size,
            retries=self.cfg.run.retries,
        )

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> RunSummary:
        t_start = time.perf_counter()
        torch.set_num_threads(self.cfg.run.torch_threads)
        self.load_data()
        # MLflow starts on its writer thread while Ray and the actors come up here.
        tracker = self._start_tracker()
        pool: Pool | None = None
        status = "FAILED"
        try:
            pool = self._start_pool()
            workers = pool.describe()  # waits for the actors, so their start counts as start-up
            tracker.set_tags(
                {
                    "forkpop.ray_nodes": ",".join(sorted({w["node"] for w in workers})),
                    "forkpop.engine": ",".join(sorted({w["engine"] for w in workers})),
                    "forkpop.device": ",".join(sorted({w["device"] for w in workers})),
                }
            )
            fallback = next((w["reason"] for w in workers if w["engine"] == "loop"), None)
            if fallback and self.cfg.run.engine == "batched":
                print(f"forkpop: variants learn one by one: {fallback}", file=sys.stderr)
            if self.resume is None:  # what resume needs to find this run again
                run_json = {"mlflow_run_id": tracker.wait_started(), "tracking_uri": self.tracking_uri}
                (self.run_dir / "run.json").write_text(json.dumps(run_json))
            self.startup_seconds = time.perf_counter() - t_start
            summary = self._loop(pool, tracker, t_start)
            summary.workers = pool.describe()
            summary.driver_peak_rss = peak_rss_bytes()
            status = "FINISHED"
            return summary
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            if pool is not None:
                pool.close()
            try:
                tracker.finish(status)
            except Exception:
                if status == "FINISHED":
                    raise

    def _loop(self, pool: Pool, tracker: Tracker, t_start: float) -> RunSummary:
        cfg = self.cfg
        data = self.data
        model = build_model(self.model_spec.family, data.n_features, data.n_classes, self.model_spec.hidden)
        x_val, y_val = torch.from_numpy(data.x_val), torch.from_numpy(data.y_val)
        x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
        self._test = (x_test, y_test)
        self._probe = (x_val, y_val)
        x_pool = torch.from_numpy(data.x_pool)

        init_rng = np.random.default_rng([cfg.run.seed, 2**31])
        root_weights = flat_weights(
            build_model(
                self.model_spec.family, data.n_features, data.n_classes, self.model_spec.hidden, _seed_of(init_rng)
            )
        )
        root = Variant("g00-seed", self.spec.initial(), 0, Origin.SEED)
        n_species = cfg.selection.species
        history: list[GenerationRecord] = []
        totals: dict[str, float] = {}
        last_teachers = torch.empty(0)
        last_best = root_weights
        first = 0
        if self.resume is not None and self._restored["generation"] >= 0:  # from the last good checkpoint
            st = self._restored
            lineage = Lineage.from_dict(st["state"]["lineage"])
            seeds = st["seeds"]
            history = [GenerationRecord(**r) for r in st["records"]]
            if st["teachers"] is not None:
                last_teachers, last_best = st["teachers"], st["teachers"][0]
            first = st["generation"] + 1
        else:
            lineage = Lineage()
            lineage.add(root)
            root_val = accuracy_of(model, root_weights, x_val, y_val)
            tracker.log_variant(root, {"val_accuracy": root_val})
            # One slot per species; all start from the root and part ways at the first distillation.
            seeds = [Seed(root, root_weights, root_val) for _ in range(n_species)]

        bar = _progress(cfg.run.generations, self.progress)
        bar.update(first)
        pending: Callable[[float | None], None] | None = None
        try:
            for g in range(first, cfg.run.generations):
                t_gen = time.perf_counter()
                rng = np.random.default_rng([cfg.run.seed, g])
                secs: dict[str, float] = {}

                # Fork: the plan (genomes, niches, noise seeds) is made here; workers execute it.
                # Variant i descends from species slot i % n_species.
                t0 = time.perf_counter()
                forks, tasks = [], []
                for i in range(cfg.population.size):
                    parent = seeds[i % n_species].variant
                    genome = mutate_genome(
                        self.spec,
                        parent.genome,
                        _seed_of(rng),
                        cfg.population.mutation_eta,
                        cfg.population.mutation_indpb,
                    )
                    niche = (i + g * cfg.population.rotate_niches) % cfg.n_niches
                    v = Variant(f"g{g:02d}-v{i:03d}", genome, g, Origin.FORK, (parent.id,), niche)
                    forks.append(v)
                    cost = len(self.data.niches[v.niche]) * genome.get("epochs", 1.0)
                    tasks.append(ForkTask(v.id, v.niche, genome.as_dict(), _seed_of(rng), cost, i % n_species))
                fork_seeds = torch.stack([s.weights for s in seeds])
                secs["plan"] = time.perf_counter() - t0

                # Learn. While the workers learn, the driver reports the previous generation.
                t0 = time.perf_counter()
                handle = pool.submit(fork_seeds[0] if n_species == 1 else fork_seeds, tasks)
                if pending is not None:
                    report, pending = pending, None
                    report(t_gen)
                weights, results = pool.collect(handle)
                secs["learn"] = time.perf_counter() - t0
                secs["learn_compute"] = pool.stats.compute_seconds
                secs["ray_overhead"] = (
                    max(0.0, secs["learn"] - secs["learn_compute"]) if cfg.run.backend == "ray" else 0.0
                )

                # Select: fitness is validation accuracy; diverged variants have none. Novelty
                # (mean Jensen-Shannon distance to the others on the validation split) when
                # NSGA-II or species need it.
                t0 = time.perf_counter()
                fitness = [r.val_accuracy if r.status == "ok" else float("nan") for r in results]
                for v in forks:
                    lineage.add(v)
                # Screening: teachers whose validation fitness is an outlier below the rest are
                # not eligible (a poisoned niche's variants score low on the clean split).
                screened = fitness_outliers(fitness, cfg.selection.screen)
                label_screened = self._peer_screen(model, weights, results, forks, x_pool)
                screened |= label_screened
                eligible = [float("nan") if i in screened else f for i, f in enumerate(fitness)]
                js = None
                nov = None
                if cfg.selection.method == "nsga2" or n_species > 1:
                    js, nov = self._functional_distances(model, weights, fitness)
                teachers_idx = select(
                    eligible,
                    cfg.n_teachers,
                    cfg.selection.method,
                    _seed_of(rng),
                    cfg.selection.tournament_size,
                    novelty=nov,
                )
                merge = n_species > 1 and self._merged(g)
                if n_species > 1 and teachers_idx and not merge:
                    sub = js[np.ix_(teachers_idx, teachers_idx)]
                    groups = [[teachers_idx[j] for j in c] for c in cluster_by_function(sub, n_species)]
                    slots = assign_slots(groups, [i % n_species for i in range(len(forks))], n_species)
                else:
                    groups, slots = ([teachers_idx] if teachers_idx else []), [0]
                secs["select"] = time.perf_counter() - t0

                # Distill: each group of teachers into the seed of its species slot.
                t0 = time.perf_counter()
                students: list[Student] = []
                for members, slot in zip(groups, slots, strict=False):
                    st = self._distill(
                        model, g, forks, fitness, weights, members, teachers_idx, seeds[slot], rng, x_pool, slot
                    )
                    lineage.add(st.variant)
                    students.append(st)
                    if merge:  # one seed from every species' teachers, if it beats the best seed
                        best_val = max(s.val for s in seeds)
                        st.accepted = not cfg.distill.elitism or st.val >= best_val
                        if st.accepted:
                            seeds = [Seed(st.variant, st.weights, st.val)] * n_species
                    elif st.accepted:  # otherwise the old seed carries on and the next forks descend from it
                        seeds[slot] = Seed(st.variant, st.weights, st.val)
                tw = weights[teachers_idx] if teachers_idx else None
                if teachers_idx:
                    last_teachers, last_best = tw, tw[0]
                secs["distill"] = time.perf_counter() - t0

                pending = partial(
                    self._report,
                    tracker=tracker,
                    model=model,
                    g=g,
                    t_gen=t_gen,
                    secs=secs,
                    seeds=list(seeds),
                    forks=forks,
                    results=results,
                    fitness=fitness,
                    fork_seed_weights=fork_seeds,
                    variant_weights=weights,
                    teachers_idx=teachers_idx,
                    students=students,
                    teacher_weights=tw,
                    lineage=lineage.to_dict(),
                    rng_state=rng.bit_generator.state,
                    generated=dict(self._generated),
                    label_screened=label_screened,
                    history=history,
                    totals=totals,
                    bar=bar,
                )
        finally:  # the last report, or the one an interruption left pending
            if pending is not None:
                report, pending = pending, None
                report(None)
        bar.close()

        tracker.log_text(lineage.to_json(), "lineage.json")
        tracker.log_text(yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False), "config.yaml")
        t0 = time.perf_counter()
        run_id = tracker.wait_started()
        totals["tracking_writer"] = tracker.flush()
        totals["tracking_writer_cpu"] = tracker.cpu_seconds
        totals["tracking_flush"] = time.perf_counter() - t0
        totals["startup"] = self.startup_seconds
        self.lineage = lineage
        last = history[-1]
        return RunSummary(
            seed_test_accuracy=last.seed_test_accuracy,
            best_individual_test_accuracy=accuracy_of(model, last_best, x_test, y_test),
            ensemble_test_accuracy=(
                ensemble_accuracy(model, last_teachers, x_test, y_test) if len(last_teachers) else float("nan")
            ),
            wall_seconds=time.perf_counter() - t_start,
            generations=cfg.run.generations,
            mlflow_run_id=run_id,
            tracking_uri=self.tracking_uri,
            run_dir=str(self.run_dir.resolve()),
            seed_val_accuracy=last.seed_val_accuracy,
            history=[asdict(h) for h in history],
            seconds=totals,
            poisoned_niches=list(data.poisoned),
            poisoned_teachers=sum(h.poisoned_teachers for h in history),
            unaudited_poisoned_teachers=sum(h.unaudited_poisoned_teachers for h in history),
            backdoor_success=last.backdoor_success,
        )

    def _report(
        self,
        t_next: float | None,
        *,
        tracker: Tracker,
        model: torch.nn.Module,
        g: int,
        t_gen: float,
        secs: dict[str, float],
        seeds: list[Seed],
        forks: list[Variant],
        results: list[LearnResult],
        fitness: list[float],
        fork_seed_weights: torch.Tensor,
        variant_weights: torch.Tensor,
        teachers_idx: list[int],
        students: list[Student],
        teacher_weights: torch.Tensor | None,
        lineage: dict,
        rng_state: dict,
        generated: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        label_screened: set[int],
        history: list[GenerationRecord],
        totals: dict[str, float],
        bar: Any,
    ) -> None:
        """Generation ``g``'s report: test accuracies, MLflow records, diversity, checkpoint.

        It runs while the workers learn generation ``g + 1`` (``t_next``: when that one
        started), or after the last generation (``t_next`` None). With several species the
        reported seed is the one best on validation.
        """
        cfg = self.cfg
        x_test, y_test = self._test
        t0 = time.perf_counter()
        best_test = ens_test = float("nan")
        for st in students:
            st_test = accuracy_of(model, st.weights, x_test, y_test)
            tracker.log_variant(
                st.variant,
                {"val_accuracy": st.val, "test_accuracy": st_test},
                tags={"forkpop.accepted": str(st.accepted).lower(), "forkpop.species": str(st.slot)},
            )
        if teacher_weights is not None:
            best_test = accuracy_of(model, teacher_weights[0], x_test, y_test)
            ens_test = ensemble_accuracy(model, teacher_weights, x_test, y_test)
        best_slot = max(range(len(seeds)), key=lambda s: (seeds[s].val, -s))
        seed = seeds[best_slot]
        seed_test = accuracy_of(model, seed.weights, x_test, y_test)
        secs["evaluate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        teacher_ids = {forks[i].id for i in teachers_idx}
        curves = {r.variant_id: {"preq_accuracy": r.preq_accuracy, "loss": r.loss} for r in results}
        tracker.log_text(json.dumps(curves), f"steps/gen-{g:04d}.json")
        for i, (v, r) in enumerate(zip(forks, results, strict=True)):
            tags = {"forkpop.status": r.status, "forkpop.teacher": str(v.id in teacher_ids).lower()}
            if len(seeds) > 1:
                tags["forkpop.species"] = str(i % len(seeds))
            if self.data.poisoned:
                tags["forkpop.poisoned"] = str(v.niche in self.data.poisoned).lower()
            if r.reason:
                tags["forkpop.reason"] = r.reason
            if r.audit:
                tags["forkpop.label_audit"] = r.audit
            if i in label_screened:
                tags["forkpop.label_screened"] = "true"
            steps = _step_metrics(r, cfg.tracking.step_metrics)
            final = {"samples": r.samples, "learn_seconds": r.seconds}
            if math.isfinite(r.val_accuracy):
                final["val_accuracy"] = r.val_accuracy
            if r.preq_accuracy:
                final["preq_accuracy_final"] = r.preq_accuracy[-1]
            tracker.log_variant(v, final, steps, tags)
        secs["tracking"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        species_of = [i % len(seeds) for i in range(len(forks))]
        div, matrix = self._diversity(model, forks, results, fork_seed_weights, species_of, variant_weights, lineage, g)
        div["species"] = float(len({s.variant.id for s in seeds}))
        tracker.log_text(json.dumps(matrix), f"diversity/gen-{g:04d}.json")
        secs["diversity"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ok = [f for f in fitness if math.isfinite(f)]
        main = students[0] if students else None
        poisoned_teachers = sum(forks[i].niche in self.data.poisoned for i in teachers_idx)
        sp, _ = predict_many(model, seed.weights[None], self._probe[0])
        entropy = float(-(sp * torch.log(sp.clamp_min(1e-12))).sum(-1).mean())
        alarm = self._collapse(history, seed.val, entropy)
        if alarm and not any(h.collapse_alarm for h in history):
            print(
                f"forkpop: collapse alarm at generation {g}: the seed's validation accuracy and prediction "
                f"entropy have both fallen for {cfg.tracking.collapse_window} generations",
                file=sys.stderr,
            )
        backdoor = float("nan")
        if self.cfg.data.poison.kind == "backdoor":
            backdoor = self._backdoor_success(model, seed.weights)
        rec = GenerationRecord(
            generation=g,
            seed_id=seed.variant.id,
            seed_val_accuracy=seed.val,
            seed_test_accuracy=seed_test,
            best_fitness=max(ok, default=float("nan")),
            mean_fitness=float(np.mean(ok)) if ok else float("nan"),
            best_individual_test_accuracy=best_test,
            ensemble_test_accuracy=ens_test,
            student_val_accuracy=max((st.val for st in students), default=float("nan")),
            student_accepted=bool(main is not None and any(st.accepted for st in students)),
            diverged=len(results) - len(ok),
            teachers=sorted(teacher_ids),
            seed_entropy=entropy,
            collapse_alarm=alarm,
            poisoned_teachers=int(poisoned_teachers),
            backdoor_success=backdoor,
            audited_variants=sum(bool(r.audit) for r in results),
            label_screened=len(label_screened),
            unaudited_poisoned_teachers=sum(
                forks[i].niche in self.data.poisoned and not results[i].audit for i in teachers_idx
            ),
            transfer_real_fraction=min((st.real_fraction for st in students), default=1.0),
            transfer_generated=sum(st.generated for st in students),
            diversity=div,
        )
        # The checkpoint marks the generation done, so it is written once its records are in
        # MLflow: a resume after a kill never lacks a record (later ones it deletes and redoes).
        tracker.flush()
        self._checkpoint(g, seeds, best_slot, forks, lineage, rng_state, rec, teacher_weights, generated)
        secs["checkpoint"] = time.perf_counter() - t0
        # Overlapped with the next generation's learning unless this is the last one.
        secs["report"] = secs["evaluate"] + secs["tracking"] + secs["diversity"] + secs["checkpoint"]
        secs["generation"] = (t_next if t_next is not None else time.perf_counter()) - t_gen
        rec.seconds = secs
        # The timings are known only once the checkpoint is written: kept beside it, so a
        # resume after a kill before they reached MLflow logs them with the rest.
        write_seconds(self.run_dir, g, secs)
        tracker.log_generation(g, rec.metrics())
        history.append(rec)
        for k, v in secs.items():
            totals[k] = totals.get(k, 0.0) + v
        bar.update(1)
        bar.set_postfix(seed_val=f"{seed.val:.3f}", seed_test=f"{seed_test:.3f}", best=f"{rec.best_fitness:.3f}")

    def _collapse(self, history: list[GenerationRecord], val: float, entropy: float) -> bool:
        """Whether validation accuracy and prediction entropy have both fallen at each of the
        last ``tracking.collapse_window`` generations (the model-collapse signature)."""
        w = self.cfg.tracking.collapse_window
        if w <= 0 or len(history) < w:
            return False
        vals = [h.seed_val_accuracy for h in history[-w:]] + [val]
        ents = [h.seed_entropy for h in history[-w:]] + [entropy]
        fell = [vals[i + 1] < vals[i] and ents[i + 1] < ents[i] for i in range(w)]
        return all(fell)

    def _restore(self) -> dict:
        """The last checkpoint that loads and verifies (a corrupt one falls back to the one
        before, saying so), with every earlier generation's record."""
        folders = sorted((self.run_dir / "checkpoints").glob("gen-[0-9]*"), reverse=True)
        for folder in folders:
            try:
                tensors, state = read_checkpoint(folder)
                records = [
                    {**read_checkpoint(f)[1]["record"], "seconds": read_seconds(f)}
                    for f in sorted(folders)
                    if f.name <= folder.name
                ]
            except CheckpointError as e:
                print(f"forkpop: {e}; trying the generation before", file=sys.stderr)
                continue
            g = int(state["generation"])
            seeds = []
            for k, sp in enumerate(state["species"]):
                w = tensors.get(f"seed_{k}", tensors["seed"])
                seeds.append(Seed(Variant.from_dict(sp["seed"]), w, float(sp["val_accuracy"])))
            self._generated = {
                int(k.rsplit("_", 1)[1]): (
                    tensors[k],
                    tensors[k.replace("_x_", "_p_")],
                    tensors[k.replace("_x_", "_born_")],
                )
                for k in tensors
                if k.startswith("generated_x_")
            }
            self._restored = {
                "generation": g,
                "state": state,
                "seeds": seeds,
                "records": records,
                "teachers": tensors.get("teachers"),
            }
            return self._restored
        # Killed before its first checkpoint: it starts again, in the same MLflow run.
        self._restored = {"generation": -1, "state": None, "seeds": [], "records": [], "teachers": None}
        return self._restored

    def _backdoor_success(self, model: torch.nn.Module, weights: torch.Tensor) -> float:
        """Share of test inputs of other classes that the trigger sends to the backdoor target."""
        x_test, y_test = self._test
        target = self.cfg.data.poison.target
        keep = y_test != target
        x = torch.from_numpy(trigger(x_test[keep].numpy()))
        load_flat_weights(model, weights)
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(1) == target).float().mean())

    def _merged(self, g: int) -> bool:
        """Whether generation ``g``'s teachers all distill one seed although there are species:
        before ``selection.species_from``, and in the last generation with ``merge_species``."""
        sel = self.cfg.selection
        return g < sel.species_from or (sel.merge_species and g == self.cfg.run.generations - 1)

    def _functional_distances(
        self, model: torch.nn.Module, weights: torch.Tensor, fitness: list[float]
    ) -> tuple[np.ndarray, list[float]]:
        """Pairwise Jensen-Shannon distances of the variants on the validation split, and each
        one's novelty (mean distance to the other live ones); NaN for diverged variants."""
        n = len(fitness)
        live = [i for i, f in enumerate(fitness) if math.isfinite(f)]
        js = np.full((n, n), np.nan)
        nov = [float("nan")] * n
        if live:
            probs, _ = predict_many(model, weights[live], self._probe[0])
            sub = js_matrix(probs.double().numpy())
            js[np.ix_(live, live)] = sub
            for k, i in enumerate(live):
                nov[i] = float((sub[k].sum() - sub[k, k]) / max(len(live) - 1, 1))
        return js, nov

    def _distill(
        self,
        model: torch.nn.Module,
        g: int,
        forks: list[Variant],
        fitness: list[float],
        weights: torch.Tensor,
        members: list[int],
        teachers: list[int],
        old: Seed,
        rng: np.random.Generator,
        x_pool: torch.Tensor,
        slot: int,
    ) -> Student:
        """Distill the teachers ``members`` (indices into ``forks``) into a new seed.

        With species and ``distill.species_mix`` > 0, the soft targets also take that share
        from all of the generation's other teachers (``teachers``), so a species' seed stays
        a generalist while it starts from, and mostly follows, its own cluster.
        """
        cfg, data = self.cfg, self.data
        x_val, y_val = self._probe
        if cfg.distill.screen > 0 and len(members) >= 3:  # drop teachers the others disagree with
            preds, _ = predict_many(model, weights[members], x_pool)
            members = [members[j] for j in screen_by_agreement(preds.argmax(-1).numpy(), cfg.distill.screen)]
        mix = cfg.distill.species_mix if cfg.selection.species > 1 else 0.0
        others = [i for i in teachers if i not in members] if mix > 0 else []
        sources = members + others
        tw = weights[sources]
        own_f = sum(fitness[i] for i in members)
        tf = [fitness[i] * (1 - mix) / own_f for i in members]
        if others:
            other_f = sum(fitness[i] for i in others)
            tf += [fitness[i] * mix / other_f for i in others]
        if cfg.distill.transfer == "all":
            transfer = x_pool
        else:
            idx = np.concatenate([data.niches[forks[i].niche] for i in sources])
            transfer = x_pool[torch.from_numpy(np.sort(idx))]
        extra, real_fraction = self._generate(model, g, slot, transfer, tw, tf, x_val, y_val)
        k = len(members)
        init = student_init(
            cfg.distill.init, old.weights, tw[:k], tf[:k], [len(data.niches[forks[i].niche]) for i in members]
        )
        student_weights, _ = distill(
            model,
            init,
            tw,
            tf,
            transfer,
            temperature=cfg.distill.temperature,
            steps=cfg.distill.steps,
            lr=cfg.distill.lr,
            batch_size=cfg.distill.batch_size,
            aggregate=cfg.distill.aggregate,
            generator=torch.Generator().manual_seed(_seed_of(rng)),
            probe=(x_val, y_val),
            eval_every=cfg.distill.eval_every,
            extra=extra,
        )
        val = accuracy_of(model, student_weights, x_val, y_val)
        accepted = not cfg.distill.elitism or val >= old.val
        genome = inherit_genome(
            self.spec, [forks[i].genome for i in members], tf[:k], cfg.selection.inherit, _seed_of(rng)
        )
        single = self.cfg.selection.species == 1 or self._merged(g)
        name = f"g{g + 1:02d}-seed" if single else f"g{g + 1:02d}-seed{slot}"
        variant = Variant(name, genome, g + 1, Origin.DISTILL, tuple(forks[i].id for i in sources))
        n_gen = 0 if extra is None else len(extra[0])
        return Student(variant, student_weights, val, accepted, slot, real_fraction, n_gen)

    def _peer_screen(
        self,
        model: torch.nn.Module,
        weights: torch.Tensor,
        results: list[LearnResult],
        forks: list[Variant],
        x_pool: torch.Tensor,
    ) -> set[int]:
        """Learned variants whose niche labels (as given) the other variants contradict, among
        those the label audit did not read anew (see :func:`selection.species.peer_label_screen`)."""
        audit = self.cfg.data.audit
        alive = [i for i, r in enumerate(results) if r.status == "ok"]
        if audit.mode == "none" or len(alive) < 3:
            return set()
        x_val, y_val = self._probe
        probs, _ = predict_many(model, weights[alive], x_pool)
        val_probs, _ = predict_many(model, weights[alive], x_val)
        niches = [self.data.niches[forks[i].niche] for i in alive]
        flagged = peer_label_screen(
            probs.numpy(),
            self.data.y_pool,
            niches,
            val_probs.numpy(),
            y_val.numpy(),
            audit.suspect,
            audit.min_class_recall,
        )
        return {alive[j] for j in flagged if not results[alive[j]].audit}

    def _generate(
        self,
        model: torch.nn.Module,
        g: int,
        slot: int,
        real: torch.Tensor,
        teachers: torch.Tensor,
        fitness: list[float],
        x_val: torch.Tensor,
        y_val: torch.Tensor,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, float]:
        """Generation ``g``'s generated transfer inputs for ``slot`` with the teachers'
        pseudo-labels, joined to those kept from earlier generations (newest first) and cut so
        that real inputs stay at least ``distill.generated.min_real_fraction`` of the set."""
        gc = self.cfg.distill.generated
        if gc.kind == "none":
            return None, 1.0
        gen = torch.Generator().manual_seed(int(np.random.default_rng([self.cfg.run.seed, g, slot, 5]).integers(2**62)))
        n_new = max(1, int(round(gc.per_generation * len(real))))
        a = real[torch.randint(len(real), (n_new,), generator=gen)]
        if gc.kind == "mixup":
            b = real[torch.randint(len(real), (n_new,), generator=gen)]
            lam = torch.rand(n_new, 1, generator=gen)
            x_new = lam * a + (1 - lam) * b
        else:
            x_new = a + gc.noise_std * torch.randn(a.shape, generator=gen)
        d = self.cfg.distill
        p_new = teacher_targets(model, teachers, fitness, x_new, d.temperature, d.aggregate, (x_val, y_val))
        born = torch.full((n_new,), g, dtype=torch.int64)
        if gc.keep and slot in self._generated:
            ox, op, ob = self._generated[slot]
            x_new, p_new, born = torch.cat([x_new, ox]), torch.cat([p_new, op]), torch.cat([born, ob])
        f = gc.min_real_fraction
        cap = len(x_new) if f == 0 else int(len(real) * (1 - f) / f)
        x_new, p_new, born = x_new[:cap], p_new[:cap], born[:cap]
        self._generated[slot] = (x_new, p_new, born)
        if not len(x_new):
            return None, 1.0
        return (x_new, p_new), len(real) / (len(real) + len(x_new))

    def _diversity(
        self,
        model: torch.nn.Module,
        forks: list[Variant],
        results: list[LearnResult],
        fork_seeds: torch.Tensor,
        species_of: list[int],
        weights: torch.Tensor,
        lineage: dict,
        g: int,
    ) -> tuple[dict[str, float], dict]:
        """The generation's diversity measures (on the validation split as probe), and the
        pairwise disagreement matrix of its learned variants for the heat maps."""
        alive = [i for i, r in enumerate(results) if r.status == "ok"]
        x_val, y_val = self._probe
        out = genotype_spread([forks[i].genome.as_dict() for i in alive], self.spec)
        ids = [forks[i].id for i in alive]
        matrix: dict = {"ids": ids, "disagreement": []}
        if alive:
            w = weights[alive]
            out.update(weight_distances(w))
            own = fork_seeds[[species_of[i] for i in alive]]  # each variant's own seed
            out["weight_to_seed"] = float((w.double() - own.double()).norm(dim=1).mean())
            probs, hid = predict_many(model, w, x_val, with_hidden=True)
            p = probs.double().numpy()
            out.update(functional_diversity(p, y_val.numpy()))
            out.update(representation_similarity([h.double().numpy() for h in hid]))
            matrix["disagreement"] = disagreement_matrix(p).round(4).tolist()
        out.update(lineage_stats(Lineage.from_dict(lineage), g))
        out["alive"] = float(len(alive))
        return out, matrix

    def _checkpoint(
        self,
        g: int,
        seeds: list[Seed],
        best: int,
        forks: list[Variant],
        lineage: dict,
        rng_state: dict,
        record: GenerationRecord | None = None,
        teachers: torch.Tensor | None = None,
        generated: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        tensors = {"seed": seeds[best].weights}
        for slot, (x, p, born) in (generated or {}).items():
            tensors.update({f"generated_x_{slot}": x, f"generated_p_{slot}": p, f"generated_born_{slot}": born})
        if len(seeds) > 1:
            tensors.update({f"seed_{k}": s.weights.clone() for k, s in enumerate(seeds)})
        if teachers is not None:
            tensors["teachers"] = teachers.clone()
        state = {
            "record": asdict(record) if record is not None else None,
            "seed": seeds[best].variant.to_dict(),
            "seed_val_accuracy": seeds[best].val,
            "species": [{"seed": s.variant.to_dict(), "val_accuracy": s.val} for s in seeds],
            "genomes": {v.id: v.genome.as_dict() for v in forks},
            "lineage": lineage,
            # Each generation's generator is default_rng([run.seed, generation]); its state
            # after this generation is kept to show the stream is reproduced on resume.
            "rng": {"scheme": "numpy.default_rng([run.seed, generation])", "state": rng_state},
        }
        write_checkpoint(self.run_dir, g, tensors, _jsonable(state))


def _step_metrics(r: LearnResult, mode: str) -> dict[str, list[float]] | None:
    """A variant's learning curve as MLflow metric series, at the resolution ``mode`` asks for."""
    if mode == "batch":
        return {"preq_accuracy": r.preq_accuracy, "loss": r.loss}
    if mode == "epoch":
        bounds = [0, *r.epoch_ends]
        spans = [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
        return {
            "preq_accuracy_epoch": [r.preq_accuracy[b - 1] for _, b in spans],
            "loss_epoch": [float(np.mean(r.loss[a:b])) for a, b in spans],
        }
    return None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, Genome):
        return x.as_dict()
    return x


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _progress(total: int, enabled: bool):  # noqa: ANN202 - tqdm or a no-op with its interface
    from tqdm import tqdm

    return tqdm(total=total, desc="generations", unit="gen", disable=not enabled, leave=True)
