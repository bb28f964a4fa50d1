"""The tracking writer: its one-transaction path writes what MLflow's client API writes."""

import math

import pytest
from forkpop.experiments.tracking import Tracker, TrackingError, _Writer
from forkpop.population import Genome, Origin, Variant

VARIANTS = [
    (
        "g01-v000",
        {"forkpop.variant_id": "g01-v000", "forkpop.generation": "1", "forkpop.origin": "fork", "forkpop.niche": "3"},
        {"gene.lr": "0.1", "gene.epochs": "20.0"},
        {"val_accuracy": 0.75, "samples": 120.0, "weird": math.nan, "huge": math.inf},
        {  # (step, value) pairs, as Tracker.log_variant hands them to the writer
            "loss_epoch": list(enumerate([2.0, 1.0, 0.5, 0.5])),
            "train_accuracy_epoch": [(1, 0.1), (2, 0.4), (3, 0.4), (4, math.nan)],
            "preq_accuracy": [],  # a world with no learning curve (the label-budget world's lifetimes)
        },
    ),
    ("g01-seed", {"forkpop.origin": "distill", "forkpop.parent_ids": "a,b"}, {"gene.lr": "0.2"}, {"x": -math.inf}, {}),
]


GENERATIONS = [
    {"seed_val_accuracy": 0.5, "div.kl": math.nan, "time_learn": 1.5},
    {"seed_val_accuracy": 0.75, "div.kl": math.inf, "time_learn": 1.5},
    {"seed_val_accuracy": 0.7, "div.kl": -1.0, "new_key": 2.0},
]


def _parent(client, w):
    hist = {
        k: sorted(
            (m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value)
            for m in client.get_metric_history(w.run_id, k)
        )
        for k in client.get_run(w.run_id).data.metrics
    }
    latest = {k: "nan" if math.isnan(v) else v for k, v in client.get_run(w.run_id).data.metrics.items()}
    return hist, latest


def _write(uri, experiment, bulk):
    w = _Writer(uri, experiment, None, use_bulk=bulk)
    w.start("parent", {"forkpop.kind": "population"}, {"p": "1"})
    assert (w.bulk is not None) == bulk
    w.variants(VARIANTS)
    for g, m in enumerate(GENERATIONS):
        w.generation(g, m, ts=1000 + g)
    assert (w.bulk is not None) == bulk, w.bulk_off_reason
    return w


def _snapshot(client, w):
    runs = client.search_runs([w.experiment_id], f"tags.mlflow.parentRunId = '{w.run_id}'")
    out = {}
    for r in runs:
        tags = {k: v for k, v in r.data.tags.items() if k != "mlflow.parentRunId"}
        hist = {
            k: sorted(
                (m.step, m.value if not math.isnan(m.value) else "nan")
                for m in client.get_metric_history(r.info.run_id, k)
            )
            for k in r.data.metrics
        }
        latest = {k: (v if not math.isnan(v) else "nan") for k, v in r.data.metrics.items()}
        info = (r.info.status, r.info.lifecycle_stage, r.info.user_id, r.info.run_name)
        assert r.info.artifact_uri.endswith(f"{r.info.run_id}/artifacts")
        assert r.data.tags["mlflow.parentRunId"] == w.run_id
        out[r.info.run_name] = (info, tags, r.data.params, latest, hist)
    return out


