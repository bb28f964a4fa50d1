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
        },
    ),
    ("g01-seed", {"forkpop.origin": "distill", "forkpop.parent_ids": "a,b"}, {"gene.lr": "0.2"}, {"x": -math.inf}, {}),
]


def _write(uri, experiment, bulk):
    w = _Writer(uri, experiment, None, use_bulk=bulk)
    w.start("parent", {"forkpop.kind": "population"}, {"p": "1"})
    assert (w.bulk is not None) == bulk
    w.variants(VARIANTS)
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
