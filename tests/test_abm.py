"""One lifetime on a label-budget stream: the modes, the budget's timing, and what M sees."""

import numpy as np
import pytest
import torch
from forkpop.population import build_model, flat_weights
from forkpop.population.models import load_flat_weights
from forkpop.workers import DataSpec, load_data
from forkpop.workers.abm import POLICIES, SIGNALS, Controller, live
from forkpop.workers.budget import LabelLedger, Oracle, budget_labels, drift_order


@pytest.fixture(scope="module")
def world():
    data = load_data(DataSpec(n_niches=4, partition="iid", seed=0))
    stream = drift_order(data.y_pool, data.niches[0], 2, np.random.default_rng(0))
    return data, stream


def _live(world, policy, share=0.1, **kw):
    data, stream = world
    model = build_model("mlp", data.n_features, data.n_classes, (16,), seed=0)
    ledger = LabelLedger()
    oracle = Oracle(data.y_pool, stream, budget_labels(share, len(stream)), 0.01, np.random.default_rng(1), ledger, "v")
    probe = torch.from_numpy(data.x_val[:32])
    lt = live(
        model, flat_weights(model), torch.from_numpy(data.x_pool), oracle, policy, probe, np.random.default_rng(2), **kw
    )
    return lt, oracle, ledger, model


def test_the_fixed_policies_spend_as_they_say_and_every_label_is_in_the_ledger(world):
    _, stream = world
    a, oa, la, _ = _live(world, POLICIES["fixed_a"]())
    assert oa.spent == 0 and "B" not in a.modes and a.switches == 0
    g, og, lg, _ = _live(world, POLICIES["greedy_b"]())
    first_b = g.modes.index("B")
    assert og.spent == og.budget and all(m in "BF" for m in g.modes[first_b : first_b + og.budget])
    assert g.late_share() == 0.0 and g.switches == 1  # all of it at once, early
    p, op, lp, _ = _live(world, POLICIES["paced_b"]())
    assert op.spent == op.budget and 0.35 <= p.late_share() <= 0.65 and p.switches >= 2
    for lt, o, ledger in ((a, oa, la), (g, og, lg), (p, op, lp)):
        assert len(lt.modes) == len(stream) and o.spent <= o.budget
        assert ledger.counts()["query"] == o.spent == lt.modes.count("B")
        assert ledger.counts()["free"] == lt.modes.count("F") == len(o.free_positions)
        assert lt.spent_at == [t for t, m in enumerate(lt.modes) if m == "B"]


def test_m_is_genes_and_acts_on_its_signals(world):
    genome = {"m_bias": -1.0, "m_margin": -2.0, "m_budget_left": 2.0, "m_time": 0.5}
    m = Controller.from_genome(genome)
    assert m.weights == (-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.5) and m.bias == -1.0
    lt, o, _, _ = _live(world, m)
    assert lt.signals.shape == (len(lt.modes), len(SIGNALS)) and np.isfinite(lt.signals).all()
    assert ((lt.signals >= 0) & (lt.signals <= 1.0 + 1e-6)).all()
    assert 0 < o.spent <= o.budget
    # what M saw decides: fed its own signals in another order, it acts elsewhere
    shuffled = lt.signals[np.random.default_rng(3).permutation(len(lt.signals))]
    ls, _, _, _ = _live(world, m, fed_signals=shuffled)
    assert ls.spent_at != lt.spent_at
    again, _, _, _ = _live(world, m)
    assert torch.equal(again.weights, lt.weights) and again.modes == lt.modes  # seeded: the same lifetime
    with pytest.raises(ValueError, match="signals"):
        Controller((1.0, 2.0))


