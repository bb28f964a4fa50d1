"""The language-model world end to end: a small population of byte-level LMs on stdlib niches,
learning from real text and from their own, recorded in MLflow, resumed, and the two studies'
smoke versions through the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from forkpop.experiments.cli import bundled_config
from forkpop.experiments.config import config_to_yaml, load_config
from forkpop.experiments.runner import PopulationRun

pytestmark = pytest.mark.slow

TINY = [
    "run.generations=2",
    "run.backend=local",
    "population.size=4",
    "data.n_niches=2",
    "lm.n_layer=1",
    "lm.n_head=2",
    "lm.d_model=32",
    "lm.context=16",
    "lm.steps=6",
    "lm.batch_size=4",
    "lm.max_bytes_per_niche=20000",
    "lm.probe_windows=8",
    "lm.accept_windows=8",
    "lm.test_windows=16",
    "lm.report_samples=2",
    "lm.self_train.samples=8",
    "distill.steps=6",
    "distill.eval_every=3",
]


def tiny_text(tmp_path, *extra):
    return load_config(bundled_config("text"), [*TINY, f"run.run_dir={tmp_path / 'runs'}", *extra])


def _metrics(uri, run_id):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    run = c.get_run(run_id)
    keys = [k for k in run.data.metrics if k.startswith("lm.") and k not in ("lm.tokens_per_s",)]
    return {k: [round(m.value, 6) for m in sorted(c.get_metric_history(run_id, k), key=lambda m: m.step)] for k in keys}


def test_a_text_run_records_bits_per_byte_collapse_measures_and_samples(tmp_path):
    cfg = tiny_text(tmp_path, "lm.self_train.mode=replace", "lm.self_train.real_fraction=0.5")
    uri = f"sqlite:///{tmp_path}/m.db"
    s = PopulationRun(cfg, tracking_uri=uri, progress=False).run()
    assert len(s.history) == 2
    w = s.world
    for key in (
        "test_bpb",
        "test_bpb_rare4",
        "test_bpb_frequent4",
        "gen_distinct4",
        "gen_gzip_ratio",
        "gen_rare4_recall",
        "gen_entropy_bits",
        "gen_bpb_by_gen0",
        "fork_own_gain_median",
        "tokens_per_s",
    ):
        assert np.isfinite(w[key]), key  # fmt: skip
    assert 0 < w["test_bpb"] < 8.5
    assert w["test_bpb_rare4"] > w["test_bpb_frequent4"]  # rare 4-grams are harder to predict
    niches = [k for k in w if k.startswith("test_bpb.")]
    assert len(niches) == 2
    assert s.samples and all(isinstance(x, str) and x for x in s.samples)
    # The second generation's forks learned from the first generation's samples.
    assert s.history[1]["transfer_real_fraction"] == pytest.approx(0.5)
    m = _metrics(uri, s.mlflow_run_id)
    assert len(m["lm.test_bpb"]) == 2 and "lm.gen_rare4_recall" in m
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    arts = {a.path for a in c.list_artifacts(s.mlflow_run_id)}
    assert {"samples.txt", "world.json"} <= arts
    world = json.loads(c.download_artifacts(s.mlflow_run_id, "world.json", str(tmp_path)) and
                       (tmp_path / "world.json").read_text())  # fmt: skip
    assert world["source"] == "stdlib" and len(world["sha256"]) == 64 and world["files"]
    kids = c.search_runs([c.get_run(s.mlflow_run_id).info.experiment_id], "tags.forkpop.origin = 'fork'")
    assert kids and "bpb_own" in kids[0].data.metrics and "seed_bpb_own" in kids[0].data.metrics
    from forkpop.experiments.analysis import analyze

    report = analyze(s.mlflow_run_id, tmp_path / "report", uri, progress=False)
    text = report.read_text()
    assert "Samples of the final seed" in text and (tmp_path / "report" / "lm_bits_per_byte.png").exists()
    assert (tmp_path / "report" / "lm_generated_text.png").exists()


def test_the_same_seed_gives_the_same_text_lineage_and_a_resumed_run_the_same_answer(tmp_path):
    cfg = tiny_text(tmp_path / "a", "run.generations=3", "lm.self_train.mode=accumulate")
    a = PopulationRun(cfg, tracking_uri=f"sqlite:///{tmp_path}/a.db", progress=False)
    sa = a.run()
    # Stopped after generation 1 (its later checkpoints removed, as a kill leaves it), then resumed.
    cfg_b = tiny_text(tmp_path / "b", "run.generations=3", "lm.self_train.mode=accumulate")
    b = PopulationRun(cfg_b, tracking_uri=f"sqlite:///{tmp_path}/b.db", progress=False)
    sb = b.run()
    ck = sorted((b.run_dir / "checkpoints").glob("gen-*"))
    assert len(ck) == 3
    import shutil

    shutil.rmtree(ck[-1])
    (b.run_dir / "config.yaml").write_text(config_to_yaml(cfg_b))
    r = PopulationRun(cfg_b, progress=False, resume_dir=b.run_dir)
    sr = r.run()
    assert a.lineage == r.lineage
    assert [h["world"]["test_bpb"] for h in sa.history] == pytest.approx([h["world"]["test_bpb"] for h in sr.history])
    assert sa.world["gen_rare4_recall"] == pytest.approx(sr.world["gen_rare4_recall"])
    assert torch.equal(a.state.seeds[0].weights, r.state.seeds[0].weights)
    assert sb.world["test_bpb"] == pytest.approx(sa.world["test_bpb"])


def test_bad_text_niches_get_one_line_and_exit_2(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"base: text\ndata: {{source: text, niches: {{a: '{tmp_path}/nothing/*.txt'}}}}\n")
    p = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "run", str(cfg), "--backend", "local"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert p.returncode == 2, p.stderr
    assert "data.niches.a: no file matches" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("*/run.json"))


def test_users_own_text_niches(tmp_path):
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        rng = np.random.default_rng(len(name))
        for i in range(3):
            words = rng.choice(["alpha", "beta", "gamma", name * 3, "delta"], size=600)
            (d / f"f{i}.txt").write_text(" ".join(words))
    cfg = tiny_text(
        tmp_path,
        "data.source=text",
        f"data.niches={{a: '{tmp_path}/a', b: '{tmp_path}/b/*.txt'}}",
        "lm.max_bytes_per_niche=5000",
        "lm.heldout_fraction=0.34",
        "run.generations=1",
    )
    s = PopulationRun(cfg, tracking=False, progress=False).run()
    assert set(k for k in s.world if k.startswith("test_bpb.")) == {"test_bpb.a", "test_bpb.b"}


def test_the_python_docs_topics_as_a_prose_corpus(tmp_path):
    cfg = tiny_text(tmp_path, "data.source=pydoc", "run.generations=1")
    s = PopulationRun(cfg, tracking=False, progress=False).run()
    assert len([k for k in s.world if k.startswith("test_bpb.")]) == 2 and np.isfinite(s.world["test_bpb"])


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_smoke_study_text_and_collapse(tmp_path):
    sets = [x for t in TINY if not t.startswith("run.generations") for x in ("--set", t)]
    uri = f"sqlite:///{tmp_path}/m.db"
    p = _cli("study", "text", "--out", str(tmp_path / "t"), "--seeds", "0", "--quiet", "--tracking-uri", uri,
             *sets, "--set", "run.generations=2", "--set", f"run.run_dir={tmp_path}/runs", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / "t" / "study.json").read_text())["methods"]
    assert set(m) == {"population", "pooled", "fedavg"}
    pop_tokens = m["population"]["runs"][0]["tokens"]
    for k in ("pooled", "fedavg"):
        assert len(m[k]["bits_per_byte"]) == 1 and np.isfinite(m[k]["bits_per_byte"][0])
        assert abs(m[k]["runs"][0]["tokens"] - pop_tokens) / pop_tokens < 0.25  # equal training tokens
    p = _cli("study", "collapse", "--out", str(tmp_path / "c"), "--seeds", "0", "--quiet", "--tracking-uri", uri,
             *sets, "--set", "run.generations=2", "--set", f"run.run_dir={tmp_path}/runs", cwd=tmp_path)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    arms = json.loads((tmp_path / "c" / "study.json").read_text())["arms"]
    assert len(arms) == 6 and {a["mode"] for a in arms} == {"replace", "accumulate"}
    for a in arms:
        assert len(a["bits_per_byte"]) == 1 and len(a["bits_per_byte"][0]) == 2
        assert len(a["rare4_recall"][0]) == 2 and len(a["distinct4"][0]) == 2
    assert (tmp_path / "c" / "collapse_bits_per_byte.png").stat().st_size > 1000


@pytest.mark.ray
def test_a_text_run_on_ray_gives_the_local_answer(tmp_path, ray_session):
    local = PopulationRun(tiny_text(tmp_path / "l", "lm.self_train.mode=replace"), tracking=False, progress=False)
    sl = local.run()
    ray_run = PopulationRun(
        tiny_text(tmp_path / "r", "lm.self_train.mode=replace", "run.backend=ray"), tracking=False, progress=False
    )
    sr = ray_run.run()
    assert sr.workers and all(w["engine"] == "lm-stacked" for w in sr.workers)
    assert local.lineage == ray_run.lineage
    assert [h["world"]["test_bpb"] for h in sr.history] == pytest.approx(
        [h["world"]["test_bpb"] for h in sl.history], abs=1e-5
    )
