"""Plug-in models: by registered name, import path or entry point; options; engines; errors; Ray."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from forkpop.experiments.cli import main
from forkpop.experiments.config import ConfigError, build_config
from forkpop.experiments.specs import model_spec
from forkpop.population.models import MODEL_FAMILIES, build_model, flat_weights
from forkpop.workers import DataSpec, GroupLearner, LearnerSpec, ModelSpec
from forkpop.workers.engine import plan_engine
from torch import nn

from forkpop import plugins

USER_MODELS = """
from torch import nn

CALLS = []


def wide(n_features, n_classes, width=32, **kw):
    CALLS.append(dict(kw, width=width))
    return nn.Sequential(nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, n_classes))


def no_hidden(n_features, n_classes):
    return nn.Linear(n_features, n_classes)


class Residual(nn.Module):
    def __init__(self, n_features, n_classes, hidden=(16,)):
        super().__init__()
        self.inp = nn.Linear(n_features, hidden[0])
        self.block = nn.Linear(hidden[0], hidden[0])
        self.out = nn.Linear(hidden[0], n_classes)

    def forward(self, x):
        h = self.inp(x).relu()
        return self.out(h + self.block(h).tanh())


def with_batchnorm(n_features, n_classes):
    return nn.Sequential(nn.Linear(n_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_classes))


def broken(n_features, n_classes):
    raise RuntimeError("width must be even\\nsecond line")


def not_a_model(n_features, n_classes):
    return "a string"
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's models in ``tmp_path`` (on ``sys.path``), under a fresh name."""
    name = f"usermodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_registered_name_builds_and_is_a_valid_family(tmp_path):
    def tiny(in_dim, n_classes, hidden=(4,)):
        return nn.Sequential(nn.Linear(in_dim, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], n_classes))

    plugins.register("models", "_tiny", tiny)
    try:
        assert "_tiny" in MODEL_FAMILIES and "_tiny" in plugins.registered("models")
        m = build_model("_tiny", 6, 3, (5,), seed=1)
        assert m[0].out_features == 5 and m(torch.zeros(2, 6)).shape == (2, 3)
        assert torch.equal(flat_weights(m), flat_weights(build_model("_tiny", 6, 3, (5,), seed=1)))
        assert build_config({"model": {"family": "_tiny"}}).model.family == "_tiny"
    finally:
        del MODEL_FAMILIES["_tiny"]
    with pytest.raises(ConfigError, match="model.family: unknown model family '_tiny'"):
        build_config({"model": {"family": "_tiny"}})


def test_an_import_path_builds_with_options_and_without_hidden(user_module):
    m = build_model(f"{user_module}:wide", 64, 10, (99,), seed=0, options={"width": 7})
    assert m[0].out_features == 7 and m(torch.zeros(3, 64)).shape == (3, 10)
    calls = sys.modules[user_module].CALLS
    assert calls[-1] == {"hidden": (99,), "width": 7}  # **kw takes hidden too
    assert isinstance(build_model(f"{user_module}:no_hidden", 64, 10, (8,)), nn.Linear)  # not given hidden
    assert build_model(f"{user_module}:Residual", 64, 10, (12,)).block.in_features == 12
    # The same seed, the same weights; the global RNG is untouched.
    state = torch.random.get_rng_state()
    a = build_model(f"{user_module}:wide", 64, 10, seed=5)
    assert torch.equal(flat_weights(a), flat_weights(build_model(f"{user_module}:wide", 64, 10, seed=5)))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    "attr, options, needle",
    [
        ("broken", {}, "broken(64, 10, ...) raised RuntimeError: width must be even"),
        ("not_a_model", {}, "returned a str, not a torch.nn.Module"),
        ("no_hidden", {"width": 3}, "takes no keyword arguments ['width']; remove them from model.options"),
        ("nothing_here", {}, "has no 'nothing_here'"),
    ],
)
def test_a_failing_factory_is_one_line_naming_model_family(user_module, attr, options, needle):
    with pytest.raises(plugins.PluginError) as e:
        build_model(f"{user_module}:{attr}", 64, 10, options=options)
    msg = str(e.value)
    assert msg.startswith(f"model.family='{user_module}:{attr}': ") and needle in msg and "\n" not in msg


def test_a_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "badsyntax_mod.py").write_text("def f(:\n")
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, needle in [
        ("nosuch_mod_xyz:f", "cannot import module 'nosuch_mod_xyz'"),
        ("badsyntax_mod:f", "importing module 'badsyntax_mod' failed (SyntaxError"),
        ("raising_mod:f", "RuntimeError: no GPU here"),
    ]:
        with pytest.raises(plugins.PluginError) as e:
            build_model(name, 64, 10)
        assert needle in str(e.value) and "\n" not in str(e.value)


