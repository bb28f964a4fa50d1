"""A population run's wiring: config → world, strategy, screens, distiller, pool, observers."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from forkpop.experiments import core
from forkpop.experiments.checkpoint import CheckpointError, read_checkpoint, read_seconds, state_from_checkpoint
from forkpop.experiments.closing import closing_table
from forkpop.experiments.config import ConfigError, ExperimentConfig, config_to_yaml, contained
from forkpop.experiments.observers import (
    BackdoorProbe,
    Checkpoints,
    CollapseAlarm,
    DiversityProbe,
    GenerationRecord,
    HeldOutReport,
    Observer,
    Progress,
    Tracking,
    WorldProbe,
)
from forkpop.experiments.specs import data_spec, model_spec
from forkpop.experiments.tracking import (
    PATIENCE_ENV,
    RUN_KEY_TAG,
    NullTracker,
    Tracker,
    redact_tree,
    resolve_tracking_uri,
)
from forkpop.population.world import World
from forkpop.selection import ensemble_accuracy
from forkpop.selection.distiller import Distiller, GeneratedSpec
from forkpop.selection.screens import fitness_screen, peer_label_screen_of
from forkpop.selection.strategies import Species, Strategy
from forkpop.workers.pool import Pool, make_pool, peak_rss_bytes

from forkpop.plugins import accepts, resolve

__all__ = ["GenerationRecord", "PopulationRun", "RunSummary", "build_distiller", "build_strategy"]


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
    mlflow_experiment_id: str = ""
    poisoned_niches: list[int] = field(default_factory=list)
    poisoned_teachers: int = 0  # over all generations
    unaudited_poisoned_teachers: int = 0  # of those, teachers whose poisoned labels the audit did not read anew
    backdoor_success: float = float("nan")  # of the final seed
    driver_peak_rss: int = 0
    world: dict[str, Any] = field(default_factory=dict)  # the world's figures of the last generation (text: lm.*)
    samples: list[str] = field(default_factory=list)  # text world: samples of the final seed


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
        tracking: bool = True,
        tracker: Tracker | None = None,
    ):
        self.cfg = cfg
        self._early_tracker = tracker  # started before this module's imports (see the CLI)
        self.tracking = tracking
        self.allow_unauthenticated_ray = allow_unauthenticated_ray
        self.progress = progress
        self.address = address or cfg.run.address
        self.backend = resolve_backend(cfg.run.backend, self.address, cfg.run.reachable_ray)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        self.run_root = Path(cfg.run.run_dir)
        self.run_dir = contained(self.run_root, f"{cfg.run.name}-s{cfg.run.seed}-{stamp}", "run.name")
        self.resume: dict | None = None
        if resume_dir is not None:  # continue that run: its directory, MLflow run and store
            self.run_dir = Path(resume_dir)
            self.resume = json.loads((self.run_dir / "run.json").read_text())
            tracking_uri = tracking_uri or self.resume["tracking_uri"]
        if self.resume is not None and not self.resume["tracking_uri"]:
            self.tracking = False  # a run made without tracking resumes without it
        self.tracking_uri = resolve_tracking_uri(tracking_uri, cfg.tracking.uri, self.run_root) if self.tracking else ""
        self.spec = cfg.population.genome_spec()
        self.data_spec = data_spec(cfg)
        self.model_spec = model_spec(cfg)

    # -- set-up ------------------------------------------------------------------------------
    def load_data(self) -> None:
        """Load (and so check) the data, and check the Ray address: a bad path or partition, or
        an address refused, fails before Ray or MLflow start."""
        if self.backend == "ray":  # refused before anything is recorded
            from forkpop.workers.ray_pool import check_address

            address = self.address or os.environ.get("RAY_ADDRESS")
            if address:
                check_address(address, self.allow_unauthenticated_ray)
        self.world = resolve("worlds", self.cfg.data.world, "data.world")(self.cfg)
        self.data = getattr(self.world, "data", None)  # the classification world's data bundle
        model = self.world.build_model()  # a model factory that refuses its options fails here, before anything starts
        if self.cfg.run.kernel == "native":
            self._check_native(model)

    def _check_native(self, model: Any) -> None:
        """``run.kernel=native`` that cannot hold (on this machine, or for this run): one line."""
        from forkpop.population import native

        why = ""
        if self.cfg.data.world != "classification" or self.cfg.run.engine != "batched":
            why = "it is the classification world's batched engine's kernel"
        elif self.cfg.run.device == "cuda":
            why = "it is a CPU kernel and run.device=cuda"
        elif not isinstance(model, torch.nn.Module) or native.native_layout(model) is None:
            why = f"it takes Linear layers with one activation between them, not model.family={self.cfg.model.family}"
        else:
            why = native.kernel()[1]
        if why:
            raise ConfigError(f"run.kernel=native: {why}; use run.kernel=auto or torch")

    def learner_spec(self) -> Any:
        return self.world.learner_spec()

    def _start_tracker(self) -> Tracker | NullTracker:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        early, self._early_tracker = self._early_tracker, None
        if early is not None and not (self.tracking and (early.uri, early.experiment) == self._tracker_key()):
            early.discard()
            early = None
        if self.tracking:
            tracker = early or Tracker(*self._tracker_key(), self.run_root, patience_s=self._patience())
        else:
            tracker = NullTracker()
        if self.resume is not None:
            self._run_json = dict(self.resume)  # a run killed before MLflow named it gets its id now
            state = self._restore()
            last = GenerationRecord(**state["records"][-1]).metrics() if state["records"] else None
            if self.resume.get("mlflow_run_id") or not self.tracking:
                tracker.attach(self.resume["mlflow_run_id"], state["generation"], last)
            else:  # killed before the run's id was saved: the writer finds it by its key
                tracker.start(*self._parent_run(self.resume.get("run_key")), resume=(state["generation"], last))
            return tracker
        (self.run_dir / "config.yaml").write_text(config_to_yaml(self.cfg))
        described = json.dumps(self.world.describe(), indent=1)
        (self.run_dir / "world.json").write_text(described)
        key = tracker.start(*self._parent_run(None))
        # What resume needs to find this run again, before MLflow has said the run's id.
        self._run_json = {
            "mlflow_run_id": None,
            "run_key": key,
            "tracking_uri": self.tracking_uri,
            "tracked_marks": True,
        }
        (self.run_dir / "run.json").write_text(json.dumps(self._run_json))
        tracker.log_text(described, "world.json")
        return tracker

    def _tracker_key(self) -> tuple[str, str]:
        return self.tracking_uri, self.cfg.tracking.experiment

    def _patience(self) -> float | None:
        return None if os.environ.get(PATIENCE_ENV) else self.cfg.tracking.outage_s

    def discard_early_tracker(self) -> None:
        """Stop the tracking process started for this run when the run never starts."""
        if self._early_tracker is not None:
            self._early_tracker.discard()
            self._early_tracker = None

    def _parent_run(self, key: str | None) -> tuple[str, dict[str, str], dict[str, Any]]:
        """The parent MLflow run's name, tags and params (``key``: its ``forkpop.run_key``)."""
        tags = {
            "forkpop.kind": "population",
            "forkpop.run_dir": str(self.run_dir.resolve()),
            "forkpop.world": self.world.name,
            **({"forkpop.standardized": str(self.data.scaling is not None).lower()} if self.data else {}),
            **({RUN_KEY_TAG: key} if key else {}),
        }
        return self.cfg.run.name, tags, _flatten(self.cfg.model_dump(mode="json"))

    def _mark_tracked(self, generations: list[int]) -> None:
        """Mark the checkpoints of ``generations`` as having every record in MLflow."""
        for g in generations:
            folder = self.run_dir / "checkpoints" / f"gen-{g:04d}"
            if folder.is_dir():
                (folder / TRACKED).touch()

    def _save_run_id(self, tracker: Tracker | NullTracker, wait: bool = False) -> None:
        """Write the MLflow run's id into ``run.json`` once the writer has it (``wait``: now)."""
        if not self.tracking or self._run_json.get("mlflow_run_id"):
            return
        run_id = tracker.wait_started() if wait else tracker.poll()
        if run_id:
            self._run_json["mlflow_run_id"] = run_id
            (self.run_dir / "run.json").write_text(json.dumps(self._run_json))

    def _start_pool(self) -> Pool:
        if self.backend == "ray":
            from forkpop.workers.ray_pool import ensure_ray

            ensure_ray(self.address, self.cfg.run.num_cpus, self.allow_unauthenticated_ray, self.cfg.run.reachable_ray)
        return make_pool(
            self.backend,
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
        if getattr(self, "world", None) is None:  # the CLI loads it first, to fail before anything starts
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
                    "forkpop.kernel": ",".join(sorted({w.get("kernel", "torch") for w in workers})),
                }
            )
            fallback = next((w["reason"] for w in workers if w["engine"] == "loop"), None)
            if fallback and self.cfg.run.engine == "batched":
                print(f"forkpop: variants learn one by one: {fallback}", file=sys.stderr)
            self._save_run_id(tracker)
            self.startup_seconds = time.perf_counter() - t_start
            summary = self._evolve(pool, tracker, t_start)
            summary.workers = pool.describe()
            summary.driver_peak_rss = peak_rss_bytes()
            (self.run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=1, default=str))
            tracker.publish(closing_table(summary))  # the explorer and the run's description, then finish
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

    def _evolve(self, pool: Pool, tracker: Tracker | NullTracker, t_start: float) -> RunSummary:
        cfg = self.cfg
        world = self.world
        history: list[GenerationRecord] = []
        if self.resume is not None and self._restored["generation"] >= 0:  # from the last good checkpoint
            state = self._restored["state"]
            history = [GenerationRecord(**r) for r in self._restored["records"]]
        else:
            state = core.start(world, cfg.run.seed, self.spec.initial(), cfg.selection.species)
            tracker.log_variant(state.seeds[0].variant, {"val_accuracy": state.seeds[0].val})
        observers = self.observers(world, tracker, done=state.generation)
        totals: dict[str, float] = {}
        report = partial(_report, observers, history, totals, world.poisoned())

        tracking = next(o for o in observers if isinstance(o, Tracking))

        def report_and_save_id(*args: Any) -> None:
            report(*args)
            self._save_run_id(tracker)
            self._mark_tracked(tracking.confirmed())

        state = core.evolve(
            state,
            cfg.run.generations,
            world=world,
            strategy=build_strategy(cfg),
            pool=pool,
            screens=build_screens(cfg, world),
            distiller=build_distiller(cfg),
            elitism=cfg.distill.elitism,
            accept_z=cfg.distill.accept_z,
            report=report_and_save_id,
        )
        observers[-1].close()  # the progress bar
        self.state, self.lineage = state, state.lineage

        samples = self._samples(world, state)
        if samples:
            tracker.log_text("\n\n----\n\n".join(samples), "samples.txt")
        tracker.log_text(state.lineage.to_json(), "lineage.json")
        tracker.log_text(yaml.safe_dump(redact_tree(cfg.model_dump(mode="json")), sort_keys=False), "config.yaml")
        t0 = time.perf_counter()
        self._save_run_id(tracker, wait=True)
        run_id = tracker.wait_started()
        totals["tracking_writer"] = tracker.flush()
        self._mark_tracked(tracking.confirmed(everything=True))
        totals["tracking_writer_cpu"] = tracker.cpu_seconds
        totals["tracking_flush"] = time.perf_counter() - t0
        totals["startup"] = self.startup_seconds
        model, last, teachers = world.build_model(), history[-1], state.teachers
        best = teachers[0] if len(teachers) else state.seeds[state.best_slot()].weights
        x_test, y_test = world.inputs("test"), world.labels("test")
        return RunSummary(
            seed_test_accuracy=last.seed_test_accuracy,
            best_individual_test_accuracy=world.fitness(model, best, "test"),
            ensemble_test_accuracy=ensemble_accuracy(model, teachers, x_test, y_test)
            if len(teachers) and y_test is not None
            else last.ensemble_test_accuracy,
            wall_seconds=time.perf_counter() - t_start,
            generations=cfg.run.generations,
            mlflow_run_id=run_id,
            mlflow_experiment_id=tracker.experiment_id,
            tracking_uri=self.tracking_uri,
            run_dir=str(self.run_dir.resolve()),
            seed_val_accuracy=last.seed_val_accuracy,
            history=[history_item(h) for h in history],
            seconds=totals,
            poisoned_niches=list(world.poisoned()),
            poisoned_teachers=sum(h.poisoned_teachers for h in history),
            unaudited_poisoned_teachers=sum(h.unaudited_poisoned_teachers for h in history),
            backdoor_success=last.backdoor_success,
            world=dict(last.world),
            samples=samples,
        )

    def _samples(self, world: World, state: Any) -> list[str]:
        """The final seed's samples (text world), also logged as the run's ``samples.txt``."""
        n = self.cfg.lm.report_samples if self.cfg.data.world == "text" else 0
        if n <= 0 or not hasattr(world, "samples"):
            return []
        seed = state.seeds[state.best_slot()]
        return world.samples(seed.weights, n, 3 * self.cfg.lm.context, temperature=1.0, seed=self.cfg.run.seed)

    def observers(self, world: World, tracker: Tracker | NullTracker, done: int) -> list[Observer]:
        """Who receives each generation's result, in order: the probes (test figures,
        diversity, collapse alarm, backdoor), then MLflow, the checkpoint and the progress bar."""
        cfg = self.cfg
        probes: list[Observer] = [
            HeldOutReport(world),
            DiversityProbe(world, self.spec),
            CollapseAlarm(world, cfg.tracking.collapse_window),
        ]
        if cfg.data.poison.kind == "backdoor":
            probes.append(BackdoorProbe(world, cfg.data.poison.target))
        if type(world).measure is not World.measure:
            probes.append(WorldProbe(world))
        return [
            *probes,
            Tracking(
                tracker, cfg.tracking.step_metrics, world.poisoned(), cfg.tracking.variant_runs, self.tracking_uri
            ),
            Checkpoints(self.run_dir),
            Progress(cfg.run.generations, done, self.progress),
        ]

    def _restore(self) -> dict:
        """The last checkpoint that loads and verifies (a corrupt one falls back to the one
        before, saying so) as the run's state, with every earlier generation's record."""
        folders = sorted((self.run_dir / "checkpoints").glob("gen-[0-9]*"), reverse=True)
        if self.tracking and self.resume is not None and self.resume.get("tracked_marks"):
            # A checkpoint whose generation's records the writer had not yet vouched for is
            # made again (its records in MLflow, if any, are deleted on attach and rewritten).
            while folders and not (folders[0] / TRACKED).is_file():
                shutil.rmtree(folders.pop(0))
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
            run_state = state_from_checkpoint(tensors, state, self.cfg.run.seed)
            self._restored = {"generation": g, "state": run_state, "records": records}
            return self._restored
        # Killed before its first checkpoint: it starts again, in the same MLflow run.
        self._restored = {"generation": -1, "state": None, "records": []}
        return self._restored