def test_one_transaction_writes_what_the_client_api_writes(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    slow, fast = _write(uri, "client", False), _write(uri, "bulk", True)
    client = MlflowClient(uri)
    a, b = _snapshot(client, slow), _snapshot(client, fast)
    assert set(a) == {"g01-v000", "g01-seed"}
    assert a == b
    assert a["g01-v000"][0][0] == "FINISHED"
    assert _parent(client, slow) == _parent(client, fast)  # the generations' metrics of the parent run
    assert _parent(client, fast)[1]["seed_val_accuracy"] == 0.7


def test_the_tracker_process_writes_and_reports_failures(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    t = Tracker(uri, "exp")
    t.start("parent", {}, {"a": 1})
    g = Genome({"lr": 0.1})
    for i in range(5):
        t.log_variant(Variant(f"v{i}", g, 0, Origin.FORK, ("s",), i), {"val_accuracy": 0.5})
    t.log_generation(0, {"seed_val_accuracy": 0.5})
    assert t.flush() >= 0 and t.wait_started()
    t.finish()
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    assert c.get_run(t.run_id).info.status == "FINISHED"
    assert len(c.search_runs([c.get_run(t.run_id).info.experiment_id])) == 6

    bad = Tracker("sqlite:////proc/forkpop-no/such.db", "exp")
    bad.start("parent", {}, {})
    with pytest.raises(TrackingError, match="failed"):
        bad.wait_started(timeout=60)
    bad.finish()


def test_a_new_sqlite_store_is_a_copy_of_a_migrated_template(tmp_path):
    """The copy holds MLflow's current schema and no experiment; MLflow opens it as its own."""
    from forkpop.experiments.tracking import seed_sqlite_store
    from mlflow import MlflowClient

    cache = tmp_path / "cache"
    for name in ("a.db", "b.db"):
        assert seed_sqlite_store(f"sqlite:///{tmp_path / name}", cache_dir=cache)
    assert not seed_sqlite_store(f"sqlite:///{tmp_path / 'a.db'}", cache_dir=cache)  # never over a store
    assert not seed_sqlite_store("http://127.0.0.1:5000", cache_dir=cache)
    assert len(list(cache.iterdir())) == 1
    c = MlflowClient(f"sqlite:///{tmp_path / 'b.db'}")
    exp = c.create_experiment("x", artifact_location=str(tmp_path / "art"))
    run = c.create_run(exp)
    c.log_metric(run.info.run_id, "m", 1.0)
    assert c.get_run(run.info.run_id).data.metrics == {"m": 1.0}
    assert sorted(e.name for e in c.search_experiments()) == ["Default", "x"]


def test_with_variant_runs_seeds_every_birth_is_still_in_mlflow(tmp_path):
    """Large populations keep nested runs for seeds and students only: the forks are rows of
    each generation's variants table, and the lineage rebuilt from MLflow is the whole one."""
    from forkpop.experiments.runner import PopulationRun
    from forkpop.experiments.tracking import lineage_from_mlflow, variant_runs_for
    from mlflow import MlflowClient

    from tests.conftest import tiny_config

    assert variant_runs_for("auto", 256, "sqlite:///x.db") and not variant_runs_for("auto", 257, "sqlite:///x.db")
    assert not variant_runs_for("auto", 65, "http://127.0.0.1:5000") and variant_runs_for("all", 10**6, "http://h")
    uri = f"sqlite:///{tmp_path}/m.db"
    run = PopulationRun(tiny_config(tmp_path, tracking={"variant_runs": "seeds"}), tracking_uri=uri, progress=False)
    s = run.run()
    c = MlflowClient(uri)
    kids = c.search_runs(
        [c.get_run(s.mlflow_run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}'"
    )
    assert {k.data.tags["forkpop.origin"] for k in kids} == {"seed", "distill"}
    assert lineage_from_mlflow(s.mlflow_run_id, uri) == run.lineage
    assert len(run.lineage) > len(kids)


def test_a_tracker_whose_driver_is_killed_while_it_starts_ends_instead_of_lingering(tmp_path):
    """A driver SIGKILLed before its tracking process has even imported MLflow leaves that
    process to init; it still sees that its driver is gone and ends (it used to wait forever,
    holding the store open)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    code = (
        "import sys, time\n"
        "from forkpop.experiments.tracking import Tracker\n"
        f"t = Tracker('sqlite:///{tmp_path}/m.db', 'e')\n"
        "print(t._proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    writer = int(driver.stdout.readline())
    os.kill(driver.pid, signal.SIGKILL)  # at once: the writer is still starting
    driver.wait()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.time() + 60
    while alive(writer) and time.time() < deadline:
        time.sleep(0.2)
    gone = not alive(writer)
    if not gone:
        os.kill(writer, signal.SIGKILL)  # no process of this test outlives it
    assert gone, "the tracking process outlived its killed driver by a minute"
