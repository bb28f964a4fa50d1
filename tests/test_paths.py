"""Paths built from config values stay inside their root: run names and ``contained``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from forkpop.experiments.config import ConfigError, contained, load_config

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "configs" / "digits.yaml"
ESCAPES = ["../x", "../../etc", "a/b", "/etc/forkpop", "..", "a\\b", "runs/../../x"]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_names_that_leave_run_dir_are_refused(name):
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, [f"run.name={name}"])
    msg = str(e.value)
    assert msg.startswith("run.name: must be one folder name") and repr(name) in msg and "\n" not in msg


def test_a_control_character_in_a_run_name_is_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('base: digits\nrun: {name: "a\\nb"}\n')
    with pytest.raises(ConfigError, match="run.name"):
        load_config(cfg)


@pytest.mark.parametrize("name", ["digits", "digits-poisoned", "study-nsga2", "run_2.5", "..hidden-but-inside"])
def test_plain_run_names_still_work(name, tmp_path):
    cfg = load_config(DIGITS, [f"run.name={name}", f"run.run_dir={tmp_path}/runs"])
    assert cfg.run.name == name
    folder = Path(cfg.run.run_dir) / f"{cfg.run.name}-s{cfg.run.seed}-20250101-000000-000000"
    assert folder.resolve().parent == (tmp_path / "runs").resolve()


def test_run_dir_itself_may_be_absolute(tmp_path):
    assert load_config(DIGITS, [f"run.run_dir={tmp_path}/runs"]).run.run_dir == f"{tmp_path}/runs"


@pytest.mark.parametrize("relative", ["../x", "/abs/x", "a/../../b", "a/..", "", "a\\..\\b", "a\x00b"])
def test_contained_refuses_paths_out_of_root(relative, tmp_path):
    with pytest.raises(ConfigError) as e:
        contained(tmp_path, relative, "report.name")
    assert str(e.value).startswith(f"report.name={relative!r} must stay inside") and "\n" not in str(e.value)


@pytest.mark.parametrize("relative", ["x", "a/b", "a/./b.json", "gen-0001/state.json"])
def test_contained_keeps_paths_in_root(relative, tmp_path):
    p = contained(tmp_path, relative)
    assert p == tmp_path / relative and p.resolve().is_relative_to(tmp_path.resolve())


def test_cli_refuses_an_escaping_run_name_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--set", "run.name=../x"]
        + ["--set", f"run.run_dir={tmp_path}/runs", "--backend", "local"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("forkpop: run.name: must be one folder name"), p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()
