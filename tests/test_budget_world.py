"""The label-budget world end to end: a run whose variants buy labels, and MLflow holds every count."""

import json
import os

import pytest
import torch
from forkpop.experiments.tracking import artifact_jsons, table_rows

import forkpop

OVERRIDES = ["run.generations=2", "data.n_niches=4", "population.size=4", "selection.k=2", "distill.steps=20"]


def _run(tmp_path, tracking_uri, *extra):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        return forkpop.run(
            "abm", overrides=[*OVERRIDES, f"run.run_dir={tmp_path}", *extra], backend="local", tracking_uri=tracking_uri
        )
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("policy", ["evolved", "fixed_a", "greedy_b", "shuffled_m"])
def test_a_budget_run_buys_within_its_budget_and_records_every_label(tmp_path, tracking_uri, policy):
    from mlflow import MlflowClient

    r = _run(tmp_path, tracking_uri, f"budget.policy={policy}")
    assert r.summary["generations"] == 2 and 0.0 <= r.summary["seed_test_accuracy"] <= 1.0
    world = json.loads(next(r.run_dir.rglob("world.json")).read_text())
    assert world["world"] == "budget" and world["budget"]["policy"] == policy
    assert world["labels"]["validation"] > 0 and world["labels"]["test_read_for_selection"] == 0
    client = MlflowClient(tracking_uri)
    (tmp_path / "dl").mkdir()
    run = client.get_run(r.summary["mlflow_run_id"])
    rows = [
        row
        for row in table_rows(artifact_jsons(client, run, "variants", str(tmp_path / "dl")).values())
        if row["origin"] == "fork"
    ]
    assert len(rows) == 2 * 4  # every fork of both generations, with its label counts in MLflow
    for row in rows:
        assert 0 <= row["budget.labels_bought"] <= row["budget.budget"]
        assert row["budget.labels_free"] >= 1 and 0 <= row["budget.late_share"] <= 1
        # the control's first lifetime (which makes the signals it shuffles) reads labels too, counted apart
        control = row["budget.labels_control"]
        most = row["budget.budget"] + row["budget.labels_free"]
        assert (1 <= control <= most) if policy == "shuffled_m" else control == 0
    bought = [row["budget.labels_bought"] for row in rows]
    if policy == "fixed_a":
        assert bought == [0] * len(rows)
    if policy == "greedy_b":
        assert all(row["budget.labels_bought"] == row["budget.budget"] for row in rows)
        assert all(row["budget.late_share"] == 0 for row in rows)


@pytest.mark.ray
def test_a_budget_run_on_ray_workers_is_the_local_one(tmp_path, tracking_uri, ray_session):
    (tmp_path / "local").mkdir()
    local = _run(tmp_path / "local", tracking_uri, "run.generations=1")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        remote = forkpop.run(
            "abm", overrides=[*OVERRIDES, f"run.run_dir={tmp_path}", "run.generations=1"], backend="ray",
            tracking_uri=tracking_uri,
        )  # fmt: skip
    finally:
        os.chdir(cwd)
    assert remote.summary["seed_test_accuracy"] == local.summary["seed_test_accuracy"]
    assert remote.summary["history"][0]["world"] == local.summary["history"][0]["world"]


def test_a_bad_budget_policy_is_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "run", "abm", "--set", "budget.policy=greedy"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "budget.policy" in out.stderr


