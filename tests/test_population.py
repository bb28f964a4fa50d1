import math

import numpy as np
import pytest
import torch
from forkpop.population import (
    Gene,
    GenomeSpec,
    Lineage,
    Origin,
    Variant,
    build_model,
    default_genome_spec,
    flat_weights,
    load_flat_weights,
    perturb_weights,
)


def test_gene_unit_roundtrip_on_log_scale():
    g = Gene("lr", 1e-3, 1e-1, 1e-2, "log")
    assert g.to_unit(1e-2) == pytest.approx(0.5)
    assert g.from_unit(0.5) == pytest.approx(1e-2)
    assert g.from_unit(-3) == 1e-3 and g.from_unit(7) == 1e-1


def test_int_gene_rounds_and_stays_in_bounds():
    g = Gene("epochs", 1, 10, 3, "int")
    for u in np.linspace(0, 1, 23):
        v = g.from_unit(u)
        assert v == round(v) and 1 <= v <= 10


@pytest.mark.parametrize(
    "args, match",
    [
        (("x", 2.0, 1.0, 1.5), "low 2.0 > high 1.0"),
        (("x", 0.0, 1.0, 0.5, "log"), "low > 0"),
        (("x", 0, 1, 3), "init 3"),
    ],
)
def test_bad_gene_bounds_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        Gene(*args)


def test_genome_spec_sample_is_seeded_and_bounded():
    spec = default_genome_spec()
    a = spec.sample(np.random.default_rng(0))
    assert a == spec.sample(np.random.default_rng(0))
    for gene in spec.genes:
        assert gene.low <= a[gene.name] <= gene.high
    with pytest.raises(ValueError, match="duplicate"):
        GenomeSpec((gene, gene))


def _v(i, parents=(), gen=0, origin=Origin.FORK):
    return Variant(i, default_genome_spec().initial(), gen, origin, tuple(parents), 0)


def test_lineage_dag_and_roundtrip():
    lin = Lineage()
    lin.add(_v("s", origin=Origin.SEED))
    lin.add(_v("a", ["s"]))
    lin.add(_v("b", ["s"]))
    lin.add(_v("d", ["a", "b"], 1, Origin.DISTILL))
    assert lin.ancestors("d") == {"a", "b", "s"}
    assert {c.id for c in lin.children("s")} == {"a", "b"}
    assert sorted(lin.edges()) == [("a", "d"), ("b", "d"), ("s", "a"), ("s", "b")]
    back = Lineage.from_json(lin.to_json())
    assert back == lin and back["d"].parents == ("a", "b")
    with pytest.raises(ValueError, match="unknown parents"):
        lin.add(_v("x", ["nope"]))
    with pytest.raises(ValueError, match="already"):
        lin.add(_v("a", ["s"]))


def test_lineage_equality_ignores_birth_order_but_not_parents():
    a, b = Lineage(), Lineage()
    for v in [_v("s", origin=Origin.SEED), _v("x", ["s"]), _v("y", ["s"])]:
        a.add(v)
    for v in [_v("s", origin=Origin.SEED), _v("y", ["s"]), _v("x", ["s"])]:
        b.add(v)
    assert a == b
    c = Lineage()
    c.add(_v("s", origin=Origin.SEED))
    c.add(_v("x", ["s"]))
    c.add(_v("y", ["x"]))
    assert a != c


@pytest.mark.parametrize("family", ["mlp", "linear", "cnn"])
def test_model_families_build_deterministically(family):
    m1, m2 = build_model(family, 64, 10, (8,), seed=3), build_model(family, 64, 10, (8,), seed=3)
    assert torch.equal(flat_weights(m1), flat_weights(m2))
    assert m1(torch.zeros(5, 64)).shape == (5, 10)
    assert not torch.equal(flat_weights(m1), flat_weights(build_model(family, 64, 10, (8,), seed=4)))


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="model.family=.resnet. is neither one of"):
        build_model("resnet", 64, 10)


def test_flat_weights_roundtrip():
    m = build_model("mlp", 4, 3, (5,))
    w = torch.arange(flat_weights(m).numel(), dtype=torch.float32)
    assert torch.equal(flat_weights(load_flat_weights(m, w)), w)


def test_fork_noise_is_seeded_and_relative():
    w = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    a = perturb_weights(w, 0.1, torch.Generator().manual_seed(1))
    b = perturb_weights(w, 0.1, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    rms = float((a - w).pow(2).mean().sqrt())
    assert math.isclose(rms, 0.3, rel_tol=0.05)
    assert torch.equal(perturb_weights(w, 0.0, torch.Generator()), w)


@pytest.mark.parametrize("momentum, wd", [(0.0, 0.0), (0.9, 0.0), (0.8, 1e-3)])
def test_sgd_step_matches_torch_sgd(momentum, wd):
    from forkpop.population.optim import sgd_step

    a, b = build_model("mlp", 6, 3, (8,), seed=0), build_model("mlp", 6, 3, (8,), seed=0)
    opt = torch.optim.SGD(b.parameters(), lr=0.1, momentum=momentum, weight_decay=wd)
    params, bufs = list(a.parameters()), [None] * 4
    x, y = torch.randn(20, 6, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 3
    for _ in range(5):
        sgd_step(
            params, torch.autograd.grad(torch.nn.functional.cross_entropy(a(x), y), params), bufs, 0.1, momentum, wd
        )
        opt.zero_grad()
        torch.nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    assert torch.allclose(flat_weights(a), flat_weights(b), atol=1e-6)


def test_adam_step_matches_torch_adam():
    from forkpop.population.optim import AdamState, adam_step

    a, b = build_model("mlp", 6, 3, (8,), seed=0), build_model("mlp", 6, 3, (8,), seed=0)
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    params = list(a.parameters())
    state = AdamState(params)
    x, y = torch.randn(20, 6, generator=torch.Generator().manual_seed(1)), torch.arange(20) % 3
    for _ in range(7):
        adam_step(params, torch.autograd.grad(torch.nn.functional.cross_entropy(a(x), y), params), state, 1e-2)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
    assert torch.allclose(flat_weights(a), flat_weights(b), atol=1e-6)
