"""Selection that earns its keep: the test split never decides, the niche strategy beats random
teachers, elitism refuses a worse student, the collapse alarm watches students and population,
and the online metrics say which data they are measured on."""

import dataclasses

import numpy as np
import pytest
import torch
from forkpop.experiments import core
from forkpop.experiments.observers import CollapseAlarm, GenerationRecord, Observer, falling
from forkpop.experiments.runner import PopulationRun
from forkpop.experiments.specs import classification_world
from forkpop.selection.distiller import Distiller
from forkpop.selection.strategies import STRATEGIES
from forkpop.workers.engine import online_accuracy

from tests.conftest import tiny_config

NICHE_RUN = {
    "run": {"generations": 3},
    "data": {"n_niches": 6, "alpha": 0.1},  # skewed niches: each holds labels few others have
    "population": {"size": 12, "genes": {"epochs": {"low": 1, "high": 10, "init": 5, "kind": "int"}}},
    "selection": {"method": "niche", "k": None},
    "distill": {"own_niche": 0.5, "steps": 60, "temperature": 2.0},
}


class _Keep(Observer):
    """Keeps every generation's result (for tests that look inside a run)."""

    def __init__(self):
        self.results = []

    def on_generation(self, result, record):
        self.results.append(result)


class _Run(PopulationRun):
    def __init__(self, *a, keep: _Keep, **kw):
        super().__init__(*a, **kw)
        self.keep = keep

    def observers(self, world, tracker, done):
        return [*super().observers(world, tracker, done)[:-1], self.keep, super().observers(world, tracker, done)[-1]]


def _decisions(results):
    """Everything selection and distillation decided, as plain values."""
    out = []
    for r in results:
        out.append(
            {
                "genomes": [v.genome.as_dict() for v in r.evals.variants],
                "fitness": list(r.evals.fitness),
                "teachers": [list(g.members) for g in r.groups],
                "students": [(st.variant.id, st.variant.parents, st.val) for st in r.students],
                "student_weights": [st.weights.clone() for st in r.students],
                "accepted": list(r.accepted),
                "acceptance": list(r.acceptance),
                "seeds": [s.variant.id for s in r.state.seeds],
            }
        )
    return out


def test_the_test_split_cannot_influence_selection_or_distillation(tmp_path):
    runs = []
    for shuffle in (False, True):
        cfg = tiny_config(tmp_path / str(shuffle), **NICHE_RUN)
        keep = _Keep()
        run = _Run(cfg, keep=keep, progress=False, tracking=False)
        run.load_data()
        if shuffle:  # other test labels, in place: the driver's world and the local workers share them
            y = run.world.data.y_test
            y[:] = np.random.default_rng(0).permutation(y)
        summary = run.run()
        if shuffle:  # the cached bundle would serve later tests: drop it (the source's labels are intact)
            from forkpop.workers.data import _BUNDLES

            _BUNDLES.clear()
        runs.append((summary, _decisions(keep.results)))
    (s0, d0), (s1, d1) = runs
    assert [h["seed_test_accuracy"] for h in s0.history] != [h["seed_test_accuracy"] for h in s1.history]
    for a, b in zip(d0, d1, strict=True):
        for k in a:
            if k == "student_weights":
                assert all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True))
            else:
                assert a[k] == b[k], k


def _final(tmp_path, method: str, k, partition: int) -> float:
    cfg = tiny_config(
        tmp_path / f"{method}{partition}",
        **{**NICHE_RUN, "data": {**NICHE_RUN["data"], "seed": partition}, "selection": {"method": method, "k": k}},
    )
    return PopulationRun(cfg, progress=False, tracking=False).run().seed_test_accuracy


def test_the_niche_strategy_beats_random_teachers_of_the_same_number(tmp_path):
    """Two variants per niche: the fitter of each teaches its niche; six drawn at random leave
    niches without their own teacher."""
    niche = [_final(tmp_path, "niche", None, p) for p in (0, 1)]
    rand = [_final(tmp_path, "random", 6, p) for p in (0, 1)]
    assert np.mean(niche) > np.mean(rand) + 0.03, (niche, rand)


def test_the_niche_strategy_takes_the_fittest_of_each_niche():
    from tests.test_core import SPEC, _evals, _state

    strat = STRATEGIES["niche"](SPEC, 6, 3)
    plan = strat.ask(_state(), _state().rng())
    assert [v.niche for v in plan.variants] == [0, 1, 2, 0, 1, 2]
    ev = _evals(plan, [0.5, 0.9, 0.2, 0.6, 0.8, float("nan")])
    (group,) = strat.tell(_state(), ev, {1}, _state().rng())  # variant 1 is screened
    assert group.members == (4, 3, 2)  # niche 0: 3 over 0; niche 1: 4 (1 screened); niche 2: 2 (5 died)
    rand = STRATEGIES["random"](SPEC, 6, 3, k=3)
    rand.ask(_state(), _state().rng())
    (g,) = rand.tell(_state(), ev, set(), _state().rng())
    assert len(g.members) == 3 and 5 not in g.members