def test_a_study_with_no_jobs_is_one_line(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "study", "abm", "--out", str(tmp_path / "s"), "--jobs", "0"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "--jobs" in out.stderr
    assert not (tmp_path / "s").exists()


def test_the_abm_study_smoke_writes_its_table(tmp_path, tracking_uri):
    """`forkpop study abm` on one partition, one generation, 4 variants: the issue's study.json,
    its runs two at a time in their own processes, every one of them in the one MLflow store."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "study", "abm", "--out", str(tmp_path / "abm"),
         "--partitions", "0", "--quiet", "--tracking-uri", tracking_uri, "--jobs", "2",
         *[a for s in ["run.generations=1", "data.n_niches=4", "population.size=4", "selection.k=2",
                       "distill.steps=10", f"run.run_dir={tmp_path}"] for a in ("--set", s)]],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    study = json.loads((tmp_path / "abm" / "study.json").read_text())
    policies = {"fixed_a", "greedy_b", "paced_b", "random", "bandit", "evolved_m", "shuffled_m"}
    assert set(study["budgets"]) == {"0.05", "0.1"}
    for b in ("0.05", "0.1"):
        assert set(study["budgets"][b]) == policies
        assert all(len(v) == 1 and 0 <= v[0] <= 1 for v in study["budgets"][b].values())
        assert 0 <= study["late_budget_share"][b] <= 1 and study["switches_median"][b] >= 0
        assert 0.5 < study["pooled_reference"][b] <= 1 and 0.5 < study["pooled_reference_logistic"][b] <= 1
    assert len(study["runs"]) == 14 and all(r["mlflow_run_id"] for r in study["runs"]) and study["jobs"] == 2
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    for r in study["runs"]:  # written by two processes into one SQLite store: none lost
        got = client.get_run(r["mlflow_run_id"])
        assert got.info.status == "FINISHED" and got.data.params["budget.share"] == str(r["budget"])
    assert "| 0.1 | pooled reference |" in out.stdout


def test_mode_traces_are_recorded_and_plotted(tmp_path, tracking_uri):
    """Each fork's mode at every arrival and where it spent, in MLflow (artifact modes/), and
    `forkpop analyze`'s plots of them."""
    from forkpop.experiments.analysis import analyze
    from mlflow import MlflowClient

    r = _run(tmp_path, tracking_uri, "budget.policy=paced_b")
    client = MlflowClient(tracking_uri)
    run = client.get_run(r.summary["mlflow_run_id"])
    (tmp_path / "dl").mkdir()
    traces = artifact_jsons(client, run, "modes", str(tmp_path / "dl"))
    assert sorted(traces) == ["gen-0000.json", "gen-0001.json"]
    for gen in traces.values():
        assert len(gen) == 4
        for t in gen.values():
            assert set(t["modes"]) <= set("ABF") and len(t["spent_at"]) <= t["budget"]
            assert [i for i, m in enumerate(t["modes"]) if m == "B"] == t["spent_at"]
    report = analyze(r.summary["mlflow_run_id"], tmp_path / "report", tracking_uri, progress=False)
    assert (tmp_path / "report" / "modes_gen0000.png").stat().st_size > 5000
    assert (tmp_path / "report" / "modes_gen0001.png").is_file()
    assert (tmp_path / "report" / "budget_lifetimes.png").is_file()
    assert "modes and spending, generation 1" in report.read_text()


def test_no_decision_reads_a_test_label(tmp_path, tracking_uri, monkeypatch):
    """The same run with the test split's labels scrambled: every decision (lifetimes, labels
    bought, fitness, teachers, elitism) is the same; only the reported test figures move."""
    import dataclasses

    import numpy as np
    from forkpop.experiments import specs
    from forkpop.workers import budget_world

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = _run(tmp_path / "a", tracking_uri)

    def scrambled(*args, load=budget_world.load_data, **kw):
        d = load(*args, **kw)
        return dataclasses.replace(d, y_test=np.random.default_rng(0).permutation(d.y_test))

    monkeypatch.setattr(budget_world, "load_data", scrambled)
    monkeypatch.setattr(specs, "load_data", scrambled)
    b = _run(tmp_path / "b", tracking_uri)
    for x, y in zip(a.summary["history"], b.summary["history"], strict=True):
        for key in ("seed_val_accuracy", "best_fitness", "mean_fitness", "teachers", "student_accepted", "world"):
            assert x[key] == y[key], key
    assert a.summary["seed_test_accuracy"] != b.summary["seed_test_accuracy"]  # the report did read them


def test_the_world_itself_holds_no_niche_label():
    """Only the oracle reads the niches' labels: the world that selection and distillation see
    has none to give or to score on (its probe labels are selection's, counted)."""
    from pathlib import Path

    from forkpop.experiments import configs
    from forkpop.experiments.config import load_config
    from forkpop.workers.budget_world import budget_world

    world = budget_world(load_config(Path(configs.__file__).parent / "abm.yaml", ["data.n_niches=4"]))
    assert world.labels("transfer") is None and world.labels("test") is None and world.labels("probe") is not None
    model = world.build_model()
    with pytest.raises(KeyError):
        world.fitness(model, torch.nn.utils.parameters_to_vector(model.parameters()), split="transfer")
