"""Diversity measures on cases whose answers are known."""

import math

import numpy as np
import pytest
import torch
from forkpop.population import Genome, Lineage, Origin, Variant, default_genome_spec
from forkpop.population.diversity import (
    cka_matrix,
    disagreement_matrix,
    ensemble_ambiguity,
    functional_diversity,
    genotype_spread,
    js_matrix,
    kl_matrix,
    lineage_stats,
    linear_cka,
    novelty,
    representation_similarity,
    weight_distances,
)


def _probs(n=4, m=50, c=5, seed=0):
    logits = np.random.default_rng(seed).normal(size=(n, m, c))
    e = np.exp(logits)
    return e / e.sum(-1, keepdims=True)


def test_identical_models_have_zero_distance_and_disagreement():
    p = np.repeat(_probs(1), 5, axis=0)
    f = functional_diversity(p, np.zeros(p.shape[1], dtype=int))
    assert f["disagreement"] == 0 and f["kl"] == pytest.approx(0, abs=1e-12) and f["js"] == pytest.approx(0, abs=1e-12)
    assert f["ambiguity"] == pytest.approx(0, abs=1e-12) and f["ambiguity_accuracy"] == 0
    assert np.allclose(novelty(p), 0)
    w = torch.randn(1, 30).repeat(4, 1)
    d = weight_distances(w, w[0])
    assert d["weight_l2"] == pytest.approx(0, abs=1e-9) and d["weight_cosine"] == pytest.approx(0, abs=1e-9)
    assert d["weight_to_seed"] == pytest.approx(0, abs=1e-9)
    spec = default_genome_spec()
    g = spec.initial().as_dict()
    s = genotype_spread([g, g, g], spec)
    assert s["genome_distance"] == 0 and all(abs(v) < 1e-12 for k, v in s.items() if k.startswith("gene_std."))


def test_known_distances():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    d = weight_distances(w, torch.zeros(2))
    # pairs: (0,1) sqrt2, (0,2) 2, (1,2) sqrt2; cosine distances 1, 2, 1
    assert d["weight_l2"] == pytest.approx((2 * math.sqrt(2) + 2) / 3)
    assert d["weight_cosine"] == pytest.approx(4 / 3)
    assert d["weight_to_seed"] == pytest.approx(1.0)
    # Two one-hot predictors that always disagree: disagreement 1, JS = ln 2.
    a = np.zeros((2, 3, 2))
    a[0, :, 0] = 1
    a[1, :, 1] = 1
    assert disagreement_matrix(a)[0, 1] == 1
    assert js_matrix(a)[0, 1] == pytest.approx(math.log(2), rel=1e-6)
    p = _probs(3)
    k = kl_matrix(p)
    manual = np.mean(np.sum(p[0] * (np.log(p[0]) - np.log(p[1])), -1))
    assert k[0, 1] == pytest.approx(manual) and np.allclose(np.diag(k), 0, atol=1e-12)
    # A vote of three where each member is right on a different two thirds: ensemble 100%.
    y = np.array([0, 0, 0])
    votes = np.full((3, 3, 2), 0.1)
    for i in range(3):
        votes[i, :, 0] = 0.9
        votes[i, i, 0], votes[i, i, 1] = 0.4, 0.6
    amb = ensemble_ambiguity(votes, y)
    assert amb["ambiguity_accuracy"] == pytest.approx(1 - 2 / 3) and amb["ambiguity"] > 0


def test_genotype_spread_in_each_genes_own_scale():
    spec = default_genome_spec()
    lo = {g.name: g.low for g in spec.genes}
    hi = {g.name: g.high for g in spec.genes}
    s = genotype_spread([lo, hi], spec)
    assert all(v == pytest.approx(0.5) for k, v in s.items() if k.startswith("gene_std."))
    assert s["genome_distance"] == pytest.approx(math.sqrt(len(spec.genes)))


def test_cka_of_a_representation_with_itself_is_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8))
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert linear_cka(x, x) == pytest.approx(1)
    assert linear_cka(x, 3 * x @ q) == pytest.approx(1)  # invariant to rotation and scale
    assert linear_cka(x, rng.normal(size=(100, 8))) < 0.3
    m = cka_matrix([x, x, rng.normal(size=(100, 4))])
    assert m[0, 1] == pytest.approx(1) and m[0, 2] < 0.3 and np.allclose(m, m.T)
    assert representation_similarity([x, x])["cka"] == pytest.approx(1)


def _known_tree() -> Lineage:
    """Seed -> 4 forks (g0); g1 seed from teachers f0,f1; 4 forks; g2 seed from g1 forks a,b."""
    lin = Lineage()
    g = Genome({"lr": 0.1})
    lin.add(Variant("s0", g, 0, Origin.SEED))
    for i in range(4):
        lin.add(Variant(f"g0f{i}", g, 0, Origin.FORK, ("s0",), i))
    lin.add(Variant("s1", g, 1, Origin.DISTILL, ("g0f0", "g0f1")))
    for i in range(4):
        lin.add(Variant(f"g1f{i}", g, 1, Origin.FORK, ("s1",), i))
    lin.add(Variant("s2", g, 2, Origin.DISTILL, ("g1f0", "g1f1", "g1f2")))
    lin.add(Variant("g2f0", g, 2, Origin.FORK, ("s2",), 0))
    lin.add(Variant("g2f1", g, 2, Origin.FORK, ("s1",), 1))  # the old seed carried on for one
    return lin


def test_lineage_statistics_of_a_known_tree():
    lin = _known_tree()
    g0 = lineage_stats(lin, 0)
    assert g0 == {"founders_alive": 4.0, "effective_parents": 1.0, "depth": 1.0, "tmrca": 0.0}
    g1 = lineage_stats(lin, 1)
    # All four forks come from s1, whose teachers are f0 and f1: two founders, two parents.
    assert g1["founders_alive"] == 2 and g1["effective_parents"] == pytest.approx(2)
    assert g1["depth"] == 3 and g1["tmrca"] == 0  # s0 -> g0f0 -> s1 -> g1f*; MRCA s1 (gen 1)
    g2 = lineage_stats(lin, 2)
    # g2f0 (via s2: g1f0..2 a third each) and g2f1 (via s1: g0f0, g0f1 a half each):
    # shares 1/6, 1/6, 1/6, 1/4, 1/4 of 1 -> inverse Simpson = 1 / (3/36 + 2/16)
    assert g2["effective_parents"] == pytest.approx(1 / (3 / 36 + 2 / 16))
    assert g2["founders_alive"] == 2 and g2["depth"] == 5
    assert g2["tmrca"] == 1  # the two forks meet at s1, generation 1
    assert lineage_stats(lin, 7) == {}