def test_elitism_refuses_a_worse_student_and_a_tie_and_takes_a_better_one(tmp_path):
    cfg = tiny_config(tmp_path, run={"generations": 2})
    summary_run = PopulationRun(cfg, progress=False, tracking=False)
    summary_run.run()
    world = classification_world(cfg)
    model = world.build_model()
    good = summary_run.state.seeds[0]
    root = core.start(world, 0, good.variant.genome).seeds[0]  # the untrained root seed
    judge = core.PairedElitism(world, model, z=1.0)

    def student(seed):
        return core.Student(seed.variant, seed.weights, seed.val)

    assert not judge(student(root), good)  # worse: refused
    assert not judge(student(good), good)  # the same model: no gain, refused
    assert judge(student(good), root)  # better with confidence: taken
    assert judge.log[0]["gain"] < 0 and judge.log[1]["gain"] == 0 and judge.log[2]["z"] > 1
    # The evidence is the acceptance split, not the validation split that fitness reads.
    assert len(world.inputs("accept")) > 0
    assert not torch.equal(world.inputs("accept")[: len(world.inputs("probe"))], world.inputs("probe"))


def test_the_paired_gain_is_in_standard_errors():
    a = torch.tensor([1.0, 1.0, 1.0, 0.0])
    gain, z, differ = core.paired_gain(a, torch.tensor([0.0, 1.0, 1.0, 0.0]))
    assert gain == pytest.approx(0.25) and z == pytest.approx(1.0) and differ == 1
    assert core.paired_gain(a, a)[:2] == (0.0, 0.0)
    assert core.paired_gain(a + 1, a)[1] == float("inf")


def _rec(g, **kw):
    base = dict(
        generation=g, seed_id="s", seed_val_accuracy=0.9, seed_test_accuracy=0.9, best_fitness=0.9,
        mean_fitness=0.9, best_individual_test_accuracy=0.9, ensemble_test_accuracy=0.9,
        student_val_accuracy=0.9, student_accepted=True, diverged=0, teachers=[],
    )  # fmt: skip
    return GenerationRecord(**{**base, **kw})


def test_the_collapse_alarm_watches_the_student_and_the_population(tmp_path):
    assert falling([0.9, 0.8, 0.7], [1.0, 0.9, 0.8], 2)
    assert not falling([0.9, 0.8, 0.8], [1.0, 0.9, 0.8], 2)  # a plateau is not a fall
    assert not falling([0.9, 0.8], [1.0, 0.9], 2)  # too short
    assert not falling([0.9, 0.8, 0.7], [1.0, 0.9, 0.8], 0)  # off
    keep = _Keep()
    cfg = tiny_config(tmp_path, run={"generations": 2})
    _Run(cfg, keep=keep, progress=False, tracking=False).run()
    r = keep.results[-1]
    alarm = CollapseAlarm(classification_world(cfg), window=2)
    quiet = alarm.measure(r)
    assert not quiet["collapse_alarm"] and quiet["student_entropy"] > 0
    st = max(r.students, key=lambda s: s.val)
    # The accepted seed holds still (elitism), but the students have been getting worse and surer.
    r.history = (
        _rec(0, student_val_accuracy=st.val + 0.2, student_entropy=quiet["student_entropy"] + 1.0),
        _rec(1, student_val_accuracy=st.val + 0.1, student_entropy=quiet["student_entropy"] + 0.5),
    )
    loud = alarm.measure(r)
    assert loud["collapse_alarm"] and loud["collapse_of"] == "student"
    # The population's mean fitness and diversity falling raise it too.
    fit = float(np.nanmean(r.evals.fitness))
    div = r.figures["diversity"]["disagreement"]
    r.history = (
        _rec(0, mean_fitness=fit + 0.2, diversity={"disagreement": div + 0.2}),
        _rec(1, mean_fitness=fit + 0.1, diversity={"disagreement": div + 0.1}),
    )
    assert CollapseAlarm(classification_world(cfg), window=2).measure(r)["collapse_of"] == "population"


def test_preq_accuracy_is_the_first_pass_and_train_accuracy_the_later_ones():
    hits = np.array([1, 2, 3, 4, 4, 4])  # batches of 4, two batches a pass
    sizes = np.full(6, 4)
    preq, train = online_accuracy(hits, sizes, 2)
    assert preq == [0.25, 0.375]  # running over the first pass
    assert train == [0.75, 0.875, 1.0, 1.0]  # running within passes 2 and 3
    assert online_accuracy(hits[:1], sizes[:1], 2) == ([0.25], [])


class Collapsing(Distiller):
    """A distiller built to collapse: each generation its student leans harder on class 0 (its
    output bias grows), so it grows surer and more wrong, as a self-consuming population does."""

    def __call__(self, world, model, state, group, evals, rng):
        st = super().__call__(world, model, state, group, evals, rng)
        w = st.weights.clone()
        w[-world.n_classes] += 3.0 * (state.generation + 1)  # the last layer's bias of class 0
        return dataclasses.replace(st, weights=w, val=world.fitness(model, w))


def test_the_collapse_alarm_fires_on_a_run_built_to_collapse_and_not_on_a_healthy_one(tmp_path):
    common = {"run": {"generations": 4}, "tracking": {"collapse_window": 2}}
    bad = tiny_config(
        tmp_path / "bad", **common, distill={"method": "tests.test_natural_selection:Collapsing", "steps": 30}
    )
    s = PopulationRun(bad, progress=False, tracking=False).run()
    alarms = [h["collapse_alarm"] for h in s.history]
    assert alarms[:2] == [False, False] and all(alarms[2:]), [
        (h["student_val_accuracy"], h["student_entropy"]) for h in s.history
    ]
    assert "student" in s.history[-1]["collapse_of"]
    # Elitism refused every collapsing student after the first: the seed alone would not have told.
    assert not any(h["student_accepted"] for h in s.history[1:])
    good = PopulationRun(tiny_config(tmp_path / "good", **common), progress=False, tracking=False).run()
    assert not any(h["collapse_alarm"] for h in good.history)
