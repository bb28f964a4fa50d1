"""End to end on a real local Ray: actors host the variants, results equal the local backend."""

import pytest
from forkpop.experiments.runner import PopulationRun
from forkpop.experiments.tracking import lineage_from_mlflow

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
    from forkpop.population import build_model, flat_weights
    from forkpop.workers import DataSpec, ForkTask, LearnerSpec, ModelSpec
    from forkpop.workers.ray_pool import RayPool

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
    from forkpop.population import build_model, flat_weights
    from forkpop.workers import DataSpec, ForkTask, LearnerSpec, ModelSpec
    from forkpop.workers.pool import VARIANTS_PER_CPU_WORKER
    from forkpop.workers.ray_pool import RayPool

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


def _metric_points(uri, run_id):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_run(run_id).info.experiment_id
    points = set()
    for r in c.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'", max_results=5000):
        vid = r.data.tags["forkpop.variant_id"]
        for key in r.data.metrics:
            if key == "learn_seconds":  # a timing, not a result
                continue
            for m in c.get_metric_history(r.info.run_id, key):
                points.add((vid, r.data.tags["forkpop.generation"], key, m.step, round(m.value, 6)))
    return points


def _chaos_submit(monkeypatch, victims):
    """After each generation is submitted, SIGKILL one of the pool's actors (chosen by a seeded RNG)."""
    import os
    import random
    import signal

    import ray
    from forkpop.workers.ray_pool import RayPool

    orig = RayPool.submit
    rng = random.Random(0)

    def chaotic(self, seed, tasks):
        victim = rng.choice(self.actors)
        pid = ray.get(victim.pid.remote())
        handle = orig(self, seed, tasks)
        os.kill(pid, signal.SIGKILL)
        victims.append(pid)
        return handle

    monkeypatch.setattr(RayPool, "submit", chaotic)


@pytest.mark.chaos
def test_killing_an_actor_every_generation_loses_nothing(tmp_path, ray_session, monkeypatch):
    def run(name, **run_opts):
        cfg = tiny_config(tmp_path / name, run={"backend": "ray", "workers": 2, "generations": 5, **run_opts})
        uri = f"sqlite:///{tmp_path}/{name}.db"
        r = PopulationRun(cfg, tracking_uri=uri, progress=False)
        return r, r.run(), uri

    calm, calm_s, calm_uri = run("calm")
    victims: list[int] = []
    _chaos_submit(monkeypatch, victims)
    wild, wild_s, wild_uri = run("wild")
    assert len(victims) == 5
    assert lineage_from_mlflow(wild_s.mlflow_run_id, wild_uri) == wild.lineage == calm.lineage
    assert _metric_points(wild_uri, wild_s.mlflow_run_id) == _metric_points(calm_uri, calm_s.mlflow_run_id)
    assert [h["diverged"] for h in wild_s.history] == [0] * 5


@pytest.mark.chaos
def test_a_group_whose_worker_keeps_dying_is_recorded_as_failed(tmp_path, ray_session, monkeypatch):
    victims: list[int] = []
    _chaos_submit(monkeypatch, victims)
    cfg = tiny_config(tmp_path, run={"backend": "ray", "workers": 2, "generations": 1, "retries": 0})
    r = PopulationRun(cfg, tracking_uri=f"sqlite:///{tmp_path}/m.db", progress=False)
    s = r.run()
    h = s.history[0]
    assert 0 < h["diverged"] < 6  # one of the two groups failed, the other finished
    from mlflow import MlflowClient

    kids = MlflowClient(f"sqlite:///{tmp_path}/m.db").search_runs(
        ["1"], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}' and tags.`forkpop.status` = 'failed'"
    )
    assert len(kids) == h["diverged"] and all("worker lost" in k.data.tags["forkpop.reason"] for k in kids)
    assert not set(h["teachers"]) & {k.data.tags["forkpop.variant_id"] for k in kids}
