"""The batched engine against the per-variant loop: same weights, curves and verdicts."""

import numpy as np
import pytest
import torch
from forkpop.population import build_model, flat_weights
from forkpop.population.models import MODEL_FAMILIES
from forkpop.workers import DataSpec, ForkTask, GroupLearner, LearnerSpec, ModelSpec
from forkpop.workers import engine as engine_mod
from forkpop.workers.engine import BatchedEngine, plan_engine, resolve_device
from torch import nn

from tests.conftest import require_native

DATA = DataSpec(n_niches=6, alpha=0.5)

# Different learning rates, momenta, weight decays, epochs and niches (of different sizes,
# with short last batches); the last one diverges.
GENOMES = [
    {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-5, "epochs": 3, "fork_noise": 0.01},
    {"lr": 0.2, "momentum": 0.0, "weight_decay": 0.0, "epochs": 1, "fork_noise": 0.02, "clip": 0.5},
    {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-3, "epochs": 2, "fork_noise": 0.0},
    {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-4, "epochs": 4, "fork_noise": 0.01, "clip": 2.0},
    {"lr": 0.03, "momentum": 0.95, "weight_decay": 1e-2, "epochs": 2, "fork_noise": 0.03},
    {"lr": 1e3, "momentum": 0.99, "weight_decay": 0.0, "epochs": 5, "fork_noise": 0.0},
]
TASKS = [ForkTask(f"v{i}", (2 * i + 1) % 6, g, 100 + i) for i, g in enumerate(GENOMES)]
# No clip gene in the group: the stacked engine's fused step (gradients added straight into
# the momentum buffers) instead of the one that clips whole gradients first.
UNCLIPPED = [ForkTask(t.variant_id, t.niche, {k: v for k, v in t.genome.items() if k != "clip"}, t.seed) for t in TASKS]


@pytest.fixture
def torch_threads():
    """Restores the process's torch thread count (a learner sets it) after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _learn(family, hidden, engine, tasks=TASKS, threads=1, kernel="auto"):
    if kernel == "native":
        require_native()
    spec = LearnerSpec(
        DATA, ModelSpec(family, hidden), batch_size=16, torch_threads=threads, engine=engine, kernel=kernel
    )
    learner = GroupLearner(spec)
    d = learner.data
    w0 = flat_weights(build_model(family, d.n_features, d.n_classes, hidden, seed=3))
    w, res = learner.learn(w0, tasks)
    return learner, w, res


def _assert_same(loop, batched, atol=2e-5):
    (w1, r1), (w2, r2) = loop, batched
    assert [r.variant_id for r in r1] == [r.variant_id for r in r2]
    assert [r.status for r in r1] == [r.status for r in r2]
    assert torch.allclose(w1, w2, atol=atol, rtol=1e-4), (w1 - w2).abs().max()
    for a, b in zip(r1, r2, strict=True):
        assert len(a.loss) == len(b.loss) and a.epoch_ends == b.epoch_ends and a.samples == b.samples
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a.preq_accuracy, b.preq_accuracy, atol=1e-12)
        if a.status == "ok":
            assert a.val_accuracy == pytest.approx(b.val_accuracy, abs=1e-6)
        else:
            assert a.reason.split(" at step")[0] == b.reason.split(" at step")[0]
            assert a.reason.split(" at step ")[1].split()[0] == b.reason.split(" at step ")[1].split()[0]


# The batched engine's two CPU kernels: forkpop's C kernel and the stacked torch ops.
KERNELS = pytest.mark.parametrize("kernel", ["native", "torch"])


@KERNELS
@pytest.mark.parametrize(
    "family,hidden,kind", [("mlp", (32,), "stacked"), ("mlp", (24, 16), "stacked"), ("linear", (), "stacked")]
)
def test_batched_engine_equals_the_loop(family, hidden, kind, kernel):
    learner, *batched = _learn(family, hidden, "batched", kernel=kernel)
    assert learner.plan.kind == kind and learner.describe()["kernel"] == kernel
    _, *loop = _learn(family, hidden, "loop")
    _assert_same(loop, batched)
    assert batched[1][-1].status == "diverged" and sum(r.status == "ok" for r in batched[1]) == 5


@KERNELS
@pytest.mark.parametrize("family,hidden", [("mlp", (32,)), ("mlp", (24, 16)), ("linear", ())])
def test_the_fused_step_equals_the_loop(family, hidden, kernel):
    _, *batched = _learn(family, hidden, "batched", UNCLIPPED, kernel=kernel)
    _, *loop = _learn(family, hidden, "loop", UNCLIPPED)
    _assert_same(loop, batched)
    assert batched[1][-1].status == "diverged" and sum(r.status == "ok" for r in batched[1]) == 5


@KERNELS
def test_parts_on_threads_learn_exactly_as_one_stack(monkeypatch, torch_threads, kernel):
    """With two torch threads the group is dealt into one part per thread (torch kernel) or
    its variants onto two threads (native kernel); each variant learns bit for bit as on
    one, and the thread count is back after."""
    monkeypatch.setattr(engine_mod, "MIN_PART", 1)
    for tasks in (TASKS, UNCLIPPED):
        _, w1, r1 = _learn("mlp", (24, 16), "batched", tasks, threads=1, kernel=kernel)
        learner, w2, r2 = _learn("mlp", (24, 16), "batched", tasks, threads=2, kernel=kernel)
        assert learner.engine._n_parts(len(tasks)) == 2 and torch.get_num_threads() == 2
        assert torch.equal(w1, w2)
        assert [r.loss for r in r1] == [r.loss for r in r2] and [r.status for r in r1] == [r.status for r in r2]
        assert [r.preq_accuracy for r in r1] == [r.preq_accuracy for r in r2]
        assert [r.val_accuracy for r in r1] == pytest.approx([r.val_accuracy for r in r2], nan_ok=True)


def test_only_stacked_groups_split_into_parts(torch_threads):
    """functional_call swaps the one shared module's parameters: a vmap group never splits."""
    spec = LearnerSpec(DATA, ModelSpec("cnn", (4, 8)), batch_size=16, torch_threads=2, engine="batched")
    learner = GroupLearner(spec)
    assert learner.plan.kind == "vmap" and learner.engine._n_parts(64) == 1
    learner = GroupLearner(LearnerSpec(DATA, ModelSpec("mlp", (32,)), batch_size=16, torch_threads=2))
    two = 2 * engine_mod.MIN_PART  # variants enough for two parts
    assert [learner.engine._n_parts(n) for n in (1, two - 1, two, 64)] == [1, 1, 2, 2]


