"""The Python API: forkpop.run / forkpop.load, the example script, and the import surface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forkpop.experiments.checkpoint import CheckpointError
from forkpop.experiments.config import ConfigError
from forkpop.population.models import flat_weights

import forkpop

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        r = forkpop.run(
            "digits", overrides=["run.generations=2", f"run.run_dir={tmp}"], backend="local", tracking=False
        )
    finally:
        os.chdir(cwd)
    return tmp, r


def test_run_gives_a_seed_model_a_summary_and_a_lineage_without_mlflow(digits_run):
    tmp, r = digits_run
    assert isinstance(r, forkpop.Result) and r.seed_model(torch.zeros(1, 64)).shape == (1, 10)
    assert r.summary["seed_test_accuracy"] >= 0.85 and r.summary["generations"] == 2
    assert r.config.run.backend == "local" and r.run_dir.parent == tmp and r.generation == 1
    assert r.seed_id in r.lineage and len(r.lineage.generation(1)) >= r.config.population.size
    assert (r.run_dir / "checkpoints" / "gen-0001").is_dir() and (r.run_dir / "summary.json").is_file()
    assert not list(tmp.rglob("mlflow.db")) and not list(tmp.rglob("mlruns")) and not (tmp / "runs").exists()
    assert r.summary["mlflow_run_id"] == "" or r.summary["tracking_uri"] == ""
    text = repr(r)
    assert text.startswith("Result(") and "seed_test_accuracy=0." in text and "\n" not in text


def test_load_rebuilds_the_same_result(digits_run):
    _, r = digits_run
    again = forkpop.load(r.run_dir)
    assert torch.equal(flat_weights(again.seed_model), flat_weights(r.seed_model))
    assert json.dumps(again.summary, sort_keys=True) == json.dumps(r.summary, sort_keys=True)
    assert again.lineage == r.lineage and again.config == r.config and again.seed_id == r.seed_id
    # A run directory without world.json (an older run): load reads the data for the model's sizes.
    assert json.loads((r.run_dir / "world.json").read_text())["classes"] == [str(c) for c in range(10)]
    (r.run_dir / "world.json").unlink()
    assert torch.equal(flat_weights(forkpop.load(str(r.run_dir)).seed_model), flat_weights(r.seed_model))


def test_load_refuses_a_folder_without_checkpoints(tmp_path, digits_run):
    with pytest.raises(CheckpointError, match="not a run directory") as e:
        forkpop.load(tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "config.yaml").write_text((digits_run[1].run_dir / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        forkpop.load(tmp_path)


def test_dict_config_and_dict_overrides(tmp_path):
    cfg = {"run": {"generations": 1, "run_dir": str(tmp_path)}, "population": {"size": 4}, "data": {"n_niches": 4}}
    r = forkpop.run(
        cfg,
        overrides={"model.hidden": [16], "selection": {"k": 2}},
        seed=3,
        backend="local",
        tracking=False,
    )
    assert r.config.run.seed == 3 and r.config.model.hidden == [16] and r.config.selection.k == 2
    assert r.config.population.size == 4 and r.config.distill.steps > 0  # the rest: the defaults
    assert r.seed_model[0].out_features == 16 and r.summary["generations"] == 1
    # A dict may name a base, as a YAML file does.
    made = forkpop.api.make_config({"base": "digits", "run": {"seed": 5}}, ["population.size=8"])
    assert made.run.seed == 5 and made.population.size == 8


@pytest.mark.parametrize(
    "config, overrides, needle",
    [
        ("digits", ["population.size=-1"], "population.size: Input should be greater than or equal to 1"),
        ("digits", ["noequals"], "write key=value"),
        ("digits", {"populaton.size": 3}, "unknown key 'populaton'"),
        ({"run": {"generatons": 2}}, None, "unknown key 'run.generatons'"),
        ("no/such/config.yaml", None, "not found"),
        (42, None, "give a YAML path, a bundled name ('digits') or a dict"),
    ],
)
def test_a_bad_config_raises_a_one_line_config_error(config, overrides, needle, tmp_path):
    with pytest.raises(ConfigError) as e:
        forkpop.run(config, overrides=overrides, backend="local", tracking=False)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert forkpop.ConfigError is ConfigError


def test_an_unknown_model_raises_a_plugin_error_before_anything_is_recorded(tmp_path):
    with pytest.raises(forkpop.PluginError, match="model.family='nosuch:thing'"):
        forkpop.run("digits", overrides={"model.family": "nosuch:thing", "run.run_dir": str(tmp_path)}, tracking=False)
    assert list(tmp_path.iterdir()) == []


def test_the_example_runs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "own_model_and_data.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    acc = float(p.stdout.split("final seed test accuracy ")[1].split()[0])
    assert acc > 0.8 and "engine: stacked" in p.stdout
    assert "lineage of the final seed:" in p.stdout and "(the initial seed)" in p.stdout
    assert "distilled from" in p.stdout and list(tmp_path.iterdir()) == []  # all in a temporary folder


def test_only_forkpop_imports_outside_the_repository(tmp_path):
    code = (
        "import importlib\n"
        "for name in ('experiments', 'workers', 'selection', 'population'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        print('no', name)\n"
        "    else:\n"
        "        print('yes', name)\n"
        "import forkpop\n"
        "print('forkpop', callable(forkpop.run), callable(forkpop.load), forkpop.Result.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:5] == [
        "no experiments",
        "no workers",
        "no selection",
        "no population",
        "forkpop True True Result",
    ]
