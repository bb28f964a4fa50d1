import subprocess
import sys
from pathlib import Path

import pytest
from forkpop.experiments.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "experiments" / "configs" / "digits.yaml"


def test_bundled_config_loads_and_overrides_apply():
    cfg = load_config(DIGITS, ["population.size=32", "data.alpha=0.1", "population.genes.lr.init=0.02"], seed=3)
    assert cfg.population.size == 32 and cfg.n_niches == 16  # the bundled config fixes 16 niches
    assert cfg.data.alpha == 0.1 and cfg.run.seed == 3
    # a partial gene override keeps the gene's other fields and the other genes
    assert cfg.population.genes["lr"].init == 0.02 and cfg.population.genes["lr"].kind == "log"
    assert "epochs" in cfg.population.genes


BAD = [
    (["populaton.size=3"], "unknown key 'populaton'"),
    (["population.sise=3"], "unknown key 'population.sise'"),
    (["population.size=-1"], "population.size: Input should be greater than or equal to 1"),
    (["data.alpha=0"], "data.alpha: Input should be greater than 0"),
    (["data.alpha=-2"], "data.alpha"),
    (["population.genes.lr.low=0.9"], "population.genes.lr: Value error, low 0.9 > high"),
    (["population.genes.epochs.low=5", "population.genes.epochs.high=2"], "low 5.0 > high 2.0"),
    (["selection.k=40"], "selection.k=40 exceeds population.size=32"),
    (["model.family=resnet"], "model.family"),
    (["run.backend=spark"], "run.backend"),
    (["data.partition=zipf"], "data.partition"),
    (["data.batch_size=0"], "data.batch_size"),
    (["run.generations=zero"], "run.generations"),
    (["data.source=file"], "data.path is not set"),
    (["noequals"], "write key=value"),
    (["run.seed.x=1"], "run.seed is a value, not a section"),
]


@pytest.mark.parametrize("overrides, needle", BAD)
def test_bad_configs_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(DIGITS, overrides)
    msg = str(e.value)
    assert needle.replace("Value error, ", "") in msg and "\n" not in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)


def _forkpop(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", str(DIGITS), "--set", "populaton.size=3"], "unknown key 'populaton'"),
        (["run", str(DIGITS), "--set", "population.size=-4"], "population.size"),
        (["run", str(DIGITS), "--set", "data.alpha=0"], "data.alpha"),
        (["run", "missing.yaml"], "not found"),
        (["run", str(DIGITS), "--set", "population.genes.lr.low=0.9"], "low 0.9 > high"),
        (["run", str(DIGITS), "--set", "data.source=file", "--set", "data.path=/nope.npz"], "not a readable file"),
        (["run", str(DIGITS), "--seed", "abc"], "invalid int value"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, args, needle):
    p = (
        _forkpop(*args, "--set", f"run.run_dir={tmp_path}/runs", "--backend", "local", cwd=tmp_path)
        if args[0] == "run"
        else _forkpop(*args, cwd=tmp_path)
    )
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_cli_without_command_and_help(tmp_path):
    p = _forkpop(cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip() == (
        "forkpop: the following arguments are required: command; see forkpop --help"
    )
    h = _forkpop("run", "--help", cwd=tmp_path)
    assert h.returncode == 0 and "--summary" in h.stdout and "--set" in h.stdout


def test_bundled_config_by_name():
    from forkpop.experiments.cli import _resolve_config

    assert Path(_resolve_config("digits")) == DIGITS
    assert _resolve_config("my.yaml") == "my.yaml"


def _files(tmp_path):
    import numpy as np

    np.savez(tmp_path / "nox.npz", a=np.zeros((4, 2)), y=np.zeros(4))
    np.savez(tmp_path / "nan.npz", x=np.full((40, 2), np.nan), y=np.arange(40) % 2)
    (tmp_path / "bad.csv").write_text("1,2,x\n3,4,\n")
    (tmp_path / "list.yaml").write_text("- run\n")
    (tmp_path / "broken.yaml").write_text("run: {seed: [1\n")
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    (tmp_path / "study.yaml").write_text("base: digits\nmodes: {a: {run: {seeds: 3}}}\n")


@pytest.mark.chaos
@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", str(DIGITS), "--set", "selection.k=40"], "exceeds population.size"),
        (["run", str(DIGITS), "--set", "model.family=transformer"], "model.family"),
        (["run", str(DIGITS), "--set", "data.n_niches=5000"], "lower data.n_niches"),
        (["run", str(DIGITS), "--set", "data.poison.niches=40", "--set", "data.poison.kind=label_flip"], "niches"),
        (["run", str(DIGITS), "--set", "data.poison.kind=backdoor"], "set data.poison.niches"),
        (
            [
                "run",
                str(DIGITS),
                "--set",
                "data.poison.kind=backdoor",
                "--set",
                "data.poison.niches=2",
                "--set",
                "data.poison.target=11",
            ],
            "is not a class",
        ),
        (["run", str(DIGITS), "--set", "selection.species=40"], "selection.species=40 exceeds"),
        (["run", str(DIGITS), "--set", "population.size"], "write key=value"),
        (["run", str(DIGITS), "--set", "data.source=file", "--set", "data.path=nox.npz"], "arrays named 'x' and 'y'"),
        (["run", str(DIGITS), "--set", "data.source=file", "--set", "data.path=nan.npz"], "NaN"),
        (["run", str(DIGITS), "--set", "data.source=file", "--set", "data.path=bad.csv"], "could not be read"),
        (["run", "list.yaml"], "mapping of sections"),
        (["run", "broken.yaml"], "not valid YAML"),
        (["run", "loop.yaml"], "includes itself"),
        (["run", str(DIGITS), "--set", "run.engine=turbo"], "run.engine"),
        (["run", str(DIGITS), "--set", "data.n_niches=32", "--set", "population.size=32"], "fewer samples (the least"),
        (["run", str(DIGITS), "--set", "distill.generated.min_real_fraction=2"], "distill.generated.min_real_fraction"),
        (["run", str(DIGITS), "--set", "data.audit.mode=maybe"], "data.audit.mode"),
        (["run", str(DIGITS), "--set", "distill.aggregate=vote"], "distill.aggregate"),
        (["study", "nosuchstudy"], "no study 'nosuchstudy'"),
        (["study", "study.yaml"], "unknown key 'run.seeds'"),
        (["lineage", "abc"], "no runs/mlflow.db here"),
        (["analyze", "abc", "--out", "x", "--tracking-uri", "sqlite:///m.db"], "no MLflow run 'abc'"),
    ],
)
def test_more_bad_inputs_are_one_line_and_status_2(tmp_path, args, needle):
    _files(tmp_path)
    test_cli_bad_input_is_one_line_and_status_2(tmp_path, args, needle)