def test_models_torch_func_batches_equal_the_loop():
    """A conv net is no Linear chain: it goes through torch.func and still matches the loop."""
    learner, *batched = _learn("cnn", (4, 8), "batched", TASKS[:3])
    assert learner.plan.kind == "vmap"
    _, *loop = _learn("cnn", (4, 8), "loop", TASKS[:3])
    _assert_same(loop, batched, atol=5e-5)


class _Activations(nn.Sequential):
    def __init__(self, in_dim, n_classes, hidden=()):
        super().__init__(
            nn.Flatten(),
            nn.Linear(in_dim, 20),
            nn.Tanh(),
            nn.Linear(20, 16),
            nn.LeakyReLU(0.1),
            nn.Linear(16, 12),
            nn.Sigmoid(),
            nn.Dropout(0.0),
            nn.Linear(12, n_classes, bias=False),
        )


class _WithBatchNorm(nn.Module):
    def __init__(self, in_dim, n_classes, hidden=()):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_classes))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def extra_families():
    MODEL_FAMILIES["_act"] = _Activations
    MODEL_FAMILIES["_bn"] = _WithBatchNorm
    yield
    del MODEL_FAMILIES["_act"], MODEL_FAMILIES["_bn"]


@KERNELS
@pytest.mark.parametrize("tasks", [TASKS[:4], UNCLIPPED[:4]], ids=["clipped", "fused"])
def test_every_supported_activation_batches_exactly(extra_families, tasks, kernel):
    learner, *batched = _learn("_act", (), "batched", tasks, kernel=kernel)
    assert learner.plan.kind == "stacked" and learner.describe()["kernel"] == kernel
    _, *loop = _learn("_act", (), "loop", tasks)
    _assert_same(loop, batched)


def test_a_model_with_buffers_falls_back_to_the_loop_and_says_why(extra_families):
    plan = plan_engine(_WithBatchNorm(64, 10), 64, 10)
    assert plan.kind == "loop" and "buffers" in plan.reason and "running_mean" in plan.reason
    learner, w, res = _learn("_bn", (), "batched", TASKS[:2])
    assert learner.engine is None and learner.plan.kind == "loop"
    assert w.shape[0] == 2 and all(r.status == "ok" for r in res)
    with pytest.raises(ValueError, match="cannot train this model"):
        BatchedEngine(_WithBatchNorm(64, 10), plan, *[torch.zeros(1)] * 4, [], 16)


@pytest.mark.parametrize("tasks", [TASKS, UNCLIPPED], ids=["clipped", "fused"])
def test_the_batched_engine_is_deterministic_and_order_free(tasks):
    _, w1, r1 = _learn("mlp", (32,), "batched", tasks)
    _, w2, r2 = _learn("mlp", (32,), "batched", tasks[::-1])
    assert torch.equal(w1, w2.flip(0))
    assert [r.loss for r in r1] == [r.loss for r in r2[::-1]]


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto").type == "cuda"
    else:
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="run.device"):
        resolve_device("tpu")


def test_a_clip_gene_caps_the_gradient_and_tames_a_huge_learning_rate():
    wild = {"lr": 50.0, "momentum": 0.9, "weight_decay": 0.0, "epochs": 3, "fork_noise": 0.0}
    tasks = [ForkTask("free", 0, wild, 1), ForkTask("clipped", 0, {**wild, "clip": 0.01}, 1)]
    for engine in ("loop", "batched"):
        _, _, (free, clipped) = _learn("mlp", (32,), engine, tasks)
        assert free.status == "diverged" and clipped.status == "ok", (engine, free.reason, clipped.reason)
