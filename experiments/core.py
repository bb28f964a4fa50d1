"""The generation core: fork → learn online → screen → select → distill → accept, repeated."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from forkpop.population.lineage import Lineage
from forkpop.population.state import Evaluations, ForkPlan, RunState, Seed, best_slot
from forkpop.population.variant import Origin, Variant
from forkpop.population.world import World
from forkpop.selection.distiller import Distiller, Student
from forkpop.selection.strategies import Strategy, TeacherGroup
from forkpop.workers.learner import ForkTask
from forkpop.workers.pool import Pool

Screen = Callable[[Evaluations], set[int]]


@dataclass
class GenerationResult:
    """Everything generation ``generation`` produced: handed, as one value, to each observer.

    ``before`` is the state the generation started from and ``state`` the one it left;
    ``screened[name]`` the variants each screen kept from teaching; ``accepted[j]`` whether
    ``students[j]`` replaced a seed. ``history`` holds the records of earlier generations.
    """

    generation: int
    before: RunState
    state: RunState
    plan: ForkPlan
    evals: Evaluations
    screened: dict[str, set[int]]
    groups: list[TeacherGroup]
    students: list[Student]
    accepted: list[bool]
    seconds: dict[str, float]
    rng_state: dict
    started: float
    history: tuple[Any, ...] = ()
    acceptance: list[dict[str, float]] = field(default_factory=list)  # elitism's paired test, per student
    figures: dict[str, Any] = field(default_factory=dict)  # what the observers measured (their ``measure``)
    model: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def teacher_ids(self) -> list[int]:
        return list(self.groups[0].teachers) if self.groups else []


# Who watches the phases of the generations (``watcher(name, entering)``; e.g. the benchmark's
# peak memory per phase, benchmarks/generation.py). Empty: :func:`phase` costs nothing.
PHASE_WATCHERS: list[Callable[[str, bool], None]] = []


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Tell :data:`PHASE_WATCHERS` that ``name`` (``plan``, ``learn``, ``select``,
    ``distill``; the observers' names, where a watcher wraps them) starts and ends here."""
    if not PHASE_WATCHERS:
        yield
        return
    for w in PHASE_WATCHERS:
        w(name, True)
    try:
        yield
    finally:
        for w in PHASE_WATCHERS:
            w(name, False)


def start(world: World, run_seed: int, genome: Any, n_species: int = 1) -> RunState:
    """The root seed of a run (weights from ``default_rng([run_seed, 2**31])``), one copy per
    species slot: all slots start from it and part ways at the first distillation."""
    init_rng = np.random.default_rng([run_seed, 2**31])
    model = world.build_model(int(init_rng.integers(0, 2**62)))
    weights = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    prepare = getattr(world, "prepare_root", None)  # e.g. the text world's pretraining on real text
    if prepare is not None:
        weights = prepare(weights, run_seed)
    root = Variant("g00-seed", genome, 0, Origin.SEED)
    lineage = Lineage()
    lineage.add(root)
    seed = Seed(root, weights, world.fitness(model, weights))
    return RunState(run_seed, (seed,) * n_species, lineage)


def evolve(
    state: RunState,
    generations: int,
    *,
    world: World,
    strategy: Strategy,
    pool: Pool,
    screens: Mapping[str, Screen],
    distiller: Distiller,
    elitism: bool,
    report: Callable[[GenerationResult, float | None], None],
    accept_z: float = 1.0,
) -> RunState:
    """Run generations ``state.generation .. generations - 1``; returns the last state.

    With ``elitism`` a student replaces its seed only when it is better with confidence on
    the world's acceptance split: the mean paired gain is positive and at least ``accept_z``
    standard errors (:class:`PairedElitism`).

    ``report(result, t_next)`` (the observers) runs for generation g while the workers learn
    generation g + 1 (``t_next``: when that one started), and after the last one (None).
    """
    model = world.build_model()  # the template every weight vector is loaded into
    judge = PairedElitism(world, model, accept_z)
    pending: GenerationResult | None = None
    try:
        for g in range(state.generation, generations):
            clock, rng = _Clock(), state.rng()
            with phase("plan"):
                plan = strategy.ask(state, rng)
            clock.lap("plan")
            with phase("learn"):
                handle = submit(pool, world, state, plan)
            if pending is not None:
                done, pending = pending, None
                report(done, clock.started)
                del done  # its evaluations (weights, cached predictions) need not outlive the report
            with phase("learn"):
                evals = collect(pool, handle, plan, world, model, clock)
            with phase("select"):
                screened = {name: screen(evals) for name, screen in screens.items()}
                groups = strategy.tell(state, evals, set().union(*screened.values()), rng)
            clock.lap("select")
            with phase("distill"):
                students = [distiller(world, model, state, grp, evals, rng) for grp in groups]
                judge.log = []
                after, accepted = accept(state, evals, groups, students, elitism, judge)
            clock.lap("distill")
            pending = GenerationResult(
                g, state, after, plan, evals, screened, groups, students, accepted, clock.secs,
                rng.bit_generator.state, clock.started, acceptance=judge.log, model=model,
            )  # fmt: skip
            state = after
    finally:  # the last report, or the one an interruption left pending
        if pending is not None:
            report(pending, None)
    return state


def submit(pool: Pool, world: World, state: RunState, plan: ForkPlan) -> tuple[Any, torch.Tensor]:
    """Hand the plan to the workers: each variant forks its slot's seed and learns its niche."""
    payload = getattr(world, "payload", None)  # what a world adds to a niche (the text world: generated text)
    tasks = [
        ForkTask(
            v.id,
            v.niche,
            v.genome.as_dict(),
            noise,
            world.niche_size(v.niche) * v.genome.get("epochs", 1.0),
            s,
            payload(state, v.niche, s) if payload is not None else None,
        )
        for v, s, noise in zip(plan.variants, plan.slots, plan.noise_seeds, strict=True)
    ]
    seeds = state.seed_stack()
    return pool.submit(seeds[0] if state.n_species == 1 else seeds, tasks), seeds