TRACKED = "tracked"  # in a checkpoint folder: MLflow holds that generation's records


def resolve_backend(backend: str, address: str | None, reachable_ray: bool = False) -> str:
    """``auto``: Ray when a cluster address is given (the argument, ``run.address`` or
    ``RAY_ADDRESS``) or a local Ray other machines may join (``run.reachable_ray``), else this
    process. On one machine Ray's start and stop (several seconds here) outweigh what its actors
    add: with the batched engine one process using every core learns a default population as
    fast as one actor does."""
    if backend != "auto":
        return backend
    return "ray" if address or os.environ.get("RAY_ADDRESS") or reachable_ray else "local"


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The config's strategy: ``selection.method`` by name or import path, wrapped in the
    species strategy when ``selection.species`` > 1."""
    sel, pop = cfg.selection, cfg.population
    cls = resolve("strategies", sel.method, "selection.method")
    extra = {"per_niche": sel.per_niche} if accepts(cls, "per_niche", through_kwargs=False) else {}
    inner = cls(
        pop.genome_spec(),
        pop.size,
        cfg.n_niches,
        k=sel.k,
        mutation_eta=pop.mutation_eta,
        mutation_indpb=pop.mutation_indpb,
        rotate_niches=pop.rotate_niches,
        tournament_size=sel.tournament_size,
        **extra,
    )
    if sel.species == 1:
        return inner
    return Species(
        inner, sel.species, species_from=sel.species_from, merge_last=sel.merge_species, generations=cfg.run.generations
    )


def build_screens(cfg: ExperimentConfig, world: World) -> dict[str, core.Screen]:
    """The screens every generation's evaluations pass before selection."""
    audit = cfg.data.audit
    return {
        "fitness": partial(fitness_screen, z=cfg.selection.screen),
        "peer_labels": partial(
            peer_label_screen_of,
            world=world,
            mode=audit.mode,
            suspect=audit.suspect,
            min_class_recall=audit.min_class_recall,
        ),
    }


