"""A run SIGKILLed mid-way and resumed ends as if it had never stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from forkpop.experiments.config import config_to_yaml
from forkpop.experiments.runner import PopulationRun
from forkpop.experiments.tracking import lineage_from_mlflow

from tests.conftest import tiny_config

pytestmark = pytest.mark.resume


def _parent_metrics(uri, run_id):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    run = c.get_run(run_id)
    out = {}
    for key in run.data.metrics:
        if key.startswith("time_") or key.startswith("div.") and "seconds" in key:
            continue
        out[key] = [
            (m.step, round(m.value, 9)) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)
        ]
    kids = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=5000)
    return run.info.status, out, sorted(r.data.tags["forkpop.variant_id"] for r in kids), [r.info.status for r in kids]


def _cli(*args, cwd):
    return [sys.executable, "-m", "forkpop.experiments.cli", *args]


def test_a_sigkilled_run_resumes_to_the_same_lineage_and_metrics(tmp_path):
    cfg = tiny_config(tmp_path / "b", run={"generations": 10})
    calm = PopulationRun(
        tiny_config(tmp_path / "a", run={"generations": 10}), tracking_uri=f"sqlite:///{tmp_path}/a.db", progress=False
    )
    calm_s = calm.run()

    yaml_path = tmp_path / "b.yaml"
    yaml_path.write_text(config_to_yaml(cfg))
    uri = f"sqlite:///{tmp_path}/b.db"
    proc = subprocess.Popen(
        _cli("run", str(yaml_path), "--tracking-uri", uri, "--quiet", cwd=tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    runs = Path(cfg.run.run_dir)
    deadline = time.time() + 120
    while time.time() < deadline and not list(runs.glob("*/checkpoints/gen-0003")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (run_dir,) = [d for d in runs.iterdir() if (d / "run.json").exists()]
    done = sorted(p.name for p in (run_dir / "checkpoints").glob("gen-[0-9]*"))
    assert 3 <= len(done) < 10

    p = subprocess.run(
        _cli("resume", str(run_dir), "--quiet", cwd=tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert lineage_from_mlflow(run_id, uri) == calm.lineage
    status, metrics, kids, kid_status = _parent_metrics(uri, run_id)
    calm_status, calm_metrics, calm_kids, _ = _parent_metrics(f"sqlite:///{tmp_path}/a.db", calm_s.mlflow_run_id)
    assert status == calm_status == "FINISHED"
    assert kids == calm_kids  # every birth once
    assert set(kid_status) == {"FINISHED"}
    assert metrics == calm_metrics  # every generation's figures, each step once
    assert "final seed" in p.stdout


def test_resume_refuses_what_is_not_a_run_directory(tmp_path):
    p = subprocess.run(
        _cli("resume", str(tmp_path), cwd=tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and "not a run directory" in p.stderr and p.stderr.count("\n") == 1


def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before(tmp_path):
    cfg = tiny_config(tmp_path, run={"generations": 3})
    uri = f"sqlite:///{tmp_path}/m.db"
    first = PopulationRun(cfg, tracking_uri=uri, progress=False)
    s = first.run()
    last = Path(s.run_dir) / "checkpoints" / "gen-0002" / "weights.safetensors"
    last.write_bytes(last.read_bytes()[:-7])  # truncated
    p = subprocess.run(_cli("resume", s.run_dir, "--quiet", cwd=tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "fails its sha256 check" in p.stderr and "trying the generation before" in p.stderr
    assert lineage_from_mlflow(s.mlflow_run_id, uri) == first.lineage  # generation 2 made again, once
    status, metrics, kids, _ = _parent_metrics(uri, s.mlflow_run_id)
    assert status == "FINISHED" and len(kids) == len(set(kids)) == len(first.lineage)
    assert [step for step, _ in metrics["seed_test_accuracy"]] == [0, 1, 2]


def test_generated_transfer_data_is_checkpointed_and_resumes_to_the_same_metrics(tmp_path):
    """The kept pseudo-labelled inputs are part of the state: a resume from generation 1 must
    distill generations 2 and 3 from the same transfer set as the run left alone."""
    cfg = tiny_config(
        tmp_path,
        run={"generations": 4},
        distill={"generated": {"kind": "mixup", "per_generation": 0.5, "min_real_fraction": 0.4}},
    )
    uri = f"sqlite:///{tmp_path}/m.db"
    first = PopulationRun(cfg, tracking_uri=uri, progress=False)
    s = first.run()
    _, before, _, _ = _parent_metrics(uri, s.mlflow_run_id)
    for g in (2, 3):  # as if killed after generation 1's checkpoint
        shutil.rmtree(Path(s.run_dir) / "checkpoints" / f"gen-{g:04d}")
    p = subprocess.run(_cli("resume", s.run_dir, "--quiet", cwd=tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    _, after, kids, _ = _parent_metrics(uri, s.mlflow_run_id)
    keys = ["seed_test_accuracy", "seed_val_accuracy", "transfer_real_fraction", "transfer_generated"]
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}
    assert [v for _, v in after["transfer_generated"]][-1] > [v for _, v in after["transfer_generated"]][0]
    assert len(kids) == len(set(kids)) == len(first.lineage)


def test_a_kill_between_a_checkpoint_and_its_generation_metrics_loses_no_metric(tmp_path):
    """Generation 1's checkpoint is on disk but none of its parent-run metrics reached the
    store (timings included): the resume writes them all, once."""
    import sqlite3

    cfg = tiny_config(tmp_path, run={"generations": 3})
    db = tmp_path / "m.db"
    s = PopulationRun(cfg, tracking_uri=f"sqlite:///{db}", progress=False).run()
    _, before, _, _ = _parent_metrics(f"sqlite:///{db}", s.mlflow_run_id)
    shutil.rmtree(Path(s.run_dir) / "checkpoints" / "gen-0002")
    with sqlite3.connect(db) as c:  # as if the store went away right after generation 1's checkpoint
        c.execute("delete from metrics where run_uuid = ? and step >= 1", (s.mlflow_run_id,))
        c.execute("delete from latest_metrics where run_uuid = ?", (s.mlflow_run_id,))
    p = subprocess.run(_cli("resume", s.run_dir, "--quiet", cwd=tmp_path), cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    _, after, _, _ = _parent_metrics(f"sqlite:///{db}", s.mlflow_run_id)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    timings = sorted(k for k in client.get_run(s.mlflow_run_id).data.metrics if k.startswith("time_"))
    assert "time_checkpoint" in timings and "time_generation" in timings
    for key in timings:  # every generation's timing is there, once (values differ: they are times)
        assert sorted(m.step for m in client.get_metric_history(s.mlflow_run_id, key)) == [0, 1, 2], key
    assert {k: v for k, v in after.items() if not k.startswith("time_")} == {
        k: v for k, v in before.items() if not k.startswith("time_")
    }


def test_a_run_killed_before_mlflow_named_it_resumes_into_the_run_with_its_key(tmp_path):
    """run.json is written before the tracking process has opened the parent run (start-up
    does not wait on MLflow); a resume then finds that run by its ``forkpop.run_key``, or opens
    it when the kill came before it was made, and ends with the lineage of a calm run."""
    cfg = tiny_config(tmp_path, run={"generations": 2})
    uri = f"sqlite:///{tmp_path}/m.db"
    first = PopulationRun(cfg, tracking_uri=uri, progress=False)
    s = first.run()
    run_json = Path(s.run_dir) / "run.json"
    saved = json.loads(run_json.read_text())
    assert saved["mlflow_run_id"] == s.mlflow_run_id and saved["run_key"]
    shutil.rmtree(Path(s.run_dir) / "checkpoints" / "gen-0001")  # killed after generation 0
    run_json.write_text(json.dumps({**saved, "mlflow_run_id": None}))  # ... before the id was saved
    again = PopulationRun(cfg, progress=False, resume_dir=Path(s.run_dir)).run()
    assert again.mlflow_run_id == s.mlflow_run_id
    assert lineage_from_mlflow(s.mlflow_run_id, uri) == first.lineage
    status, _, kids, _ = _parent_metrics(uri, s.mlflow_run_id)
    assert status == "FINISHED" and len(kids) == len(set(kids)) == len(first.lineage)

    fresh = f"sqlite:///{tmp_path}/never.db"  # the kill came before the parent run was made
    run_json.write_text(json.dumps({**saved, "mlflow_run_id": None, "tracking_uri": fresh}))
    made = PopulationRun(cfg, progress=False, resume_dir=Path(s.run_dir)).run()
    assert made.mlflow_run_id and made.mlflow_run_id != s.mlflow_run_id
    assert json.loads(run_json.read_text())["tracking_uri"] == fresh
