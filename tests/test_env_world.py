"""The environment world (gymnasium's CartPole): the numpy policy, a lifetime, a run end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from forkpop.population.models import mlp
from forkpop.workers.env_world import (
    NumpyPolicy,
    episode_seeds,
    live_env,
    make_env,
    probe_states,
    returns,
    softmax,
)

import forkpop

pytest.importorskip("gymnasium")

SMALL = [
    "run.generations=2",
    "data.n_niches=4",
    "population.size=4",
    "selection.k=2",
    "env.lifetime_steps=1500",
    "distill.steps=60",
    "env.accept_episodes=4",
    "env.report_episodes=3",
]


def test_the_numpy_policy_is_the_torch_model_and_its_gradient():
    torch.manual_seed(0)
    model = mlp(4, 2, (8,)).double()
    pol = NumpyPolicy(model).load(torch.nn.utils.parameters_to_vector(model.parameters()))
    x = torch.randn(7, 4, dtype=torch.float64)
    d = torch.randn(7, 2, dtype=torch.float64)
    out = model(x)
    assert np.allclose(pol.forward(x.numpy()), out.detach().numpy())
    (out * d).sum().backward()
    want = torch.cat([p.grad.ravel() for p in model.parameters()]).numpy()
    assert np.allclose(pol.grad(x.numpy(), d.numpy()), want)


def test_episode_seeds_of_selection_elitism_and_report_never_meet():
    sets = {s: set(episode_seeds(3, s, 50).tolist()) for s in ("probe", "accept", "test", "transfer")}
    names = list(sets)
    for i, a in enumerate(names):
        assert len(sets[a]) == 50
        for b in names[i + 1 :]:
            assert not sets[a] & sets[b]
    assert np.array_equal(episode_seeds(3, "test", 10), episode_seeds(3, "test", 10))


def _life(policy_m, lr=0.1, steps=5000, init_seed=0):
    env, limit = make_env("CartPole-v1")
    model = torch.nn.Linear(4, 2)
    pol, demo = NumpyPolicy(model), NumpyPolicy(model)
    rng = np.random.default_rng(init_seed)
    w = rng.normal(0, 0.1, pol.n)
    probe = probe_states(env, 64, 0, limit)
    return env, limit, pol, demo, w, live_env(pol, w, demo.load(w), env, steps, limit, policy_m, probe, rng, lr=lr)


def test_acting_learns_to_balance_and_the_lifetime_is_its_steps():
    env, limit, pol, _, w0, lt = _life(lambda s, rng: True)
    seeds = episode_seeds(0, "test", 5)
    before = returns(env, pol.load(w0), seeds, limit).mean()
    after = returns(env, pol.load(lt.weights), seeds, limit).mean()
    assert sum(lt.lengths) == 5000 and set(lt.modes) == {"B"} and lt.switches == 0
    assert after > before + 100, (before, after)
    # the same seeds, the same lifetime
    again = _life(lambda s, rng: True)[-1]
    assert np.array_equal(again.weights, lt.weights) and again.own_returns == lt.own_returns


def test_observing_imitates_the_seed():
    env, limit, pol, demo, w0, _ = _life(lambda s, rng: True)
    teacher = _life(lambda s, rng: True, init_seed=0)[-1].weights  # a balancing policy to watch
    demo.load(teacher)
    probe = probe_states(env, 256, 1, limit)
    rng = np.random.default_rng(5)
    lt = live_env(pol, w0, demo, env, 3000, limit, lambda s, rng: False, probe, rng, lr=0.05)
    agree = lambda w: float((softmax(pol.load(w).forward(probe)).argmax(1) == demo.forward(probe).argmax(1)).mean())  # noqa: E731
    assert set(lt.modes) == {"A"} and lt.own_returns == []
    assert agree(lt.weights) > agree(w0) and agree(lt.weights) > 0.8
    assert lt.signals[-1][2] > 0  # demo_gap: the seed's episodes outlast its own (none yet)


def _run(tmp_path, tracking_uri, *extra, backend="local"):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return forkpop.run(
            "cartpole", overrides=[*SMALL, f"run.run_dir={tmp_path}", *extra], backend=backend,
            tracking_uri=tracking_uri,
        )  # fmt: skip
    finally:
        os.chdir(cwd)


def test_a_cartpole_run_reports_returns_and_mode_traces(tmp_path, tracking_uri):
    from forkpop.experiments.tracking import artifact_jsons
    from mlflow import MlflowClient

    r = _run(tmp_path, tracking_uri)
    h = r.summary["history"]
    assert len(h) == 2
    for x in h:
        assert 0 <= x["median_return"] <= 500 and 0 <= x["seed_return"] <= 500
        assert x["seed_return"] == x["seed_test_accuracy"]  # the seed's return on the reported episodes
    world = json.loads(next(r.run_dir.rglob("world.json")).read_text())
    assert world["world"] == "env" and world["env"] == "CartPole-v1" and world["test_read_for_selection"] == 0
    client = MlflowClient(tracking_uri)
    run = client.get_run(r.summary["mlflow_run_id"])
    assert "env.median_return" in run.data.metrics and "env.seed_return" in run.data.metrics
    (tmp_path / "dl").mkdir()
    traces = artifact_jsons(client, run, "modes", str(tmp_path / "dl"))
    assert len(traces) == 2
    for t in traces.values():
        assert len(t) == 4  # every fork's modes, episode by episode
        for v in t.values():
            assert set(v["modes"]) <= {"A", "B"} and len(v["modes"]) == len(v["lengths"])
            assert sum(v["lengths"]) == 1500
    from forkpop.experiments.analysis import analyze

    report = analyze(r.summary["mlflow_run_id"], tmp_path / "report", tracking_uri, progress=False)
    assert (tmp_path / "report" / "env_returns.png").is_file() and (tmp_path / "report" / "modes_gen0001.png").is_file()
    assert "modes and spending, generation 1" in report.read_text()
    # one seed, one run
    (tmp_path / "again").mkdir()
    again = _run(tmp_path / "again", tracking_uri)
    assert [x["median_return"] for x in again.summary["history"]] == [x["median_return"] for x in h]
    assert again.summary["seed_test_accuracy"] == r.summary["seed_test_accuracy"]


@pytest.mark.ray
def test_a_cartpole_run_on_ray_workers(tmp_path, tracking_uri, ray_session):
    r = _run(tmp_path, tracking_uri, "run.generations=1", "env.policy=random", backend="ray")
    assert r.summary["generations"] == 1 and 0 <= r.summary["history"][0]["median_return"] <= 500
    (tmp_path / "local").mkdir()
    local = _run(tmp_path / "local", tracking_uri, "run.generations=1", "env.policy=random")
    assert local.summary["history"][0]["world"] == r.summary["history"][0]["world"]  # the same lifetimes


@pytest.mark.parametrize(
    ("setting", "named"), [("env.id=NoSuchEnv-v0", "env.id"), ("model.family=cnn", "model.family")]
)
def test_a_bad_environment_or_policy_is_one_line(tmp_path, setting, named):
    out = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "run", "cartpole", "--set", setting],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in out.stderr
