import random

import pytest
import torch
from forkpop.population import build_model, default_genome_spec, flat_weights
from forkpop.selection import (
    AGGREGATORS,
    accuracy_of,
    crossover_genomes,
    distill,
    inherit_genome,
    mutate_genome,
    select,
    student_init,
)
from forkpop.selection.aggregate import class_precision, class_reliability


def test_best_k_picks_the_fittest_best_first():
    assert select([0.1, 0.9, 0.5, 0.7], 2, "best", seed=0) == [1, 3]


def test_tournament_is_seeded_distinct_and_skips_diverged():
    f = [0.1, float("nan"), 0.5, 0.7, 0.3, 0.2, float("inf") * 0]
    a = select(f, 4, "tournament", seed=5)
    assert a == select(f, 4, "tournament", seed=5)
    assert len(set(a)) == 4 and 1 not in a and 6 not in a
    assert [f[i] for i in a] == sorted((f[i] for i in a), reverse=True)
    seen = {tuple(select(f, 2, "tournament", seed=s)) for s in range(20)}
    assert len(seen) > 1  # the seed matters


def test_select_caps_k_and_refuses_unknown_method():
    assert select([float("nan"), 0.2], 3, "best", seed=0) == [1]
    with pytest.raises(ValueError, match="unknown selection.method"):
        select([0.1], 1, "roulette", seed=0)


def test_deap_operators_leave_global_random_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    spec = default_genome_spec()
    mutate_genome(spec, spec.initial(), seed=1)
    assert random.random() == expected


def test_mutation_stays_in_bounds_and_is_seeded():
    spec = default_genome_spec()
    g0 = spec.initial()
    kids = [mutate_genome(spec, g0, seed=s, eta=1.0, indpb=1.0) for s in range(50)]
    assert kids[0] == mutate_genome(spec, g0, seed=0, eta=1.0, indpb=1.0)
    assert len({k for k in kids}) > 40
    for k in kids:
        for gene in spec.genes:
            assert gene.low <= k[gene.name] <= gene.high
    assert mutate_genome(spec, g0, seed=0, indpb=0.0) == g0


def test_crossover_and_inheritance():
    spec = default_genome_spec()
    rng = __import__("numpy").random.default_rng(0)
    a, b = spec.sample(rng), spec.sample(rng)
    c = crossover_genomes(spec, a, b, seed=3)
    for gene in spec.genes:
        assert gene.low <= c[gene.name] <= gene.high
    assert inherit_genome(spec, [a, b], [0.9, 0.8], "best", 0) == a
    assert inherit_genome(spec, [a, b], [0.9, 0.8], "choice", 0) in (a, b)


def test_aggregators_on_known_values():
    p = torch.tensor([[[0.9, 0.1]], [[0.8, 0.2]], [[0.0, 1.0]]])  # 3 teachers, 1 sample
    assert torch.allclose(AGGREGATORS["mean"](p), torch.tensor([[1.7 / 3, 1.3 / 3]]))
    assert torch.allclose(AGGREGATORS["median"](p), torch.tensor([[0.8, 0.2]]))
    # trimmed mean drops one low and one high value per coordinate: the median here
    assert torch.allclose(AGGREGATORS["trimmed_mean"](p, trim=0.34), torch.tensor([[0.8, 0.2]]))


def test_class_reliability_silences_a_teacher_outside_what_it_knows():
    y = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])  # teacher 1 calls everything 0
    w = class_precision(pred, y, 2)
    assert w[0, 0] > w[1, 0]
    probs = torch.tensor([[[0.1, 0.9]], [[1.0, 0.0]]])
    assert class_reliability(probs, w).argmax(1).item() == 1


def test_student_init_average_is_fitness_weighted():
    t = torch.tensor([[0.0, 0.0], [3.0, 6.0]])
    assert torch.allclose(student_init("average", t[0], t, [1.0, 2.0]), torch.tensor([2.0, 4.0]))
    assert torch.allclose(student_init("data_average", t[0], t, [1.0, 1.0], [3, 1]), torch.tensor([0.75, 1.5]))
    assert torch.equal(student_init("best", t[0], t, [1.0, 1.0]), t[0])


