"""The label-budget world's ground: drifting streams, the oracle and the ledger of every label."""

import numpy as np
import pytest
from forkpop.workers import DataSpec, load_data
from forkpop.workers.budget import BudgetExhausted, LabelLedger, Oracle, budget_labels, drift_order


def test_a_drifting_stream_is_a_permutation_whose_phases_hold_their_own_classes():
    labels = np.repeat(np.arange(10), 30)
    rows = np.arange(len(labels))
    order = drift_order(labels, rows, 2, np.random.default_rng(0))
    assert sorted(order.tolist()) == rows.tolist()
    first, second = set(labels[order[:150]]), set(labels[order[150:]])
    assert len(first) == len(second) == 5 and not first & second  # some classes early, the others late
    again = drift_order(labels, rows, 2, np.random.default_rng(0))
    assert np.array_equal(order, again)  # seeded: the same stream
    other = drift_order(labels, rows, 2, np.random.default_rng(1))
    assert set(labels[other[:150]]) != first or not np.array_equal(order, other)  # another deal per niche
    mixed = drift_order(labels, rows, 2, np.random.default_rng(0), purity=0.5)
    assert len(set(labels[mixed[:150]])) == 10
    assert sorted(drift_order(labels, rows, 1, np.random.default_rng(0)).tolist()) == rows.tolist()
    with pytest.raises(ValueError, match="phases"):
        drift_order(labels, rows, 0, np.random.default_rng(0))


def test_the_oracle_is_the_only_path_to_a_label_and_never_pays_past_its_budget():
    data = load_data(DataSpec(n_niches=4, partition="iid", seed=0))
    stream = drift_order(data.y_pool, data.niches[0], 2, np.random.default_rng(0))
    ledger = LabelLedger()
    budget = budget_labels(0.05, len(stream))
    oracle = Oracle(data.y_pool, stream, budget, 0.01, np.random.default_rng(0), ledger, "v0")
    free = [t for t in range(len(stream)) if oracle.free(t) is not None]
    assert free == sorted(oracle.free_positions) and len(free) == max(1, round(0.01 * len(stream)))
    paid = [t for t in range(len(stream)) if t not in oracle.free_positions][:budget]
    got = [oracle.query(t) for t in paid]
    assert got == data.y_pool[stream[paid]].tolist()
    assert oracle.query(paid[0]) == got[0] and oracle.query(free[0]) == data.y_pool[stream[free[0]]]  # no payment
    with pytest.raises(BudgetExhausted, match="budget of"):
        oracle.query(paid[-1] + 1 if paid[-1] + 1 not in oracle.free_positions else paid[-1] + 2)
    assert oracle.spent == budget and oracle.left == 0 and oracle.spent_at == paid
    assert ledger.counts() == {"free": len(free), "query": budget, "validation": 0, "acceptance": 0}
    # every label handed out is in the ledger once, and only labels of the niche's own rows
    read = [row for _, _, row in ledger.entries]
    assert len(read) == len(set(read)) and set(read) <= set(stream.tolist())
    assert ledger.by_reader("query") == {"v0": budget}


def test_budgets_round_and_refuse_nonsense():
    assert budget_labels(0.05, 100) == 5 and budget_labels(0.1, 84) == 8 and budget_labels(0.001, 50) == 1
    assert budget_labels(0.0, 50) == 0
    with pytest.raises(ValueError):
        budget_labels(-0.1, 50)
    with pytest.raises(ValueError):
        LabelLedger().add("test", "report", [1])  # test labels are never a kind of read