def test_entry_points_of_an_installed_distribution(tmp_path, monkeypatch):
    dist = tmp_path / "fake_forkpop_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-forkpop-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[forkpop.models]\nep_net = ep_models_mod:net\nep_broken = ep_missing:net\n")
    (tmp_path / "ep_models_mod.py").write_text(
        "from torch import nn\n\ndef net(n_features, n_classes, depth=1):\n"
        "    return nn.Sequential(*[nn.Linear(n_features, n_features) for _ in range(depth)],"
        " nn.Linear(n_features, n_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "ep_net" in plugins.entry_point_names("models")
        m = build_model("ep_net", 5, 2, options={"depth": 2})
        assert len(m) == 3 and plan_engine(m, 5, 2).kind == "stacked"
        cfg = build_config({"model": {"family": "ep_net", "options": {"depth": 2}}})
        assert model_spec(cfg).kwargs == {"depth": 2} and model_spec(cfg).import_roots == ()
        with pytest.raises(plugins.PluginError, match="the entry point 'ep_missing:net' of group 'forkpop.models'"):
            build_model("ep_broken", 5, 2)
        with pytest.raises(ConfigError, match="ep_net"):  # the choices name the installed ones
            build_config({"model": {"family": "resnet"}})
    finally:
        sys.modules.pop("ep_models_mod", None)


def test_import_roots_of_a_module_and_of_a_package(tmp_path, monkeypatch):
    pkg = tmp_path / "roots_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from torch import nn\n\ndef top(n, c):\n    return nn.Linear(n, c)\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("from torch import nn\n\ndef net(n, c):\n    return nn.Linear(n, c)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert plugins.import_roots("roots_pkg:top") == (str(tmp_path.resolve()),)
        assert plugins.import_roots("roots_pkg.sub.deep:net") == (str(tmp_path.resolve()),)
        assert plugins.import_roots("mlp") == () and plugins.import_roots("forkpop.population.models:mlp") == ()
    finally:
        for k in [k for k in sys.modules if k.startswith("roots_pkg")]:
            del sys.modules[k]


def test_a_module_in_the_current_directory_imports(tmp_path, monkeypatch):
    """As the ``forkpop`` script runs (its folder, not the current one, on sys.path)."""
    (tmp_path / "cwd_models_mod.py").write_text("from torch import nn\n\ndef net(n, c):\n    return nn.Linear(n, c)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd(), str(tmp_path))])
    try:
        assert isinstance(build_model("cwd_models_mod:net", 4, 2), nn.Linear)
        assert plugins.import_roots("cwd_models_mod:net") == (str(tmp_path.resolve()),)
    finally:
        sys.modules.pop("cwd_models_mod", None)


def test_options_travel_in_a_hashable_picklable_spec(user_module, tmp_path):
    cfg = build_config({"model": {"family": f"{user_module}:wide", "options": {"width": 9}}})
    spec = model_spec(cfg)
    assert spec.kwargs == {"width": 9} and spec.import_roots == (str(tmp_path.resolve()),)
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec))) and ModelSpec("x", (), {"a": [1]}).kwargs == {"a": [1]}
    learner = GroupLearner(LearnerSpec(DataSpec(n_niches=4), spec, batch_size=16))
    assert learner.model[0].out_features == 9 and learner.plan.kind == "stacked"


@pytest.mark.parametrize("attr, kind", [("wide", "stacked"), ("Residual", "vmap"), ("with_batchnorm", "loop")])
def test_user_models_batch_when_they_can(user_module, attr, kind):
    plan = plan_engine(build_model(f"{user_module}:{attr}", 64, 10), 64, 10)
    assert plan.kind == kind, plan.reason
    if kind == "loop":
        assert "buffers" in plan.reason


def test_an_unknown_family_exits_2_with_one_line_before_anything_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for family, needle in [
        ("nosuch:thing", "forkpop: model.family='nosuch:thing': cannot import module 'nosuch'"),
        ("nosuch", "forkpop: model.family: unknown model family 'nosuch'"),
    ]:
        rc = main(["run", "digits", "--set", f"model.family={family}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(needle) and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no m.db


def test_a_plugin_error_is_not_a_config_error():
    """Resolution fails when the run starts, as a PluginError the CLI reports (not swallowed)."""
    cfg = build_config({"model": {"family": "nosuch_mod_xyz:thing"}})
    with pytest.raises(plugins.PluginError, match="model.family='nosuch_mod_xyz:thing'"):
        model_spec(cfg)
    assert not issubclass(plugins.PluginError, ConfigError)


@pytest.mark.ray
def test_a_user_model_in_the_current_directory_learns_on_ray_actors(tmp_path):
    """mymodels.py sits in the working directory, not on PYTHONPATH: the actors import it
    through the spec's import roots, and its Linear/Tanh chain learns on the stacked engine."""
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            def wide(n_features, n_classes, width=48, **kw):
                return nn.Sequential(nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, n_classes))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    summary = tmp_path / "s.json"
    cmd = [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--quiet"]
    for s in [
        "model.family=mymodels:wide",
        "run.generations=1",
        "population.size=4",
        "data.n_niches=4",
        "run.backend=ray",
        "run.workers=2",
        "run.num_cpus=2",
        f"run.run_dir={tmp_path}/runs",
    ]:
        cmd += ["--set", s]
    cmd += ["--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--summary", str(summary)]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(summary.read_text())
    assert [w["engine"] for w in out["workers"]] == ["stacked", "stacked"], out["workers"]
    assert out["seed_test_accuracy"] > 0.3


@pytest.mark.ray
def test_actors_import_a_user_module_through_the_specs_import_roots(ray_session, user_module, tmp_path):
    """Ray started before the module's folder joined sys.path here, so the actors know it only
    from the spec's import roots; without them an actor cannot build the model."""
    from forkpop.workers.ray_pool import RayPool

    cfg = build_config({"model": {"family": f"{user_module}:wide", "options": {"width": 11}}})
    spec = model_spec(cfg)
    assert spec.import_roots == (str(tmp_path.resolve()),)
    pool = RayPool(LearnerSpec(DataSpec(n_niches=4), spec, 16), n_workers=1)
    try:
        assert [w["engine"] for w in pool.describe()] == ["stacked"]
    finally:
        pool.close()
    bare = RayPool(LearnerSpec(DataSpec(n_niches=4), ModelSpec(spec.family, (), spec.options), 16), n_workers=1)
    try:
        with pytest.raises(Exception, match="cannot import module"):
            bare.describe()
    finally:
        bare.close()