def collect(
    pool: Pool, handle: tuple[Any, torch.Tensor], plan: ForkPlan, world: World, model: torch.nn.Module, clock: _Clock
) -> Evaluations:
    """The learned variants: weights, the workers' records and probe fitness (NaN: diverged)."""
    weights, results = pool.collect(handle[0])
    clock.lap("learn")
    compute = pool.stats.compute_seconds
    clock.secs["learn_compute"] = compute
    clock.secs["ray_overhead"] = max(0.0, clock.secs["learn"] - compute) if getattr(pool, "remote", False) else 0.0
    fitness = [r.val_accuracy if r.status == "ok" else float("nan") for r in results]
    splits: dict[str, bool] = {"probe": True}  # with hidden representations (diversity)

    def predict(w: torch.Tensor, split: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return predict_in_chunks(world, model, w, split, with_hidden=splits.get(split, False))

    return Evaluations(plan, weights, results, fitness, handle[1], predict)


PREDICT_CHUNK = 64  # variants per call of World.predict when a generation's predictions are made


def predict_in_chunks(
    world: World, model: torch.nn.Module, weights: torch.Tensor, split: str, *, with_hidden: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:meth:`World.predict` of ``weights`` ``(n, n_params)`` on ``split``, ``PREDICT_CHUNK``
    variants at a time into one preallocated ``(n, m, C)`` tensor: the same predictions, but
    the memory a call needs beside its result is one chunk's, not the whole population's (at
    4,096 variants one call for the transfer split alone grew the driver by 2 GB)."""
    x = world.inputs(split)
    n = len(weights)
    if n <= PREDICT_CHUNK:
        return world.predict(model, weights, x, with_hidden=with_hidden)
    probs: torch.Tensor | None = None
    hidden: list[torch.Tensor] = []
    for a in range(0, n, PREDICT_CHUNK):
        p, h = world.predict(model, weights[a : a + PREDICT_CHUNK], x, with_hidden=with_hidden)
        if probs is None:
            probs = p.new_empty((n, *p.shape[1:]))
        probs[a : a + len(p)] = p
        hidden.extend(h)
    assert probs is not None
    return probs, hidden


class PairedElitism:
    """Whether a student is better than a seed with confidence: on the world's acceptance
    scores (:meth:`World.acceptance_scores`, one per sample), the paired differences ``d``
    must have a positive mean of at least ``z`` standard errors (``z = 0``: any gain). A world
    without acceptance scores falls back to probe fitness, ``student > seed``. Each decision's
    figures are appended to ``log`` (gain, its z, samples that differ)."""

    def __init__(self, world: World, model: torch.nn.Module, z: float = 1.0):
        self.world, self.model, self.z = world, model, z
        self.log: list[dict[str, float]] = []

    def __call__(self, student: Student, seed: Seed) -> bool:
        a = self.world.acceptance_scores(self.model, student.weights)
        if a is None:
            ok = student.val > seed.val
            self.log.append({"gain": student.val - seed.val, "z": float("nan"), "differ": float("nan")})
            return ok
        b = self.world.acceptance_scores(self.model, seed.weights)
        gain, z, differ = paired_gain(a, b)
        ok = gain > 0 and z >= self.z
        self.log.append({"gain": gain, "z": z, "differ": differ})
        return ok


def paired_gain(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """Mean of ``a - b`` (per-sample scores of two models on the same samples), that mean in
    standard errors (inf when every difference is the same positive number) and how many
    samples differ."""
    d = (a - b).double()
    n = len(d)
    if n == 0:
        return 0.0, float("nan"), 0.0
    mean = float(d.mean())
    se = float(d.std(unbiased=True)) / n**0.5 if n > 1 else 0.0
    z = mean / se if se > 0 else (float("inf") if mean > 0 else 0.0)
    return mean, z, float((d != 0).sum())


def accept(
    state: RunState,
    evals: Evaluations,
    groups: list[TeacherGroup],
    students: list[Student],
    elitism: bool,
    judge: Callable[[Student, Seed], bool] | None = None,
) -> tuple[RunState, list[bool]]:
    """The next state: forks and students join the lineage; with ``elitism`` a student
    replaces its slot's seed only when ``judge(student, seed)`` says it is better (None:
    probe fitness at least the seed's); a merged student competes with the best seed and
    takes every slot."""
    lineage = state.lineage.copy()
    for v in evals.variants:
        lineage.add(v)
    seeds, generated, accepted = list(state.seeds), dict(state.generated), []
    for st in students:
        lineage.add(st.variant)
        if st.pool is not None:
            generated[st.slot] = st.pool
        rival = seeds[best_slot(seeds)] if st.merge else seeds[st.slot]
        ok = not elitism or (judge(st, rival) if judge is not None else st.val >= rival.val)
        if ok and st.merge:
            seeds = [Seed(st.variant, st.weights, st.val)] * len(seeds)
        elif ok:
            seeds[st.slot] = Seed(st.variant, st.weights, st.val)
        accepted.append(ok)
    teachers = evals.weights[list(groups[0].teachers)] if groups else state.teachers
    nxt = state.evolve(
        seeds=tuple(seeds), lineage=lineage, generation=state.generation + 1, generated=generated, teachers=teachers
    )
    return nxt, accepted


class _Clock:
    """Seconds per phase of one generation."""

    def __init__(self) -> None:
        self.started = self._t = time.perf_counter()
        self.secs: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.secs[name] = now - self._t
        self._t = now