def test_secrets_never_reach_the_record():
    from forkpop.experiments.tracking import redact

    assert redact("tracking.uri", "http://alice:s3cret@mlflow.example:5000") == "http://***@mlflow.example:5000"
    assert redact("run.address", "ray://bob:pw@head:10001") == "ray://***@head:10001"
    assert redact("data.api_token", "abc") == "***" and redact("db_password", "x") == "***"
    assert redact("tracking.uri", "sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_secrets_in_the_config_are_not_written_to_mlflow(tmp_path):
    from forkpop.experiments.runner import PopulationRun
    from mlflow import MlflowClient

    from tests.conftest import tiny_config

    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = tiny_config(tmp_path, run={"generations": 1, "address": "ray://carol:hunter2@127.0.0.1:10001"})
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"backend": "local"})})
    s = PopulationRun(cfg, tracking_uri=uri, progress=False).run()
    run = MlflowClient(uri).get_run(s.mlflow_run_id)
    blob = repr(run.data.params) + repr(run.data.tags)
    assert "hunter2" not in blob and "ray://***@127.0.0.1:10001" in blob
    # Nor in any artifact (the config, lineage, diversity and step files).
    import mlflow

    out = mlflow.artifacts.download_artifacts(run_id=s.mlflow_run_id, dst_path=str(tmp_path / "art"), tracking_uri=uri)
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    assert not [p for p in files if "hunter2" in p.read_text(errors="replace")]


def test_an_unauthenticated_remote_ray_is_refused_unless_asked(monkeypatch):
    from forkpop.workers.pool import ClusterError
    from forkpop.workers.ray_pool import check_address

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ClusterError, match="--allow-unauthenticated-ray"):
        check_address("10.0.0.5:6379")
    check_address("10.0.0.5:6379", allow_insecure=True)
    check_address("127.0.0.1:6379")
    check_address("ray://localhost:10001")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    check_address("10.0.0.5:6379")
    # Unset, as Ray does: token authentication only when a token is there to send.
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("HOME", "/nonexistent-forkpop-home")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    with pytest.raises(ClusterError, match="token authentication is not configured"):
        check_address("10.0.0.5:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret-token-value")
    check_address("10.0.0.5:6379")


def test_loading_a_config_does_not_import_torch_and_knows_the_built_in_families():
    # The MLflow writer starts after the config has loaded: torch's import (seconds) must not come first.
    code = (
        "import sys; from forkpop.experiments.config import load_config, BUILTIN_FAMILIES;"
        "load_config('experiments/configs/digits.yaml'); assert 'torch' not in sys.modules, 'torch imported';"
        "from forkpop.population.models import MODEL_FAMILIES;"
        "assert set(BUILTIN_FAMILIES) <= set(MODEL_FAMILIES), (BUILTIN_FAMILIES, sorted(MODEL_FAMILIES));"
        "from forkpop.experiments.config import BUILTIN_PLUGINS; from forkpop import plugins;"
        "import forkpop.selection.strategies, forkpop.selection.distiller;"
        "missing = [(k, n) for k, ns in BUILTIN_PLUGINS.items() for n in ns if not plugins.known(k, n)];"
        "assert not missing, missing"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