def test_m_paces_what_is_left_and_its_score_moves_it_ahead_or_behind(world):
    """All genes at 0: the first arrival bought, then the budget at an even pace; a high score
    buys at once (all of it early, as greedy-B), a low one holds back (nothing bought, as fixed-A)."""
    even, o, _, _ = _live(world, Controller.from_genome({}), share=0.2)
    assert o.spent == o.budget and 0.35 <= even.late_share() <= 0.65
    assert even.spent_at[0] == next(t for t, m in enumerate(even.modes) if m != "F")
    gaps = np.diff(even.spent_at)
    assert gaps.max() - gaps.min() <= 2  # evenly spaced, to an arrival or two (free labels)
    eager, oe, _, _ = _live(world, Controller.from_genome({"m_bias": 100.0}), share=0.2)
    assert oe.spent == oe.budget and eager.late_share() == 0.0
    assert eager.spent_at == [t for t, m in enumerate(eager.modes) if m != "F"][: oe.budget]  # as greedy-B
    ahead, oa, _, _ = _live(world, Controller.from_genome({"m_bias": 3.0}), share=0.2)
    assert oa.spent == oa.budget and ahead.spent_at[3] < even.spent_at[1]  # three labels ahead of the pace
    held, oh, _, _ = _live(world, Controller.from_genome({"m_bias": -1.5}), share=0.2)
    assert held.spent_at[0] > even.spent_at[0] and oh.spent < oh.budget
    never, on, _, _ = _live(world, Controller.from_genome({"m_bias": -100.0}), share=0.2)
    assert on.spent == 0 and never.switches == 0
    # paced-B's rule in genes: it waits past confident arrivals, up to one label behind the pace
    picky, op, _, _ = _live(world, Controller.from_genome({"m_margin": 2.0, "m_wait": -1.0}), share=0.2)
    margin = SIGNALS.index("margin")
    assert op.spent >= op.budget - 1
    assert picky.signals[picky.spent_at, margin].mean() < even.signals[even.spent_at, margin].mean()
    assert Controller.from_genome({"m_wait": -1.0}).wait == -1.0


def test_timing_matters_on_a_drifting_stream(world):
    """The same budget, spent all at once early or paced over the stream: the paced learner
    has seen every class and ends far better (the test split is only read here, to report)."""
    data, _ = world
    x_test, y_test = torch.from_numpy(data.x_test), data.y_test
    acc = {}
    for name in ("greedy_b", "paced_b"):
        lt, _, _, model = _live(world, POLICIES[name](), share=0.2)
        load_flat_weights(model, lt.weights)
        acc[name] = float((model(x_test).argmax(1).numpy() == y_test).mean())
    assert acc["paced_b"] > acc["greedy_b"] + 0.1, acc


