import numpy as np
import pytest
import torch
from forkpop.population import build_model, flat_weights
from forkpop.workers import (
    DataError,
    DataSpec,
    ForkTask,
    GroupLearner,
    LearnerSpec,
    ModelSpec,
    load_data,
    partition,
    stream_batches,
)
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def _labels(n=600, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partitions_cover_the_pool_once(method):
    y = _labels()
    parts = partition(y, method, 12, np.random.default_rng(0), alpha=0.5)
    flat = np.concatenate(parts)
    assert len(parts) == 12 and sorted(flat.tolist()) == list(range(len(y)))
    again = partition(y, method, 12, np.random.default_rng(0), alpha=0.5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_makes_skewed_niches():
    y = _labels(2000)

    def top_share(alpha):
        parts = partition(y, "dirichlet", 10, np.random.default_rng(1), alpha=alpha)
        return np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])

    assert top_share(0.1) > 0.5 > top_share(100.0)


def test_shards_give_few_labels_per_niche():
    y = np.repeat(np.arange(10), 50)
    parts = partition(y, "shards", 10, np.random.default_rng(0), shards_per_niche=2)
    assert all(len(np.unique(y[p])) <= 2 for p in parts)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="dirichlet", alpha=0.0), "alpha must be > 0"),
        (dict(method="dirichlet", alpha=0.01, min_size=60), "raise data.alpha"),
        (dict(method="zipf"), "unknown data.partition"),
        (dict(method="iid", n=0), "n_niches must be >= 1"),
    ],
)
def test_partition_errors_say_what_to_change(kwargs, match):
    n = kwargs.pop("n", 10)
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        partition(_labels(), method, n, np.random.default_rng(0), **kwargs)


def test_stream_batches_keep_order():
    b = stream_batches(np.arange(10), 4)
    assert [x.tolist() for x in b] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_digits_test_split_is_the_reference_split():
    d = load_digits()
    _, x_test, _, y_test = train_test_split(d.data, d.target, test_size=0.3, random_state=0, stratify=d.target)
    b = load_data(DataSpec(n_niches=16))
    assert np.allclose(b.x_test, x_test / 16.0) and np.array_equal(b.y_test, y_test)
    assert len(b.x_test) + len(b.x_val) + len(b.x_pool) == 1797
    assert sum(len(n) for n in b.niches) == len(b.x_pool)


def test_user_files_load_and_bad_ones_say_why(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)).astype(np.float32), rng.integers(0, 3, 300)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.savetxt(tmp_path / "d.csv", np.column_stack([x, y]), delimiter=",")
    for name in ("d.npz", "d.csv"):
        b = load_data(DataSpec(source="file", path=str(tmp_path / name), n_niches=4))
        assert b.n_features == 5 and b.n_classes == 3
    (tmp_path / "bad.csv").write_text("1,2,x\n")
    np.savez(tmp_path / "nox.npz", a=x)
    for name, match in [
        ("missing.npz", "not a readable file"),
        ("bad.csv", "could not be read"),
        ("nox.npz", "'x' and 'y'"),
    ]:
        with pytest.raises(DataError, match=match):
            load_data(DataSpec(source="file", path=str(tmp_path / name), n_niches=4))


def _learner():
    return GroupLearner(LearnerSpec(DataSpec(n_niches=8, alpha=0.5), ModelSpec("mlp", (32,)), batch_size=16))


def _seed_weights(learner):
    d = learner.data
    return flat_weights(build_model("mlp", d.n_features, d.n_classes, (32,), seed=0))


