"""End to end on a real local Ray: actors host the variants, results equal the local backend."""

import pytest

from experiments.runner import PopulationRun
from experiments.tracking import lineage_from_mlflow
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray


def test_ray_run_matches_local_and_lineage_is_in_mlflow(tmp_path, ray_session):
    ray_run = PopulationRun(
        tiny_config(tmp_path / "r", run={"backend": "ray", "workers": 2}),
        tracking_uri=f"sqlite:///{tmp_path}/r.db",
        progress=False,
    )
    r = ray_run.run()
    local = PopulationRun(tiny_config(tmp_path / "l"), tracking_uri=f"sqlite:///{tmp_path}/l.db", progress=False).run()
    key = ["seed_val_accuracy", "seed_test_accuracy", "best_fitness", "teachers"]
    assert [[h[k] for k in key] for h in r.history] == [[h[k] for k in key] for h in local.history]
    assert lineage_from_mlflow(r.mlflow_run_id, f"sqlite:///{tmp_path}/r.db") == ray_run.lineage
    assert r.seconds["learn"] > 0


def test_ray_pool_places_groups_on_actors(ray_session):
    import torch

    from population import build_model, flat_weights
    from workers import DataSpec, ForkTask, LearnerSpec, ModelSpec
    from workers.ray_pool import RayPool

    pool = RayPool(LearnerSpec(DataSpec(n_niches=4), ModelSpec("mlp", (16,)), 16), n_workers=2)
    try:
        assert len(pool.node_ids()) == 2
        w0 = flat_weights(build_model("mlp", 64, 10, (16,)))
        g = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "epochs": 1, "fork_noise": 0.0}
        tasks = [ForkTask(f"v{i}", i, g, i) for i in range(5)]
        w, res = pool.learn(w0, tasks)
        assert w.shape == (5, w0.numel()) and [r.variant_id for r in res] == [t.variant_id for t in tasks]
        assert not torch.equal(w[0], w[1])
        assert len(pool.stats.worker_seconds) == 2
    finally:
        pool.close()


def test_actors_learn_as_batched_groups_sized_from_resources(ray_session):
    from population import build_model, flat_weights
    from workers import DataSpec, ForkTask, LearnerSpec, ModelSpec
    from workers.pool import VARIANTS_PER_CPU_WORKER
    from workers.ray_pool import RayPool

    spec = LearnerSpec(DataSpec(n_niches=4), ModelSpec("mlp", (16,)), 16)
    w0 = flat_weights(build_model("mlp", 64, 10, (16,)))
    g = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "epochs": 2, "fork_noise": 0.01}
    tasks = [ForkTask(f"v{i}", i, g, i, cost=1 + i) for i in range(6)]
    small = RayPool(spec, n_variants=8)  # too few variants to fill two cores: one actor
    try:
        assert small.n_workers == 1
        info = small.describe()
        assert [(d["engine"], d["device"]) for d in info] == [("stacked", "cpu")] and info[0]["peak_rss"] > 0
        w1, r1 = small.learn(w0, tasks)
    finally:
        small.close()
    big = RayPool(spec, n_variants=2 * VARIANTS_PER_CPU_WORKER)  # one per CPU Ray reports
    try:
        assert big.n_workers == 2
        w2, r2 = big.learn(w0, tasks)  # other groups, same variants: the same result
    finally:
        big.close()
    assert (w1 - w2).abs().max() < 1e-5
    for a, b in zip(r1, r2, strict=True):
        assert a.loss == pytest.approx(b.loss, abs=1e-5) and a.epoch_ends == b.epoch_ends
    assert [r.variant_id for r in r2] == [t.variant_id for t in tasks]
