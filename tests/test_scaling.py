"""Large populations: the pairwise diversity measures on a deterministic subsample, the same
figures as before where the population is small, and the generation's phases watched."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from forkpop.experiments import core
from forkpop.experiments.observers import DiversityProbe
from forkpop.population import Lineage, Origin, Variant, default_genome_spec
from forkpop.population.diversity import (
    PAIRWISE_CAP,
    cka_matrix,
    distance_to_seeds,
    functional_diversity,
    genotype_spread,
    js_matrix,
    linear_cka,
    novelty,
    pairwise_sample,
    weight_distances,
)
from forkpop.population.state import Evaluations, ForkPlan
from forkpop.selection.strategies import distances, novelty_of, teacher_distances

SPEC = default_genome_spec()


def _probs(n, m=30, c=4, seed=0):
    e = np.exp(np.random.default_rng(seed).normal(size=(n, m, c)))
    return e / e.sum(-1, keepdims=True)


def _js_reference(probs):  # the two-KL form, every ordered pair
    p = np.clip(probs, 1e-12, 1.0)
    out = np.zeros((len(p), len(p)))
    for i in range(len(p)):
        mix = 0.5 * (p[i][None] + p)
        kl_i = (p[i][None] * (np.log(p[i][None]) - np.log(mix))).sum(-1)
        kl_j = (p * (np.log(p) - np.log(mix))).sum(-1)
        out[i] = (0.5 * (kl_i + kl_j)).mean(-1)
    return out


def test_pairwise_sample_is_everyone_up_to_the_cap_then_a_fixed_draw():
    assert pairwise_sample(10, 16).tolist() == list(range(10))
    a = pairwise_sample(1000, 16, [3, 1])
    assert len(a) == len(set(a.tolist())) == 16 and a.tolist() == sorted(a.tolist()) and a.max() < 1000
    assert a.tolist() == pairwise_sample(1000, 16, [3, 1]).tolist()
    assert a.tolist() != pairwise_sample(1000, 16, [3, 2]).tolist()
    assert len(pairwise_sample(5000)) == PAIRWISE_CAP


def test_js_matrix_matches_the_two_kl_form():
    p = _probs(9)
    js = js_matrix(p)
    assert np.allclose(js, _js_reference(p), atol=1e-12) and np.allclose(js, js.T) and (np.diag(js) == 0).all()


def test_measures_over_a_subsample_are_those_of_the_subsample_and_per_variant_ones_of_all():
    p, y = _probs(12), np.random.default_rng(1).integers(0, 4, 30)
    rows = pairwise_sample(12, 5, 0)
    full, sub = functional_diversity(p, y, rows), functional_diversity(p[rows], y)
    for k in ("disagreement", "kl", "js"):
        assert full[k] == pytest.approx(sub[k])
    assert full["ambiguity"] == pytest.approx(functional_diversity(p, y)["ambiguity"])
    w = torch.randn(12, 6, dtype=torch.float64)
    d = weight_distances(w, torch.zeros(6), rows)
    assert d["weight_l2"] == pytest.approx(weight_distances(w[rows])["weight_l2"])
    assert d["weight_to_seed"] == pytest.approx(float(w.norm(dim=1).mean()))
    seeds, slots = torch.randn(2, 6, dtype=torch.float64), [i % 2 for i in range(12)]
    want = float((w - seeds[slots]).norm(dim=1).mean())
    assert distance_to_seeds(w, seeds, slots, chunk=5) == pytest.approx(want)
    genomes = [SPEC.initial().as_dict() | {"lr": 0.01 * (i + 1)} for i in range(12)]
    g_all, g_sub = genotype_spread(genomes, SPEC, rows), genotype_spread([genomes[i] for i in rows], SPEC)
    assert g_all["genome_distance"] == pytest.approx(g_sub["genome_distance"])
    assert g_all["gene_std.lr"] == pytest.approx(genotype_spread(genomes, SPEC)["gene_std.lr"])


def test_novelty_against_every_row_as_reference_is_the_full_novelty():
    p = _probs(8)
    assert np.allclose(novelty(p, np.arange(8)), novelty(p), atol=1e-12)
    ref = novelty(p, [0, 3, 5])
    js = _js_reference(p)
    assert ref[0] == pytest.approx((js[0, 3] + js[0, 5]) / 2) and ref[1] == pytest.approx(js[1, [0, 3, 5]].mean())


def test_cka_matrix_agrees_with_the_pairwise_definition():
    rng = np.random.default_rng(0)
    reps = [rng.normal(size=(20, 6)) for _ in range(4)]
    m = cka_matrix(reps)
    assert m[1, 2] == pytest.approx(linear_cka(reps[1], reps[2])) and np.allclose(m, m.T)
    narrow = rng.normal(size=(20, 3))
    mixed = cka_matrix([reps[0], narrow, reps[0]])  # widths differ
    assert mixed[0, 2] == pytest.approx(1) and mixed[0, 1] == pytest.approx(linear_cka(reps[0], narrow))


def _evals(n, dead=()):
    variants = tuple(Variant(f"g00-v{i:03d}", SPEC.initial(), 0, Origin.FORK, ("g00-seed",), i % 3) for i in range(n))
    plan = ForkPlan(variants, (0,) * n, tuple(range(n)))
    fitness = [float("nan") if i in dead else 0.5 + 0.01 * i for i in range(n)]
    live = [i for i in range(n) if i not in dead]
    probs = torch.from_numpy(_probs(n)).float()
    hid = [torch.randn(30, 5, generator=torch.Generator().manual_seed(i)) for i in range(n)]

    def predict(w, split):  # noqa: ANN001, ANN202
        return probs[live], [hid[i] for i in live]

    results = [SimpleNamespace(status="diverged" if i in dead else "ok") for i in range(n)]
    weights = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    return Evaluations(plan, weights, results, fitness, torch.zeros(1, 8), predict)


def test_the_diversity_probe_subsamples_above_its_cap_and_not_below():
    root = Variant("g00-seed", SPEC.initial(), 0, Origin.SEED)
    lin = Lineage()
    lin.add(root)
    ev = _evals(10, dead={4})
    for v in ev.variants:
        lin.add(v)
    world = SimpleNamespace(labels=lambda split: torch.zeros(30, dtype=torch.long))
    state = SimpleNamespace(run_seed=0, lineage=lin, seeds=[SimpleNamespace(variant=root)])
    r = SimpleNamespace(evals=ev, state=state, generation=0)
    small = DiversityProbe(world, SPEC).measure(r)
    assert small["diversity"]["pairwise_variants"] == 9
    assert "g00-v004" not in small["artifacts"]["diversity/gen-0000.json"]  # diverged: not measured
    big = DiversityProbe(world, SPEC, pairwise_cap=4).measure(r)
    d = big["diversity"]
    assert d["pairwise_variants"] == 4 and d["alive"] == 9
    matrix = json.loads(big["artifacts"]["diversity/gen-0000.json"])
    assert len(matrix["ids"]) == 4 and len(matrix["disagreement"]) == 4
    assert d["weight_to_seed"] == pytest.approx(small["diversity"]["weight_to_seed"])  # over all, either way
    assert d["ambiguity"] == pytest.approx(small["diversity"]["ambiguity"])
    assert DiversityProbe(world, SPEC, pairwise_cap=4).measure(r) == big  # the same draw again


def test_teacher_distances_and_novelty_are_those_of_the_full_matrix():
    ev = _evals(9, dead={2})
    js, nov = distances(ev)
    chosen = [5, 0, 7]
    assert np.allclose(teacher_distances(ev, chosen), js[np.ix_(chosen, chosen)], atol=1e-12)
    assert novelty_of(ev) == nov
    assert math.isnan(nov[2])


def test_phase_watchers_see_each_phase_open_and_close():
    seen = []
    core.PHASE_WATCHERS.append(lambda name, entering: seen.append((name, entering)))
    try:
        with core.phase("plan"):
            with core.phase("inner"):
                pass
        with pytest.raises(KeyError), core.phase("learn"):
            raise KeyError("x")
    finally:
        core.PHASE_WATCHERS.clear()
    assert seen == [
        ("plan", True), ("inner", True), ("inner", False), ("plan", False), ("learn", True), ("learn", False),
    ]  # fmt: skip
    with core.phase("unwatched"):  # nobody watching: nothing happens
        pass


def test_novelty_of_a_large_population_is_against_a_fixed_reference_sample():
    n = PAIRWISE_CAP + 44
    ev = _evals(n, dead={7})
    got = novelty_of(ev)
    assert math.isnan(got[7]) and novelty_of(ev) is got  # once per generation
    full = novelty(ev.probs("probe").double().numpy())
    live = [g for i, g in enumerate(got) if i != 7]
    assert np.abs(np.array(live) - full).max() < 0.02 * full.mean()  # an estimate of the same mean
    assert np.array_equal(novelty_of(_evals(n, dead={7})), got, equal_nan=True)  # the same draw again