def test_learning_is_prequential():
    """With lr=0 nothing is learned, so prequential accuracy is the fixed model's on the stream."""
    lr_ = _learner()
    w0 = _seed_weights(lr_)
    task = ForkTask("v", 2, {"lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, "fork_noise": 0.0}, 0)
    w, (res,) = lr_.learn(w0, [task])
    model = build_model("mlp", lr_.data.n_features, lr_.data.n_classes, (32,), seed=0)
    niche = lr_.data.niches[2]
    with torch.no_grad():
        acc = float(
            (model(torch.from_numpy(lr_.data.x_pool[niche])).argmax(1).numpy() == lr_.data.y_pool[niche]).mean()
        )
    assert res.preq_accuracy[-1] == pytest.approx(acc)
    assert len(res.loss) == len(stream_batches(niche, 16)) and res.samples == len(niche)


def test_learning_improves_on_the_niche_and_is_deterministic():
    lr_ = _learner()
    w0 = _seed_weights(lr_)
    g = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-5, "epochs": 5, "fork_noise": 0.01}
    tasks = [ForkTask("a", 0, g, 7), ForkTask("b", 1, g, 8)]
    w1, r1 = lr_.learn(w0, tasks)
    w2, r2 = lr_.learn(w0, tasks)
    assert torch.equal(w1, w2) and [r.preq_accuracy for r in r1] == [r.preq_accuracy for r in r2]
    assert w1.shape == (2, w0.numel())
    assert all(r.status == "ok" and r.val_accuracy > 0.15 for r in r1)
    assert r1[0].preq_accuracy[-1] > r1[0].preq_accuracy[0] or r1[0].preq_accuracy[0] == 1.0


def test_a_diverging_variant_is_stopped_and_says_why():
    lr_ = _learner()
    g = {"lr": 1e3, "momentum": 0.99, "weight_decay": 0.0, "epochs": 10, "fork_noise": 0.0}
    _, (res,) = lr_.learn(_seed_weights(lr_), [ForkTask("boom", 0, g, 0)])
    assert res.status == "diverged" and ("non-finite" in res.reason or "exploded" in res.reason)
    assert np.isnan(res.val_accuracy)


def test_split_tasks_balances_cost_and_keeps_every_task_once():
    from forkpop.workers.learner import split_tasks

    costs = [100, 1, 1, 1, 50, 50, 2, 2]
    tasks = [ForkTask(f"v{i}", i, {}, i, c) for i, c in enumerate(costs)]
    groups = split_tasks(tasks, 2)
    assert sorted(t.variant_id for g in groups for t in g) == sorted(t.variant_id for t in tasks)
    loads = [sum(t.cost for t in g) for g in groups]
    assert max(loads) - min(loads) <= 3  # an equal-count split would give 154 vs 53
    assert all([t.variant_id for t in g] == sorted((t.variant_id for t in g), key=lambda s: int(s[1:])) for g in groups)
    assert split_tasks(tasks, 2) == groups and len(split_tasks(tasks[:1], 4)) == 1


def test_digits_read_from_the_shipped_file_equal_load_digits():
    from forkpop.workers.data import _load_digits

    x, y = _load_digits()
    d = load_digits()
    assert np.array_equal(x, (d.data / 16.0).astype(np.float32)) and np.array_equal(y, d.target)


def test_a_given_plan_rebuilds_the_same_bundle():
    from forkpop.workers.data import _BUNDLES

    spec = DataSpec(n_niches=5, alpha=1.0, seed=3)
    a = load_data(spec)
    _BUNDLES.clear()
    b = load_data(spec, a.plan)
    assert b.plan is a.plan
    assert np.array_equal(a.x_pool, b.x_pool) and all(
        np.array_equal(p, q) for p, q in zip(a.niches, b.niches, strict=True)
    )


def test_results_pack_into_flat_arrays_and_back():
    from forkpop.workers.learner import LearnResult, pack_results, unpack_results

    rs = [
        LearnResult("a", 0.5, [1.0, 0.5], [0.0, 0.5], [2], 32, 0.1),
        LearnResult("b", float("nan"), [], [], [], 0, 0.0, "diverged", "non-finite loss at step 0"),
        LearnResult("c", 0.25, [3.0], [1.0], [1, 1], 16, 0.2),
    ]
    back = unpack_results(pack_results(rs))
    assert [r.variant_id for r in back] == ["a", "b", "c"]
    assert back[0] == rs[0] and back[2] == rs[2]
    assert back[1].status == "diverged" and back[1].reason == rs[1].reason and np.isnan(back[1].val_accuracy)
    assert unpack_results(pack_results([])) == []


def test_workers_are_planned_from_the_clusters_resources():
    from forkpop.workers.pool import plan_workers

    spec = LearnerSpec(DataSpec(n_niches=4))
    assert plan_workers({"CPU": 8}, spec, n_variants=16) == (1, {"num_cpus": 1.0})
    assert plan_workers({"CPU": 8}, spec, n_variants=1024)[0] == 8
    assert plan_workers({"CPU": 8}, spec, n_variants=200)[0] == 3
    assert plan_workers({"CPU": 8}, LearnerSpec(DataSpec(), engine="loop"), n_variants=16)[0] == 8
    assert plan_workers({"CPU": 8}, spec, n_workers=5, n_variants=16)[0] == 5
    # More actors than the cluster has room for would wait for ever: the groups grow instead.
    assert plan_workers({"CPU": 2}, spec, n_workers=5, n_variants=16)[0] == 2
    assert plan_workers({"CPU": 4}, spec, n_workers=4, cpus_per_worker=2.0)[0] == 2
    # GPUs: one actor each, whatever the population; device=cpu leaves them alone.
    assert plan_workers({"CPU": 16, "GPU": 2}, spec, n_variants=16) == (2, {"num_cpus": 1.0, "num_gpus": 1.0})
    assert plan_workers({"CPU": 16, "GPU": 2}, spec, n_workers=4)[1]["num_gpus"] == 0.5
    cpu_only = LearnerSpec(DataSpec(), device="cpu")
    assert "num_gpus" not in plan_workers({"CPU": 16, "GPU": 2}, cpu_only, n_variants=16)[1]
    with pytest.raises(ValueError, match="reports no GPU"):
        plan_workers({"CPU": 4}, LearnerSpec(DataSpec(), device="cuda"))