def build_distiller(cfg: ExperimentConfig) -> Distiller:
    """The config's distiller (``distill.method``, by name or import path)."""
    d = cfg.distill
    cls = resolve("distillers", d.method, "distill.method")
    return cls(
        cfg.population.genome_spec(),
        init=d.init,
        transfer=d.transfer,
        temperature=d.temperature,
        steps=d.steps,
        lr=d.lr,
        batch_size=d.batch_size,
        aggregate=d.aggregate,
        eval_every=d.eval_every,
        screen=d.screen,
        species_mix=d.species_mix,
        own_niche=d.own_niche,
        **({"hard": d.hard} if accepts(cls, "hard", through_kwargs=False) else {}),
        **({"kernel": cfg.run.kernel} if accepts(cls, "kernel", through_kwargs=False) else {}),
        inherit=cfg.selection.inherit,
        generated=GeneratedSpec(**d.generated.model_dump()),
    )


def _report(
    observers: list[Observer],
    history: list[GenerationRecord],
    totals: dict[str, float],
    poisoned: tuple[int, ...],
    result: core.GenerationResult,
    t_next: float | None,
) -> None:
    """Hand generation ``result`` to the observers: their figures make its record, then each
    records it; once the last has, the record's timings are complete (``on_record``, in
    reverse order: the checkpoint's timings are on disk before MLflow gets them)."""
    secs = result.seconds
    result.history = tuple(history)
    for o in observers:
        t0 = time.perf_counter()
        for k, v in o.measure(result).items():
            if k == "artifacts":
                result.figures.setdefault(k, {}).update(v)
            else:
                result.figures[k] = v
        secs[o.name] = secs.get(o.name, 0.0) + time.perf_counter() - t0
    record = GenerationRecord.of(result, result.figures, poisoned)
    for o in observers:
        t0 = time.perf_counter()
        o.on_generation(result, record)
        secs[o.name] = secs.get(o.name, 0.0) + time.perf_counter() - t0
    # Overlapped with the next generation's learning unless this is the last one.
    secs["report"] = sum(secs.get(o.name, 0.0) for o in observers)
    secs["generation"] = (t_next if t_next is not None else time.perf_counter()) - result.started
    record.seconds = secs
    for o in reversed(observers):
        o.on_record(result, record)
    history.append(record)
    for k, v in secs.items():
        totals[k] = totals.get(k, 0.0) + v


def history_item(record: GenerationRecord) -> dict[str, Any]:
    """A generation's record as the summary gives it: its fields, and the world's own figures
    named by themselves too where they name no field (``env.median_return`` is also
    ``median_return``)."""
    item = asdict(record)
    for k, v in record.world.items():
        short = k.split(".", 1)[1] if "." in k else k
        item.setdefault(short, v)
    return item


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