def test_uncovered_says_whether_the_predicted_class_has_a_label_held(world):
    lt, o, _, model = _live(world, POLICIES["greedy_b"](), share=0.3)
    u = lt.signals[:, SIGNALS.index("uncovered")]
    assert u[0] == 1.0 and set(np.unique(u)) <= {0.0, 1.0}
    assert u[len(lt.modes) // 2 :].mean() < 1.0  # with labels held, some arrivals are predicted as a class held


def test_the_anchor_keeps_what_the_variant_knew_at_birth(world):
    """System A's consistency with its birth self: with the anchor on (1), the lifetime's end agrees
    more with its birth predictions on its stream than without (labels bought the same way)."""
    data, stream = world
    x = torch.from_numpy(data.x_pool)[torch.from_numpy(stream)]
    born = build_model("mlp", data.n_features, data.n_classes, (16,), seed=0)
    # a birth self that knows something: a few steps on the pool's own labels
    opt = torch.optim.SGD(born.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(born(torch.from_numpy(data.x_pool)), torch.from_numpy(data.y_pool)).backward()
        opt.step()
    w0 = flat_weights(born)
    with torch.no_grad():
        before = born(x).argmax(1)
    agree = {}
    for anchor in (0.0, 1.0):
        budget = budget_labels(0.1, len(stream))
        oracle = Oracle(data.y_pool, stream, budget, 0.01, np.random.default_rng(1), LabelLedger(), "v")
        lt = live(born, w0, torch.from_numpy(data.x_pool), oracle, POLICIES["paced_b"](),
                  torch.from_numpy(data.x_val[:32]), np.random.default_rng(2), lr=0.3, anchor=anchor)  # fmt: skip
        with torch.no_grad():
            agree[anchor] = float((load_flat_weights(born, lt.weights)(x).argmax(1) == before).float().mean())
    assert agree[1.0] > agree[0.0] + 0.08, agree  # measured: 0.83 vs 0.69


def test_the_bandit_paces_its_strategies_and_weighs_them_by_the_progress_they_bought(world):
    bandit = POLICIES["bandit"]()
    lt, o, ledger, _ = _live(world, bandit)
    assert o.budget - 1 <= o.spent <= o.budget and ledger.counts()["query"] == o.spent
    assert 0.3 <= lt.late_share() <= 0.7 and lt.switches >= 2  # paced, not greedy
    assert not np.allclose(bandit.w, 1.0)  # the purchases' progress moved the strategies' weights
    p = bandit.probs()
    assert abs(p.sum() - 1) < 1e-9 and (p >= bandit.gamma / len(p) - 1e-12).all()  # its exploration floor
    again, _, _, _ = _live(world, POLICIES["bandit"]())
    assert again.spent_at == lt.spent_at  # seeded: the same draws


def test_label_spreading_over_the_pool_learns_more_from_few_labels_than_the_classifier_that_bought_them(world):
    from forkpop.workers.budget import fit_reference, spread_labels

    data, _ = world
    held = np.random.default_rng(0).choice(len(data.y_pool), size=40, replace=False)
    lr = fit_reference(data.x_pool[held], data.y_pool[held])
    spread = spread_labels(data.x_pool, data.y_pool, held, data.x_val, fallback=lr)
    assert spread.shape == data.y_val.shape and set(np.unique(spread)) <= set(np.unique(data.y_pool[held]))
    assert (spread == data.y_val).mean() > (lr.predict(data.x_val) == data.y_val).mean() + 0.03


def test_a_linear_chain_s_written_out_step_is_autograd_s_and_a_lifetime_is_the_same_either_way(world, monkeypatch):
    from forkpop.workers import abm
    from torch import nn

    torch.manual_seed(0)
    for act in (nn.ReLU, nn.Tanh, nn.Sigmoid, lambda: nn.LeakyReLU(0.1)):
        a = nn.Sequential(nn.Linear(64, 24), act(), nn.Linear(24, 10))
        b = nn.Sequential(nn.Linear(64, 24), act(), nn.Linear(24, 10))
        b.load_state_dict(a.state_dict())
        xs, born = torch.randn(30, 64), torch.softmax(torch.randn(30, 10), 1)
        rows, by, w, seen = [4, 1, 7], torch.tensor([3, 1, 2]), torch.tensor([0.5, 1.0, 1.0]), np.array([0, 3, 9, 20])
        abm._autograd_step(a, list(a.parameters()), xs, rows, by, w, seen, born, 1.0, 0.1, True)
        with torch.no_grad():
            step = abm._ChainStep(abm.linear_chain(b))
            step(xs[torch.from_numpy(np.concatenate([rows, seen]))], by, w, 3, born[torch.from_numpy(seen)], 1.0, 0.1)
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6)
    # a whole lifetime: the chain's step and autograd's (a model that is no chain) agree
    fast, _, _, _ = _live(world, POLICIES["paced_b"](), anchor=1.0)
    monkeypatch.setattr(abm, "linear_chain", lambda m: None)  # every step through autograd
    slow, _, _, _ = _live(world, POLICIES["paced_b"](), anchor=1.0)
    assert fast.modes == slow.modes and fast.spent_at == slow.spent_at
    assert torch.allclose(fast.weights, slow.weights, atol=1e-4)


def test_system_a_lends_a_neighbour_s_label_only_within_reach(world):
    # never confident: every observed arrival takes a neighbour's label or teaches nothing
    never_near, _, _, _ = _live(world, POLICIES["paced_b"](), confident=2.0, neighbour=0.0)
    silent, _, _, _ = _live(world, POLICIES["paced_b"](), confident=2.0, observe_weight=0.0)
    lent, _, _, _ = _live(world, POLICIES["paced_b"](), confident=2.0)
    assert never_near.modes == silent.modes
    assert torch.allclose(never_near.weights, silent.weights, atol=1e-6)  # out of reach: no pseudo-label at all
    assert not torch.allclose(lent.weights, silent.weights, atol=1e-4)  # always lent: it learns from them
