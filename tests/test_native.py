"""The native CPU kernel: built here, equal to the torch paths, and a torch fallback that says why."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forkpop.population import build_model, flat_weights, native
from forkpop.selection.distill import distill
from forkpop.workers import DataSpec, GroupLearner, LearnerSpec, ModelSpec
from torch import nn

from tests.conftest import require_native

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _native_here():
    require_native()


def test_the_kernel_builds_on_this_machine():
    lib, why = native.kernel()
    assert lib is not None, why
    assert any(p.name.startswith("mlp-") and p.suffix == ".so" for p in native.cache_dir().iterdir())


@pytest.mark.parametrize("family,hidden", [("mlp", (32,)), ("mlp", (13, 9)), ("linear", ())])
@pytest.mark.parametrize("probed", [True, False])
def test_native_distillation_equals_the_torch_loops(family, hidden, probed):
    g = torch.Generator().manual_seed(0)
    model = build_model(family, 64, 10, hidden, seed=0)
    init = flat_weights(model)
    teachers = init + 0.05 * torch.randn(3, init.numel(), generator=g)
    x = torch.randn(300, 64, generator=g)
    extra = (torch.randn(40, 64, generator=g), torch.softmax(torch.randn(40, 10, generator=g), 1))
    probe = (torch.randn(90, 64, generator=g), torch.randint(0, 10, (90,), generator=g)) if probed else None
    out = {}
    for kernel in ("torch", "auto"):
        gen = torch.Generator().manual_seed(1)
        w, losses = distill(
            model, init.clone(), teachers, [0.9, 0.8, 0.7], x, steps=60, lr=3e-3, batch_size=64, generator=gen,
            probe=probe, eval_every=10, extra=extra, kernel=kernel,
        )  # fmt: skip
        out[kernel] = (w, losses, gen.get_state())
    (w1, l1, s1), (w2, l2, s2) = out["torch"], out["auto"]
    assert torch.equal(s1, s2)  # the same batches drawn: what comes after the distillation is unchanged
    assert len(l1) == len(l2) == 60
    assert max(abs(a - b) for a, b in zip(l1, l2, strict=True)) < 1e-4
    assert torch.allclose(w1, w2, atol=2e-5), (w1 - w2).abs().max()
    assert not torch.equal(w2, init)


def test_a_model_the_kernel_does_not_take_learns_on_torch_and_says_why():
    two_acts = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Tanh(), nn.Linear(16, 10))
    assert native.native_layout(two_acts) is None
    assert native.native_layout(nn.Sequential(nn.Linear(64, 16), nn.ReLU())) is None  # ends in an activation
    spec = LearnerSpec(DataSpec(n_niches=2), ModelSpec("mlp", (16,)), batch_size=16)
    assert GroupLearner(spec).describe()["kernel"] == "native"
    w0 = flat_weights(two_acts)
    w, _ = distill(two_acts, w0, w0[None], [1.0], torch.randn(50, 64), steps=3, generator=torch.Generator())
    assert w.shape == w0.shape and not torch.equal(w, w0)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300
    )


def test_without_the_kernel_the_engine_runs_torch_and_run_kernel_native_says_what_to_change(tmp_path):
    probe = (
        "from forkpop.workers import DataSpec, GroupLearner, LearnerSpec, ModelSpec;"
        "d = GroupLearner(LearnerSpec(DataSpec(n_niches=2), ModelSpec('mlp', (16,)))).describe();"
        "print(d['kernel'], '|', d['kernel_reason'])"
    )
    off = _python(probe, FORKPOP_NATIVE="0")
    assert off.returncode == 0 and off.stdout.strip() == "torch | FORKPOP_NATIVE=0", off.stderr[-2000:]
    # a compiler that fails: the build's reason, never a half-written library in the cache
    broken = _python(probe, CC="false", FORKPOP_CACHE=str(tmp_path / "c"), PATH=str(tmp_path))
    assert broken.returncode == 0, broken.stderr[-2000:]
    assert broken.stdout.startswith("torch | ") and "C compiler" in broken.stdout or "did not build" in broken.stdout
    assert not list((tmp_path / "c").rglob("*.so"))
    cli = subprocess.run(
        [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--quiet", "--backend", "local",
         "--set", "run.kernel=native", "--set", "run.generations=1", "--set", "population.size=2"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "FORKPOP_NATIVE": "0", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )  # fmt: skip
    assert cli.returncode == 2, cli.stderr[-3000:]
    assert cli.stderr.strip().splitlines() == [
        "forkpop: run.kernel=native: FORKPOP_NATIVE=0; use run.kernel=auto or torch"
    ], cli.stderr[-3000:]


def test_processes_building_at_once_share_one_library(tmp_path):
    code = "from forkpop.population import native; lib, why = native.kernel(); print(lib is not None, why)"
    env = {**os.environ, "FORKPOP_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert outs == ["True"] * 3
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built  # no temporary file left behind
