import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from forkpop.experiments.checkpoint import CheckpointError, read_checkpoint
from forkpop.experiments.runner import PopulationRun
from forkpop.experiments.tracking import lineage_from_mlflow
from forkpop.population import Origin

from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, uri, **sections):
    run = PopulationRun(tiny_config(tmp_path, **sections), tracking_uri=uri, progress=False)
    return run, run.run()


def test_local_run_records_every_birth_in_mlflow(tmp_path, tracking_uri):
    run, s = _run(tmp_path, tracking_uri)
    lin = run.lineage
    # 1 seed + 2 generations x (6 forks + 1 distilled student)
    assert len(lin) == 1 + 2 * 7
    students = [v for v in lin if v.origin is Origin.DISTILL]
    assert len(students) == 2 and all(len(v.parents) == 3 for v in students)
    assert lineage_from_mlflow(s.mlflow_run_id, tracking_uri) == lin

    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri)
    parent = c.get_run(s.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    hist = c.get_metric_history(s.mlflow_run_id, "seed_test_accuracy")
    assert [m.step for m in hist] == [0, 1]
    assert [m.value for m in hist] == pytest.approx([h["seed_test_accuracy"] for h in s.history])
    kids = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}'")
    fork = next(r for r in kids if r.data.tags["forkpop.origin"] == "fork")
    assert {"gene.lr", "gene.epochs"} <= set(fork.data.params)
    first = c.get_metric_history(fork.info.run_id, "preq_accuracy_epoch")  # the first pass: unseen data
    later = c.get_metric_history(fork.info.run_id, "train_accuracy_epoch")  # passes seen before
    assert len(first) == 1 and first[0].step == 0
    assert len(later) == int(float(fork.data.params["gene.epochs"])) - 1
    assert [m.step for m in later] == list(range(1, len(later) + 1))
    arts = {a.path for a in c.list_artifacts(s.mlflow_run_id)}
    assert {"lineage.json", "config.yaml", "steps"} <= arts
    gen = int(fork.data.tags["forkpop.generation"])
    got = c.download_artifacts(s.mlflow_run_id, f"steps/gen-{gen:04d}.json", str(tmp_path))
    curves = json.loads(Path(got).read_text())
    full = curves[fork.data.tags["forkpop.variant_id"]]
    assert len(full["preq_accuracy"]) > 1 and full["preq_accuracy"][-1] == pytest.approx(first[0].value)
    assert full["train_accuracy"][-1] == pytest.approx(later[-1].value)
    assert len(full["preq_accuracy"]) + len(full["train_accuracy"]) == len(full["loss"])

    ckpts = sorted((Path(s.run_dir) / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["gen-0000", "gen-0001"]
    tensors, state = read_checkpoint(ckpts[-1])
    assert state["generation"] == 1 and "seed" in tensors and state["lineage"]["variants"]
    w = ckpts[-1] / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(ckpts[-1])


def test_batch_resolution_curves_in_mlflow(tmp_path, tracking_uri):
    _, s = _run(tmp_path, tracking_uri, tracking={"step_metrics": "batch"}, run={"generations": 1})
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri)
    kids = c.search_runs(["1"], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}' and tags.`forkpop.origin` = 'fork'")
    steps = c.get_metric_history(kids[0].info.run_id, "preq_accuracy")
    assert len(steps) > 2 and [m.step for m in steps] == list(range(len(steps)))
    train = c.get_metric_history(kids[0].info.run_id, "train_accuracy")  # after the first pass, steps go on
    loss = c.get_metric_history(kids[0].info.run_id, "loss")
    assert len(loss) == len(steps) + len(train) and [m.step for m in train] == list(range(len(steps), len(loss)))


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    _, a = _run(tmp_path / "a", f"sqlite:///{tmp_path}/a.db")
    _, b = _run(tmp_path / "b", f"sqlite:///{tmp_path}/b.db")
    _, c = _run(tmp_path / "c", f"sqlite:///{tmp_path}/c.db", run={"seed": 1})
    key = ["seed_val_accuracy", "seed_test_accuracy", "best_fitness", "mean_fitness", "teachers"]
    pick = lambda s: [[h[k] for k in key] for h in s.history]  # noqa: E731
    assert pick(a) == pick(b)
    assert pick(a) != pick(c)


def test_cli_smoke_writes_the_summary(tmp_path):
    out = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "forkpop.experiments.cli", "run", str(ROOT / "experiments/configs/digits.yaml")]
    cmd += ["--set", "run.generations=1", "--set", "population.size=4", "--set", "selection.k=2"]
    cmd += ["--set", f"run.run_dir={tmp_path}/runs", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    cmd += ["--summary", str(out), "--quiet"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=180, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads(out.read_text())
    for k in [
        "seed_test_accuracy",
        "best_individual_test_accuracy",
        "ensemble_test_accuracy",
        "wall_seconds",
        "generations",
        "mlflow_run_id",
        "tracking_uri",
    ]:
        assert k in s
    assert 0 <= s["seed_test_accuracy"] <= 1 and s["generations"] == 1
    assert [w["node"] for w in s["workers"]] == ["local"]  # backend auto, no address: no Ray
    assert "final seed" in p.stdout and "top-k ensemble" in p.stdout


def test_loop_and_batched_engines_make_the_same_run(tmp_path):
    _, a = _run(tmp_path / "a", f"sqlite:///{tmp_path}/a.db", run={"engine": "loop"})
    _, b = _run(tmp_path / "b", f"sqlite:///{tmp_path}/b.db", run={"engine": "batched"})
    assert [h["teachers"] for h in a.history] == [h["teachers"] for h in b.history]
    for ha, hb in zip(a.history, b.history, strict=True):
        assert ha["seed_test_accuracy"] == pytest.approx(hb["seed_test_accuracy"], abs=2e-3)
    assert [w["engine"] for w in a.workers] == ["loop"] and [w["engine"] for w in b.workers] == ["stacked"]


def test_species_and_novelty_runs_keep_their_lineage_in_mlflow(tmp_path, tracking_uri):
    run, s = _run(tmp_path, tracking_uri, selection={"species": 2, "k": None, "merge_species": True})
    seeds = [v for v in run.lineage if v.origin is Origin.DISTILL]
    # two species seeds per generation but the last, which merges every teacher into one
    assert sorted(v.id for v in seeds) == ["g01-seed0", "g01-seed1", "g02-seed"]
    assert len(seeds[-1].parents) == 6 and len(seeds[0].parents) + len(seeds[1].parents) == 6
    assert seeds[-1].id == "g02-seed"
    assert lineage_from_mlflow(s.mlflow_run_id, tracking_uri) == run.lineage
    forks = [v for v in run.lineage if v.origin is Origin.FORK and v.generation == 1]
    assert {v.parents[0] for v in forks} <= {"g01-seed0", "g01-seed1", "g00-seed"}
    assert s.history[0]["diversity"]["species"] >= 1 and "disagreement" in s.history[0]["diversity"]
    _, n = _run(tmp_path / "n", f"sqlite:///{tmp_path}/n.db", selection={"method": "nsga2", "k": 3})
    assert all(len(h["teachers"]) == 3 for h in n.history)


def test_lineage_analyze_and_compare_commands_read_mlflow_alone(tmp_path, tracking_uri):
    run, s = _run(tmp_path, tracking_uri)
    _, s2 = _run(tmp_path / "b", tracking_uri, run={"seed": 1})
    base = [sys.executable, "-m", "forkpop.experiments.cli"]
    env_uri = ["--tracking-uri", tracking_uri]

    def cli(*args):
        return subprocess.run([*base, *args], capture_output=True, text=True, cwd=tmp_path, timeout=180)

    p = cli("lineage", s.mlflow_run_id, "--out", str(tmp_path / "lin"), *env_uri)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "g01-seed" in p.stdout and "teachers" in p.stdout
    assert {f.name for f in (tmp_path / "lin").iterdir()} >= {"lineage.png", "lineage.svg", "lineage.graphml"}
    assert (tmp_path / "lin" / "lineage.graphml").read_text().count("<edge ") == len(run.lineage.edges())
    p = cli("analyze", s.mlflow_run_id, "--out", str(tmp_path / "rep"), "--quiet", *env_uri)
    assert p.returncode == 0, p.stderr[-1500:]
    pngs = list((tmp_path / "rep").glob("*.png"))
    assert len(pngs) >= 4 and all(f.read_bytes()[:4] == b"\x89PNG" for f in pngs)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "div.disagreement" in html
    p = cli("compare", s.mlflow_run_id, s2.mlflow_run_id, "--out", str(tmp_path / "cmp"), "--quiet", *env_uri)
    assert p.returncode == 0, p.stderr[-1500:]
    assert (tmp_path / "cmp" / "compare_seed_accuracy.png").exists()
    p = cli("analyze", "nosuchrun", "--out", str(tmp_path / "x"), *env_uri)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no MLflow run" in p.stderr


def test_a_study_runs_its_modes_and_bad_studies_say_why(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(
        f"base: {ROOT / 'experiments/configs/digits.yaml'}\nseeds: [0]\n"
        "modes:\n  plain: {}\n  species: {selection: {species: 2}}\n"
        "report: [seed_test_accuracy, div.disagreement, div.species]\n"
    )
    base = [sys.executable, "-m", "forkpop.experiments.cli", "study", str(study), "--backend", "local", "--quiet"]
    small = ["--set", "run.generations=2", "--set", "population.size=4", "--set", "data.n_niches=4"]
    small += ["--set", f"run.run_dir={tmp_path}/runs", "--set", "selection.merge_species=false"]
    p = subprocess.run(
        [*base, *small, "--out", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "study.json").read_text())
    assert [r["mode"] for r in res["runs"]] == ["plain", "species"]
    assert res["summary"]["species"]["div.species"] == 2 and res["summary"]["plain"]["div.species"] == 1
    assert "| plain | 1 |" in p.stdout and (tmp_path / "out" / "compare_seed_accuracy.png").exists()
    study.write_text("base: digits\nmodez: {}\n")
    p = subprocess.run(
        [*base, "--out", str(tmp_path / "o2")], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert p.returncode == 2 and "unknown key 'modez'" in p.stderr and p.stderr.count("\n") == 1


@pytest.mark.chaos
def test_a_diverging_variant_is_culled_recorded_and_never_a_teacher(tmp_path, tracking_uri):
    genes = {"lr": {"low": 1e3, "high": 1e3, "init": 1e3, "kind": "log"}}
    run, s = _run(tmp_path, tracking_uri, population={"genes": genes}, run={"generations": 1})
    h = s.history[0]
    assert h["diverged"] == 6 and h["teachers"] == [] and not h["student_accepted"]
    from mlflow import MlflowClient

    kids = MlflowClient(tracking_uri).search_runs(
        ["1"], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}' and tags.`forkpop.origin` = 'fork'"
    )
    assert len(kids) == 6
    for r in kids:
        t = r.data.tags
        assert t["forkpop.status"] == "diverged" and t["forkpop.teacher"] == "false"
        assert "exploded" in t["forkpop.reason"] or "non-finite" in t["forkpop.reason"]
        assert "val_accuracy" not in r.data.metrics


@pytest.mark.chaos
def test_the_collapse_alarm_reads_falling_accuracy_and_entropy(tmp_path):
    from forkpop.experiments.observers import GenerationRecord, collapse

    def rec(val, ent):
        return GenerationRecord(0, "s", val, 0, 0, 0, 0, 0, 0, False, 0, [], seed_entropy=ent)

    falling = [rec(0.9, 1.0), rec(0.8, 0.7)]
    assert collapse(falling, 0.7, 0.5, 2)  # both fell twice in a row
    assert not collapse(falling, 0.7, 0.9, 2)  # entropy rose
    assert not collapse(falling, 0.85, 0.5, 2)  # accuracy rose
    assert not collapse(falling[:1], 0.7, 0.5, 2)  # too short a history
    assert not collapse(falling, 0.7, 0.5, 0)  # off
    _, s = _run(tmp_path / "r", f"sqlite:///{tmp_path}/r.db")
    assert all(h["seed_entropy"] > 0 for h in s.history) and not any(h["collapse_alarm"] for h in s.history)