def test_distillation_makes_the_student_agree_with_its_teacher():
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    teacher = build_model("mlp", 6, 3, (16,), seed=1)
    tw = flat_weights(teacher)
    y_teacher = teacher(x).argmax(1)
    model = build_model("mlp", 6, 3, (16,), seed=2)
    init = flat_weights(model)
    before = accuracy_of(model, init, x, y_teacher)
    w, losses = distill(
        model, init, tw[None], [1.0], x, temperature=1.0, steps=300, lr=1e-2, generator=torch.Generator().manual_seed(0)
    )
    after = accuracy_of(model, w, x, y_teacher)
    assert after > 0.9 > before and losses[-1] < losses[0]


def test_nsga2_keeps_the_pareto_front_of_fitness_and_novelty():
    from forkpop.selection import select

    fit = [0.9, 0.8, 0.7, 0.6, float("nan"), 0.85]
    nov = [0.1, 0.5, 0.9, 0.2, 1.0, 0.05]
    # Non-dominated: 0 (best fit), 1, 2 (most novel). 5 and 3 are dominated by 0 and 1.
    got = select(fit, 3, "nsga2", seed=0, novelty=nov)
    assert sorted(got) == [0, 1, 2]
    assert 4 not in select(fit, 5, "nsga2", seed=0, novelty=nov)  # a diverged variant never
    assert select(fit, 3, "nsga2", seed=1, novelty=nov) == got
    with pytest.raises(ValueError, match="novelty"):
        select(fit, 3, "nsga2", seed=0)


def test_teachers_cluster_by_function_and_keep_their_slots():
    import numpy as np
    from forkpop.selection.species import assign_slots, cluster_by_function

    # Two tight groups {0, 1, 2} and {3, 4}, far apart.
    pts = np.array([0.0, 0.1, 0.2, 5.0, 5.1])
    d = np.abs(pts[:, None] - pts[None, :])
    assert cluster_by_function(d, 2) == [[0, 1, 2], [3, 4]]
    assert cluster_by_function(d, 1) == [[0, 1, 2, 3, 4]]
    assert len(cluster_by_function(d, 5)) == 5
    assert cluster_by_function(np.zeros((0, 0)), 3) == []
    # Members of cluster 0 came mostly from slot 1, of cluster 1 also from slot 1: the
    # larger cluster keeps slot 1, the other takes the first free slot.
    assert assign_slots([[0, 1, 2], [3, 4]], [1, 1, 0, 1, 1], 2) == [1, 0]


@pytest.mark.parametrize("hidden", [(16,), (12, 8)])
def test_the_written_out_mlp_distillation_equals_autograd(hidden, monkeypatch):
    """The ReLU-MLP loop (backward by hand, one flat Adam step) draws the same batches and
    makes the same student as the generic autograd loop, probe-based early stopping included."""
    import importlib

    d = importlib.import_module("forkpop.selection.distill")
    model = build_model("mlp", 8, 3, hidden, seed=0)
    w = flat_weights(model)
    teachers = torch.stack(
        [w + 0.3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    )
    g = torch.Generator().manual_seed(1)
    x, px = torch.rand(60, 8, generator=g), torch.rand(30, 8, generator=g)
    py = torch.randint(0, 3, (30,), generator=g)
    out = {}
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(d, "_relu_mlp_shapes", lambda m: None)
        for every in (0, 4):
            out[fast, every] = d.distill(
                model,
                w.clone(),  # the autograd loop trains the model's parameters in place, views of init
                teachers,
                [0.9, 0.8, 0.7],
                x,
                steps=12,
                lr=1e-3,
                batch_size=16,
                generator=torch.Generator().manual_seed(2),
                probe=(px, py),
                eval_every=every,
            )
    for every in (0, 4):
        (wf, lf), (ws, ls) = out[True, every], out[False, every]
        assert torch.allclose(wf, ws, atol=1e-5) and len(lf) == len(ls) == 12
        assert max(abs(a - b) for a, b in zip(lf, ls, strict=True)) < 1e-5
