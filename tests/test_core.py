"""The generation core on its interfaces: strategies (ask/tell), screens, shared predictions,
elitism, and a world of our own that plugs in without touching the core."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from forkpop.experiments import core
from forkpop.experiments.observers import DiversityProbe, GenerationRecord, HeldOutReport
from forkpop.population.genome import default_genome_spec
from forkpop.population.models import flat_weights, load_flat_weights, predict_many
from forkpop.population.state import Evaluations, ForkPlan, RunState, Seed
from forkpop.population.variant import Origin, Variant
from forkpop.population.world import World
from forkpop.selection.distiller import Distiller, Student
from forkpop.selection.screens import agreement_screen, fitness_screen
from forkpop.selection.strategies import STRATEGIES, Species, StrategyError, TeacherGroup
from forkpop.workers.learner import ForkTask, LearnResult
from forkpop.workers.pool import LocalPool
from torch import nn

from forkpop.plugins import register, resolve

SPEC = default_genome_spec()


# -- a world of our own: two-dimensional Gaussian blobs, learned by a plain torch loop ----------


@dataclass(frozen=True)
class BlobSpec:
    """What the blob learner needs; ``learner`` names it (kind ``learners``)."""

    n_niches: int = 4
    seed: int = 0
    learner: str = "blobs"


def _blobs(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.tensor([[0.0, 2.0], [2.0, -1.0], [-2.0, -1.0]])
    return centres[y] + 0.8 * torch.randn(n, 2, generator=g), y


def _net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3))


class BlobLearner:
    """Forks the seed and learns each niche with full-batch gradient steps (no engine, no
    forkpop data module: only the world's own code)."""

    def __init__(self, spec: BlobSpec):
        self.x, self.y = _blobs(spec.seed, 400)
        self.val = _blobs(spec.seed + 1, 90)
        self.niches = [torch.arange(i, 400, spec.n_niches) for i in range(spec.n_niches)]
        self.model = _net()

    def describe(self) -> dict:
        return {"device": "cpu", "engine": "loop", "reason": "a test world"}

    def learn(self, seeds: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        out, results = [], []
        for t in tasks:
            seed = seeds[t.seed_index] if seeds.dim() == 2 else seeds
            g = torch.Generator().manual_seed(t.seed)
            w = seed + 0.01 * torch.randn(seed.shape, generator=g)
            load_flat_weights(self.model, w)
            idx = self.niches[t.niche]
            losses = []
            for _ in range(int(t.genome["epochs"])):
                loss = F.cross_entropy(self.model(self.x[idx]), self.y[idx])
                grads = torch.autograd.grad(loss, list(self.model.parameters()))
                with torch.no_grad():
                    for p, gr in zip(self.model.parameters(), grads, strict=True):
                        p -= 0.5 * gr
                losses.append(float(loss.detach()))
            with torch.no_grad():
                acc = float((self.model(self.val[0]).argmax(1) == self.val[1]).float().mean())
            out.append(flat_weights(self.model))
            results.append(LearnResult(t.variant_id, acc, losses, [acc] * len(losses), [len(losses)], len(idx)))
        return torch.stack(out), results


register("learners", "blobs", BlobLearner)


class BlobWorld(World):
    name = "blobs"

    def __init__(self, spec: BlobSpec = BlobSpec()):
        self.spec = spec
        x, y = _blobs(spec.seed, 400)
        self._x = {"transfer": x, "probe": _blobs(spec.seed + 1, 90)[0], "test": _blobs(spec.seed + 2, 300)[0]}
        self._y = {"transfer": y, "probe": _blobs(spec.seed + 1, 90)[1], "test": _blobs(spec.seed + 2, 300)[1]}

    @property
    def n_niches(self) -> int:
        return self.spec.n_niches

    def niche_size(self, niche: int) -> int:
        return len(range(niche, 400, self.spec.n_niches))

    def niche_rows(self, niche: int) -> np.ndarray:
        return np.arange(niche, 400, self.spec.n_niches)

    def build_model(self, seed: int = 0) -> nn.Module:
        return _net(seed)

    def learner_spec(self) -> BlobSpec:
        return self.spec

    def inputs(self, split: str) -> torch.Tensor:
        return self._x[split]

    def labels(self, split: str) -> torch.Tensor:
        return self._y[split]

    def predict(self, model, weights, x, with_hidden=False):  # noqa: ANN001, ANN201
        return predict_many(model, weights, x, with_hidden)

    def fitness(self, model: nn.Module, weights: torch.Tensor, split: str = "probe") -> float:
        return float(self.fitness_of(self.predict(model, weights[None], self._x[split])[0], split)[0])

    def fitness_of(self, probs: torch.Tensor, split: str = "probe") -> torch.Tensor:
        return (probs.argmax(-1) == self._y[split]).float().mean(-1)


def _blob_run(generations: int = 3, method: str = "best", species: int = 1) -> tuple[RunState, list]:
    world = BlobWorld()
    strategy = STRATEGIES[method](SPEC, 6, world.n_niches, k=3)
    if species > 1:
        strategy = Species(strategy, species, generations=generations)
    state = core.start(world, 0, SPEC.initial(), species)
    pool = LocalPool(world.learner_spec())
    seen: list = []
    probes = [HeldOutReport(world), DiversityProbe(world, SPEC)]

    def report(result: core.GenerationResult, t_next: float | None) -> None:
        for p in probes:
            result.figures.update(p.measure(result))
        seen.append((GenerationRecord.of(result, result.figures, ()), result))

    final = core.evolve(
        state,
        generations,
        world=world,
        strategy=strategy,
        pool=pool,
        screens={"fitness": lambda ev: fitness_screen(ev, 2.0)},
        distiller=Distiller(SPEC, steps=20, init="average"),
        elitism=True,
        report=report,
    )
    return final, seen


def test_a_world_of_our_own_runs_through_the_core_unchanged_and_deterministically():
    final, seen = _blob_run()
    assert final.generation == 3 and len(seen) == 3
    records = [r for r, _ in seen]
    assert all(r.best_fitness > 0.6 for r in records), [r.best_fitness for r in records]
    assert records[-1].seed_test_accuracy > 0.6
    assert "disagreement" in records[-1].diversity and records[-1].diversity["alive"] == 6
    # Each student descends from its teachers; the forks from the seed they were asked to fork.
    for _, res in seen:
        for st in res.students:
            assert set(st.variant.parents) <= {v.id for v in res.evals.variants}
            assert st.variant.origin is Origin.DISTILL
    again, seen2 = _blob_run()
    assert again.lineage.to_dict() == final.lineage.to_dict()
    assert [r.seed_test_accuracy for r, _ in seen2] == [r.seed_test_accuracy for r in records]
    assert torch.equal(again.seeds[0].weights, final.seeds[0].weights)


def test_species_give_each_cluster_its_own_seed_in_a_world_of_our_own():
    final, seen = _blob_run(generations=3, species=2)
    middle = seen[1][1]
    assert sorted(g.slot for g in middle.groups) == [0, 1]  # two clusters, one seed each
    assert all(g.name.endswith(f"seed{g.slot}") for g in middle.groups)
    last = seen[-1][1]
    assert len(last.groups) == 1 and last.groups[0].merge  # the last generation merges (merge_last)
    if last.accepted[0]:  # accepted, it is every slot's seed; refused, the species' seeds stay
        assert {s.variant.id for s in final.seeds} == {"g03-seed"}
    else:
        assert {s.variant.id for s in final.seeds} == {s.variant.id for s in last.before.seeds}


# -- strategies ---------------------------------------------------------------------------------


def _state(n_species: int = 1) -> RunState:
    root = Variant("g00-seed", SPEC.initial(), 0, Origin.SEED)
    from forkpop.population.lineage import Lineage

    lin = Lineage()
    lin.add(root)
    return RunState(0, (Seed(root, torch.zeros(5), 0.5),) * n_species, lin)


def _evals(plan: ForkPlan, fitness: list[float], calls: list | None = None) -> Evaluations:
    n = len(plan.variants)
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(n, 7, 3, generator=g), -1)

    def predict(w: torch.Tensor, split: str):  # noqa: ANN202
        if calls is not None:
            calls.append(split)
        rows = [i for i, f in enumerate(fitness) if math.isfinite(f)]
        return probs[rows], []

    return Evaluations(plan, torch.randn(n, 5, generator=g), [None] * n, fitness, torch.zeros(1, 5), predict)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_plans_forks_and_names_teachers_among_the_eligible(name):
    strategy = resolve("strategies", name)(SPEC, 8, 4, k=3, rotate_niches=1)
    state = _state()
    rng = state.rng()
    plan = strategy.ask(state, rng)
    assert [v.id for v in plan.variants] == [f"g00-v{i:03d}" for i in range(8)]
    assert [v.niche for v in plan.variants] == [i % 4 for i in range(8)]
    assert all(v.parents == ("g00-seed",) and v.origin is Origin.FORK for v in plan.variants)
    fitness = [0.1 * i for i in range(8)]
    fitness[2] = float("nan")  # diverged
    groups = strategy.tell(state, _evals(plan, fitness), {7}, rng)
    assert len(groups) == 1 and groups[0].name == "g01-seed"
    chosen = groups[0].members
    assert 2 not in chosen and 7 not in chosen and len(chosen) == len(set(chosen)) == 3
    assert list(chosen) == sorted(chosen, key=lambda i: -fitness[i])  # best first
    if name == "best":
        assert chosen == (6, 5, 4)
    # The same state and generator give the same plan and the same teachers.
    again = resolve("strategies", name)(SPEC, 8, 4, k=3, rotate_niches=1)
    rng2 = state.rng()
    plan2 = again.ask(state, rng2)
    assert plan2 == plan and again.tell(state, _evals(plan2, fitness), {7}, rng2) == groups


def test_ask_and_tell_keep_their_rhythm():
    strategy = STRATEGIES["best"](SPEC, 4, 4)
    state = _state()
    with pytest.raises(StrategyError, match="tell\\(\\) without ask\\(\\)"):
        strategy.tell(state, _evals(ForkPlan((), (), ()), []), set(), state.rng())
    strategy.ask(state, state.rng())
    with pytest.raises(StrategyError, match="ask\\(\\) twice"):
        strategy.ask(state, state.rng())


def test_predictions_are_made_once_per_split_and_shared():
    strategy = STRATEGIES["nsga2"](SPEC, 6, 3)
    state = _state()
    rng = state.rng()
    plan = strategy.ask(state, rng)
    calls: list = []
    ev = _evals(plan, [0.5, 0.6, 0.7, 0.4, 0.3, 0.8], calls)
    strategy.tell(state, ev, set(), rng)  # novelty reads the probe predictions
    agreement_screen(ev, [0, 1, 2, 3], 1.0)  # reads the transfer predictions
    agreement_screen(ev, [2, 3, 4], 1.0)
    ev.probs("probe", [1, 2])
    assert sorted(calls) == ["probe", "transfer"]


# -- screens and elitism ------------------------------------------------------------------------


def test_fitness_screen_flags_the_low_outliers_only():
    plan = STRATEGIES["best"](SPEC, 6, 3).ask(_state(), _state().rng())
    ev = _evals(plan, [0.9, 0.91, 0.89, 0.9, 0.2, float("nan")])
    assert fitness_screen(ev, 3.0) == {4}
    assert fitness_screen(ev, 0.0) == set()


def _student(slot: int, val: float, merge: bool = False, name: str = "g01-seed") -> Student:
    return Student(
        Variant(name, SPEC.initial(), 1, Origin.DISTILL, ("g00-v000",)), torch.full((5,), val), val, slot, merge
    )


def test_elitism_keeps_a_seed_at_least_as_fit_and_a_merged_student_takes_every_slot():
    state = _state(n_species=2)
    state = state.evolve(seeds=(state.seeds[0], Seed(state.seeds[0].variant, torch.ones(5), 0.8)))
    plan = STRATEGIES["best"](SPEC, 2, 2).ask(state, state.rng())
    ev = _evals(plan, [0.5, 0.6])
    groups = [TeacherGroup((1, 0), 0, "g01-seed0", teachers=(1, 0)), TeacherGroup((0,), 1, "g01-seed1")]
    students = [_student(0, 0.7, name="g01-seed0"), _student(1, 0.6, name="g01-seed1")]
    nxt, accepted = core.accept(state, ev, groups, students, elitism=True)
    assert accepted == [True, False]  # slot 0's seed was worse, slot 1's better
    assert nxt.seeds[0].variant.id == "g01-seed0" and nxt.seeds[1].val == 0.8
    assert nxt.generation == 1 and "g01-seed1" in nxt.lineage  # refused students are still born
    assert torch.equal(nxt.teachers, ev.weights[[1, 0]])
    assert state.generation == 0 and "g01-seed0" not in state.lineage  # the old state is unchanged
    merged, ok = core.accept(state, ev, groups[:1], [_student(0, 0.75, merge=True)], elitism=True)
    assert ok == [False]  # a merged student competes with the best seed (0.8)
    merged, ok = core.accept(state, ev, groups[:1], [_student(0, 0.85, merge=True)], elitism=True)
    assert ok == [True] and all(s.variant.id == "g01-seed" for s in merged.seeds)
    _, ok = core.accept(state, ev, groups[:1], [_student(0, 0.1, merge=True)], elitism=False)
    assert ok == [True]
