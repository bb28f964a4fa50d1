"""The GPU benchmark: forkpop's batched engines on one card, in one short run (~3 minutes).

    python benchmarks/gpu.py [--device cuda|cpu] [--quick] [--json PATH] [--budget-s 200]
                             [--only gemm,membw,learner,bmm,graph,lm,compile] [--resume]
    bash benchmarks/gpu_run.sh            # on the lent GPU machine: everything, JSON into $OUT/

Rows, in the order they run (most wanted first, so that a run cut short keeps the most):

- ``gemm`` / ``membw``: a large square matrix product (fp32, TF32, bf16; 2 n^3 FLOP) and a
  device-to-device copy (bytes read + written), the card's ceilings that the ratios use;
- ``mlp / learner``: forkpop's own ``GroupLearner`` (the batched engine, as a worker runs it:
  fork noise on the host, niche streams with short last batches, divergence checks,
  prequential records, validation) training N digits MLPs (64 -> 128 -> 10, ReLU, SGD with
  per-variant lr / momentum / weight decay, batches of 32) for about ``--steps`` steps;
  ``engine_samples_per_s`` is ``BatchedEngine.train`` alone (no forking on the host);
- ``mlp / bmm``: the hand-written reference step (forward, backward and SGD written out as
  batched matrix products, full batches, no metrics; the one of ``throughput.py``), eager;
- ``mlp / bmm_graph`` and ``bmm_graph10``: the same step captured in a ``torch.cuda.CUDAGraph``
  with static buffers (the batch indices are read through a device-side counter), replayed one
  step (``graph``) or ten steps (``graph10``) per launch: what is left once kernel launches
  stop dominating at small N;
- ``lm / population``: ``PopulationLM`` (the byte-level transformer population engine, default
  ``LMConfig``) at P variants, ``--lm-batch`` windows of 64 bytes each per step, AdamW;
- ``mlp / bmm_compile``: the reference step under ``torch.compile(mode="reduce-overhead")``
  (Inductor + CUDA graph trees); last, since compiling takes tens of seconds.

Every row runs in fp32 (TF32 off), TF32 (``torch.backends.cuda.matmul.allow_tf32``) and bf16
autocast (fp32 master weights) where that applies. FLOP/s:

- MLP: ``6 x (64*128 + 128*10) = 56,832`` FLOP per sample (forward 2 x 9,472 multiply-adds,
  backward counted as twice the forward). The exact matrix-product count is 40,448 (the first
  layer's input gradient is never computed), so the achieved figure is ~1.4x the true one;
  biases, softmax and SGD are not counted.
- LM: tokens/s x ``PopulationLM.flops_per_token()`` (6 x matmul weights + 12 x layers x T x D).

``ratio_to_gemm`` is a row's FLOP/s over the gemm row of the same precision. Targets (one H100 /
H200): >= 150 M samples/s at N = 8192 and >= 20 M at N = 64 (the printed table says which
rows meet them).

Robustness: every row is a ``try``; a failed row records its error and the run goes on. The JSON
is rewritten (atomically) as each row starts (``status: running``) and ends, so a run killed
mid-way keeps every finished row. ``--budget-s``: no row starts once the elapsed time plus the
row's estimate passes it. If the CUDA context itself breaks (an illegal access, ...) the
script exits with code 3; ``--resume`` then carries on in a fresh process with the rows not yet
done (a row left ``running`` by a dead process becomes ``crashed`` and is not retried).
On ``--device cpu`` (the tests) the CUDA-only rows are recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_forkpop() -> None:
    """forkpop, installed or not: in a bare checkout (the device machine) its subpackages
    ``forkpop.population`` / ``forkpop.workers`` are the folders at the repository root."""
    import forkpop

    try:
        import forkpop.population  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name not in ("forkpop.population", "forkpop.workers"):
            raise
        forkpop.__path__.append(str(ROOT))


_import_forkpop()

from forkpop.population import build_model, flat_weights  # noqa: E402
from forkpop.population.lm import LMConfig, PopulationLM, init_flat  # noqa: E402
from forkpop.workers import DataSpec, ForkTask, GroupLearner, LearnerSpec, ModelSpec, load_data  # noqa: E402
from forkpop.workers import data as _data  # noqa: E402

BATCH = 32
HIDDEN = (128,)
N_NICHES = 4  # ~280 samples each: 9 mini-batches per pass, the last one short
MLP_MACS = 64 * 128 + 128 * 10  # multiply-adds per sample, forward
MLP_FLOP_PER_SAMPLE = 6 * MLP_MACS  # fwd + bwd ~= 3 x 2 x multiply-adds
LM_CFG = LMConfig()
PRECISIONS = ("fp32", "tf32", "bf16")
TARGETS = {64: 20e6, 8192: 150e6}  # MLP samples/s on one H100 / H200

SIZES = {  # (device, quick) -> MLP sizes, LM sizes, steps, LM steps, LM batch, gemm n, membw MiB
    ("cuda", False): ([64, 256, 1024, 8192, 32768], [16, 64, 256, 1024], 100, 5, 8, 8192, 2048),
    ("cuda", True): ([64, 1024, 8192], [16, 256], 50, 3, 8, 4096, 1024),
    ("cpu", False): ([64, 256, 1024], [4, 16], 50, 2, 4, 1024, 256),
    ("cpu", True): ([4, 16], [2], 10, 1, 2, 512, 16),
}


class Skip(Exception):
    """A row that does not apply here (the reason goes into the row)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _best(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    """Best wall time (s) of ``repeats`` calls of ``run``."""
    best = math.inf
    for _ in range(max(1, repeats)):
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


@contextlib.contextmanager
def precision(prec: str):
    """TF32 matrix products on for ``tf32``, off otherwise; restored after.

    ``torch.backends.cuda.matmul.allow_tf32``, unless something in the process already used the
    newer ``fp32_precision`` setting (reading the legacy flag then raises): then that one."""
    m = torch.backends.cuda.matmul
    try:
        old = m.allow_tf32
        attr, new = "allow_tf32", prec == "tf32"
    except RuntimeError:
        old = m.fp32_precision
        attr, new = "fp32_precision", "tf32" if prec == "tf32" else "ieee"
    setattr(m, attr, new)
    try:
        yield
    finally:
        setattr(m, attr, old)


def _amp(prec: str, device: torch.device):
    """bf16 autocast (no weight-cast cache: CUDA graph capture needs it off) or nothing."""
    if prec == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise Skip(f"{what} needs a CUDA device (this run: {device.type})")


def _tf32_only_cuda(prec: str, device: torch.device) -> None:
    if prec == "tf32" and device.type != "cuda":
        raise Skip("TF32 is a CUDA matmul mode; on the CPU it is the fp32 row")


def _ensure_digits() -> str:
    """Where the digits come from. Without scikit-learn (a bare GPU machine) the learner gets a
    synthetic table of the same shape (1797 x 64, 10 learnable classes): the throughput of the
    step does not depend on the values."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is not None:
        return "sklearn digits"

    def synthetic():
        import numpy as np

        rng = np.random.default_rng(0)
        y = rng.permutation(np.arange(1797) % 10).astype(np.int64)
        x = rng.random((10, 64))[y] + 0.3 * rng.standard_normal((1797, 64))
        return np.clip(x, 0.0, 1.0).astype(np.float32), y

    _data._load_digits = synthetic
    return "synthetic digits-shaped table (scikit-learn is not installed here)"


# -- ceilings -------------------------------------------------------------------------------------


def bench_gemm(n: int, prec: str, device: torch.device, repeats: int = 3) -> dict:
    """FLOP/s of ``torch.mm`` of two ``n x n`` matrices (2 n^3 FLOP): fp32, TF32 or bf16 inputs."""
    _tf32_only_cuda(prec, device)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g, dtype=dtype)
    b = torch.randn(n, n, device=device, generator=g, dtype=dtype)
    c = torch.mm(a, b)
    reps = 10 if device.type == "cuda" else 3

    def run() -> None:
        for _ in range(reps):
            torch.mm(a, b, out=c)

    run()
    s = _best(run, repeats, device) / reps
    return {"flops_per_s": 2.0 * n**3 / s, "seconds": s}


def bench_membw(mib: int, device: torch.device, repeats: int = 3) -> dict:
    """Bytes/s of a ``mib`` MiB device-to-device copy (read + write counted)."""
    a = torch.ones(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    reps = 10 if device.type == "cuda" else 2

    def run() -> None:
        for _ in range(reps):
            b.copy_(a)

    run()
    s = _best(run, repeats, device) / reps
    return {"bytes_per_s": 2.0 * a.numel() * 4 / s, "seconds": s}


# -- the MLP: forkpop's learner -------------------------------------------------------------------


def _tasks(n: int, epochs: int) -> list[ForkTask]:
    lrs, moms = (0.01, 0.03, 0.05, 0.1), (0.0, 0.5, 0.8, 0.9)
    out = []
    for i in range(n):
        genome = {"lr": lrs[i % 4], "momentum": moms[i // 4 % 4], "weight_decay": 1e-5, "epochs": epochs}
        out.append(ForkTask(f"v{i}", i % N_NICHES, {**genome, "fork_noise": 0.01}, i))
    return out


_LEARNERS: dict[str, GroupLearner] = {}


def bench_learner(n: int, steps: int, repeats: int, device: torch.device, prec: str) -> dict:
    """forkpop's ``GroupLearner`` (batched engine) on ``device``: N variants, ~``steps`` steps each."""
    _tf32_only_cuda(prec, device)
    if prec == "bf16":
        raise Skip("the learner has no bf16 mode (forkpop trains the MLP in fp32)")
    if device.type not in _LEARNERS:
        spec = LearnerSpec(
            DataSpec(partition="iid", n_niches=N_NICHES),
            ModelSpec("mlp", HIDDEN),
            BATCH,
            torch.get_num_threads(),  # the learner sets its threads: keep the benchmark's
            engine="batched",
            device=device.type,
        )
        _LEARNERS[device.type] = GroupLearner(spec)
    learner = _LEARNERS[device.type]
    if learner.engine is None:
        raise RuntimeError(f"the learner fell back to the loop: {learner.plan.reason}")
    d = learner.data
    seed = flat_weights(build_model("mlp", d.n_features, d.n_classes, HIDDEN, seed=0))
    per_pass = min(len(s) for s in learner.streams)
    tasks = _tasks(n, max(1, round(steps / per_pass)))
    engine = learner.engine
    train = type(engine).train
    timed: list[float] = []

    def timed_train(*a, **k):
        t = time.perf_counter()
        out = train(engine, *a, **k)  # returns CPU tensors and records: synchronised
        timed.append(time.perf_counter() - t)
        return out

    engine.train = timed_train  # the instance's, for this row
    try:
        learner.learn(seed, tasks[: min(n, 4)])  # warm-up
        best, best_train, samples, diverged = math.inf, math.inf, 0, 0
        for _ in range(max(1, repeats)):
            timed.clear()
            _sync(device)
            t0 = time.perf_counter()
            _, res = learner.learn(seed, tasks)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
            best_train = min(best_train, timed[-1])
            samples = sum(r.samples for r in res)
            diverged = sum(r.status != "ok" for r in res)
    finally:
        del engine.train
    return {
        "samples_per_s": samples / best,
        "flops_per_s": samples * MLP_FLOP_PER_SAMPLE / best,
        "engine_samples_per_s": samples / best_train,
        "seconds": best,
        "engine_seconds": best_train,
        "samples": samples,
        "steps": per_pass * tasks[0].genome["epochs"],
        "diverged": diverged,
    }


# -- the MLP: the hand-written reference step -----------------------------------------------------


_DATA: dict = {}


def _reference(n: int, steps: int, device: torch.device, prec: str):
    """Static buffers and the step body ``body(ix)`` of the reference (batch indices ``ix (n, B)``)."""
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the device: 10^8 values at N = 32768
    if "digits" not in _DATA:
        _DATA["digits"] = load_data(DataSpec(partition="iid", n_niches=N_NICHES))
    data = _DATA["digits"]
    x_pool = torch.from_numpy(data.x_pool).to(device)
    y_pool = torch.from_numpy(data.y_pool).to(device)
    d, h, c = data.n_features, HIDDEN[0], data.n_classes
    w1 = torch.randn(n, h, d, generator=g, device=device) * d**-0.5
    b1 = torch.zeros(n, h, 1, device=device)
    w2 = torch.randn(n, c, h, generator=g, device=device) * h**-0.5
    b2 = torch.zeros(n, c, 1, device=device)
    params = [w1, b1, w2, b2]
    bufs = [torch.zeros_like(p) for p in params]
    lr = torch.linspace(0.01, 0.1, n, device=device).view(n, 1, 1)
    mom = torch.full((n, 1, 1), 0.9, device=device)
    wd = torch.full((n, 1, 1), 1e-5, device=device)
    idx = torch.randint(0, len(y_pool), (steps, n, BATCH), generator=g, device=device)

    def body(ix: torch.Tensor) -> None:
        with _amp(prec, device):
            x, y = x_pool[ix], y_pool[ix]  # (n, B, D), (n, B)
            a1 = torch.baddbmm(b1, w1, x.transpose(1, 2)).clamp_(min=0)  # (n, H, B)
            z = torch.baddbmm(b2, w2, a1)  # (n, C, B)
            p = (z - z.amax(1, keepdim=True)).exp_()
            p.div_(p.sum(1, keepdim=True))
            yi = y.unsqueeze(1)
            p.scatter_(1, yi, p.gather(1, yi) - 1.0).mul_(1.0 / BATCH)
            gw2, gb2 = torch.bmm(p, a1.transpose(1, 2)), p.sum(2, keepdim=True)
            da = torch.ops.aten.threshold_backward(torch.bmm(w2.transpose(1, 2), p), a1, 0)
            grads = [torch.bmm(da, x), da.sum(2, keepdim=True), gw2, gb2]
            for i in range(4):  # (an index, not zip(strict=True): the body is also compiled)
                prm, gr, bf = params[i], grads[i], bufs[i]
                gr.addcmul_(wd, prm)
                bf.mul_(mom).add_(gr)
                prm.addcmul_(lr, bf, value=-1.0)

    tensors = [x_pool, y_pool, *params, *bufs, lr, mom, wd, idx]
    return body, idx, w1, tensors


def bench_bmm(n: int, steps: int, repeats: int, device: torch.device, prec: str, mode: str = "eager") -> dict:
    """The reference step, ``mode``: ``eager``, ``graph`` (CUDA graph, 1 step per replay),
    ``graph10`` (10 steps per replay) or ``compile`` (``torch.compile(mode="reduce-overhead")``)."""
    _tf32_only_cuda(prec, device)
    if mode.startswith("graph"):
        _need_cuda(device, "torch.cuda.CUDAGraph")
    if mode == "compile":
        _need_cuda(device, 'torch.compile(mode="reduce-overhead") (CUDA graph trees)')
    body, idx, w1, tensors = _reference(n, steps, device, prec)
    extra: dict = {}
    if mode == "eager":
        body(idx[0])

        def run() -> None:
            for t in range(steps):
                body(idx[t])

        done = steps
    else:
        ctr = torch.zeros(1, dtype=torch.long, device=device)

        def counted() -> None:  # all on the device: the batch of the step the counter names
            body(idx.index_select(0, ctr).squeeze(0))
            ctr.add_(1).remainder_(steps)

        if mode == "compile":
            import torch._dynamo as dynamo

            dynamo.reset()
            for t in (*tensors, ctr):
                dynamo.mark_static_address(t)  # no copies into the graph's own buffers
            from torch._dynamo.utils import counters

            counters.clear()
            said: list[str] = []  # why Inductor skipped CUDA graphs, if it did (it logs a warning)
            hook = logging.Handler()
            hook.emit = lambda record: said.append(record.getMessage()) if "cudagraph" in record.getMessage() else None
            logging.getLogger("torch._inductor").addHandler(hook)
            try:
                fn = torch.compile(counted, mode="reduce-overhead", dynamic=False)
                t0 = time.perf_counter()
                for _ in range(3):  # compile, warm-up, record
                    fn()
                _sync(device)
            finally:
                logging.getLogger("torch._inductor").removeHandler(hook)
            extra["compile_s"] = time.perf_counter() - t0
            extra["cudagraph_skips"] = int(dict(counters.get("inductor", {})).get("cudagraph_skips", 0))
            if said:
                extra["cudagraph_note"] = said[0][:300]

            def run() -> None:
                for _ in range(steps):
                    fn()

            done = steps
        else:
            k = 10 if mode == "graph10" else 1
            k = min(k, steps)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as the docs ask
                for _ in range(3):
                    counted()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            t0 = time.perf_counter()
            with torch.cuda.graph(graph):
                for _ in range(k):
                    counted()
            extra["capture_s"] = time.perf_counter() - t0
            graph.replay()
            replays = max(1, steps // k)

            def run() -> None:
                for _ in range(replays):
                    graph.replay()

            done = replays * k
    s = _best(run, repeats, device)
    samples = n * BATCH * done
    return {
        "samples_per_s": samples / s,
        "flops_per_s": samples * MLP_FLOP_PER_SAMPLE / s,
        "seconds": s,
        "steps": done,
        "finite": bool(torch.isfinite(w1).all()),
        **extra,
    }


# -- the language-model population ----------------------------------------------------------------


def bench_lm(p: int, batch: int, steps: int, repeats: int, device: torch.device, prec: str) -> dict:
    """``PopulationLM`` (default ``LMConfig``): P variants, ``batch`` windows each, AdamW steps."""
    _tf32_only_cuda(prec, device)
    cfg = LM_CFG
    k = min(p, 4)  # a few real initialisations, tiled and jittered (building P models costs seconds)
    base = init_flat(cfg, range(k)).to(device)
    flat = base.repeat((p + k - 1) // k, 1)[:p]
    gen = torch.Generator(device=device).manual_seed(1)
    flat.add_(torch.randn(flat.shape, device=device, generator=gen), alpha=1e-3)
    lrs = torch.linspace(1e-3, 2e-3, p, dtype=torch.float64)
    pop = PopulationLM(cfg, flat, lr=lrs, weight_decay=0.1, clip=1.0, betas=(0.9, 0.95), device=device)
    del base, flat
    data = [
        torch.randint(0, cfg.vocab, (p, batch, cfg.context + 1), device=device, generator=gen) for _ in range(steps)
    ]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run() -> None:
        with _amp(prec, device):
            for x in data:
                pop.step(x)

    with _amp(prec, device):
        for x in data[:2]:
            pop.step(x)
    s = _best(run, repeats, device)
    tokens = steps * p * batch * cfg.context
    fpt = pop.flops_per_token()
    out = {
        "tokens_per_s": tokens / s,
        "flops_per_s": tokens / s * fpt,
        "flops_per_token": fpt,
        "seconds": s,
        "step_ms": 1e3 * s / steps,
        "batch": batch,
        "diverged": int(pop.diverged.sum()),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Job:
    part: str  # gemm | membw | mlp | lm
    engine: str
    precision: str
    n: int
    fn: Callable[[], dict]
    est_s: float = 3.0

    @property
    def key(self) -> str:
        return f"{self.part}/{self.engine}/{self.precision}/{self.n}"

    def base(self) -> dict:
        what = {"gemm": "matrix size", "membw": "MiB copied", "mlp": "variants N", "lm": "variants P"}[self.part]
        return {
            "key": self.key,
            "part": self.part,
            "engine": self.engine,
            "precision": self.precision,
            "n": self.n,
            "n_is": what,
        }


class Recorder:
    """The rows, rewritten to ``path`` (atomically) at every change."""

    def __init__(self, path: Path | None, meta: dict, rows: list[dict] | None = None):
        self.path, self.meta, self.rows = path, meta, list(rows or [])
        self.write()

    def put(self, row: dict) -> None:
        for i, r in enumerate(self.rows):
            if r["key"] == row["key"]:
                self.rows[i] = row
                break
        else:
            self.rows.append(row)
        self.write()

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1, default=str))
        os.replace(tmp, self.path)


def _cuda_healthy() -> bool:
    try:
        torch.zeros(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:
        return False


def _cleanup(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _meta(device: torch.device, args: argparse.Namespace) -> dict:
    meta = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device.type,
        "gpu": None,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mlp": "digits MLP 64 -> 128 -> 10 (ReLU), SGD with momentum, batch 32",
        "mlp_flop_per_sample": MLP_FLOP_PER_SAMPLE,
        "mlp_flop_formula": "6 x (64*128 + 128*10) = 56832 per sample (fwd + bwd ~= 3 x 2 x multiply-adds; "
        "exact matmul count 40448: no input gradient of the first layer)",
        "lm_config": dict(LM_CFG.__dict__),
        "lm_flop_formula": "tokens/s x PopulationLM.flops_per_token() (6 x matmul weights + 12 x n_layer x T x D)",
        "targets_mlp_samples_per_s": {str(k): v for k, v in TARGETS.items()},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        meta["gpu"] = torch.cuda.get_device_name(0)
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_sms"] = props.multi_processor_count
    return meta


def build_jobs(args: argparse.Namespace, device: torch.device) -> list[Job]:
    mlp, lm, steps, lm_steps, lm_batch, gemm_n, mib = SIZES[(device.type, args.quick)]
    mlp = args.mlp_sizes or mlp
    lm = args.lm_sizes or lm
    steps = args.steps or steps
    lm_steps = args.lm_steps or lm_steps
    lm_batch = args.lm_batch or lm_batch
    gemm_n = args.gemm_n or gemm_n
    rep = args.repeats
    jobs: list[Job] = []

    def learner(n: int, prec: str) -> None:  # host forking and records: ~20 s at N = 32768
        reps = (rep if prec == "fp32" else 2) if n <= 4096 else (2 if prec == "fp32" else 1)
        fn = lambda: bench_learner(n, steps, reps, device, prec)  # noqa: E731
        jobs.append(Job("mlp", "learner", prec, n, fn, 3.0 + n * steps / 1.5e5))

    def bmm(n: int, prec: str, mode: str = "eager") -> None:
        est = 45.0 if mode == "compile" else 3.0  # compiling takes tens of seconds
        fn = lambda: bench_bmm(n, steps, rep, device, prec, mode)  # noqa: E731
        jobs.append(Job("mlp", "bmm" if mode == "eager" else f"bmm_{mode}", prec, n, fn, est))

    def lm_row(p: int, prec: str) -> None:
        fn = lambda: bench_lm(p, lm_batch, lm_steps, min(rep, 2), device, prec)  # noqa: E731
        jobs.append(Job("lm", "population", prec, p, fn, 3.0 + p / 100))

    for prec in PRECISIONS:
        jobs.append(Job("gemm", "gemm_peak", prec, gemm_n, lambda prec=prec: bench_gemm(gemm_n, prec, device, rep)))
    jobs.append(Job("membw", "copy", "fp32", mib, lambda: bench_membw(mib, device, rep), 2.0))
    for n in mlp:
        learner(n, "fp32")
    for mode in ("eager", "graph"):
        for prec in ("fp32", "tf32"):
            for n in mlp:
                bmm(n, prec, mode)
    for p in lm:
        for prec in PRECISIONS:
            lm_row(p, prec)
    for n in mlp:
        bmm(n, "bf16")
        bmm(n, "bf16", "graph")
    for n in [m for m in mlp if m <= 1024]:
        for prec in ("fp32", "tf32"):
            bmm(n, prec, "graph10")
    for n in mlp:
        learner(n, "tf32")
    small = min(mlp)  # compiled: the smallest N, 8192 (the target), then fp32
    for n, prec in dict.fromkeys([(small, "tf32"), (8192 if 8192 in mlp else max(mlp), "tf32"), (small, "fp32")]):
        bmm(n, prec, "compile")
    if args.only:
        parts = set(args.only)
        jobs = [
            j
            for j in jobs
            if j.part in parts or j.engine in parts or j.engine.removeprefix("bmm_").rstrip("0123456789") in parts
        ]
    return jobs


def _fmt_rate(r: dict) -> str:
    if "samples_per_s" in r:
        return f"{r['samples_per_s'] / 1e6:10.3f} M samples/s"
    if "tokens_per_s" in r:
        return f"{r['tokens_per_s'] / 1e6:10.3f} M tokens/s "
    if "bytes_per_s" in r:
        return f"{r['bytes_per_s'] / 1e9:10.1f} GB/s         "
    return " " * 23


def _row_line(r: dict) -> str:
    head = f"{r['part']:>5} {r['engine']:>12} {r['precision']:>4} n={r['n']:<6}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    tf = f"{r['flops_per_s'] / 1e12:8.3f} TFLOP/s" if "flops_per_s" in r else ""
    ratio = f"  {r['ratio_to_gemm']:6.1%} of gemm" if "ratio_to_gemm" in r else ""
    return f"{head} {_fmt_rate(r)} {tf}{ratio}  ({r.get('wall_s', 0):.1f} s)"


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"\n{meta.get('gpu') or meta['device']}  torch {meta['torch']}  CUDA {meta['cuda']}")
    print("\n| part | engine | precision | N / P | rate | TFLOP/s | / gemm | target | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rate = tf = ratio = target = ""
        if r["status"] == "ok":
            rate = _fmt_rate(r).strip()
            tf = f"{r['flops_per_s'] / 1e12:.3f}" if "flops_per_s" in r else ""
            ratio = f"{r['ratio_to_gemm']:.1%}" if "ratio_to_gemm" in r else ""
            if r["part"] == "mlp" and r["n"] in TARGETS:
                t = TARGETS[r["n"]]
                met = "MET" if r["samples_per_s"] >= t else "no"
                target = f"{met} ({r['samples_per_s'] / t:.2f} x {t / 1e6:.0f} M)"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}"
        cells = [r["part"], r["engine"], r["precision"], r["n"], rate, tf, ratio, target, status]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    for n, t in TARGETS.items():
        ok = [r for r in rows if r["part"] == "mlp" and r["n"] == n and r["status"] == "ok"]
        if ok:
            b = max(ok, key=lambda r: r["samples_per_s"])
            verdict = "meets" if b["samples_per_s"] >= t else "misses"
            print(
                f"MLP N={n}: best {b['samples_per_s'] / 1e6:.1f} M samples/s ({b['engine']}, {b['precision']}) "
                f"{verdict} the {t / 1e6:.0f} M target"
            )


def _sizes(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes and fewer steps")
    ap.add_argument("--json", type=Path, help="write {meta, rows} here, rewritten as each row starts and ends")
    ap.add_argument(
        "--budget-s", type=float, default=200.0, help="seconds: no row starts once elapsed + its estimate passes this"
    )
    ap.add_argument("--mlp-sizes", type=_sizes, help="MLP population sizes N (comma-separated)")
    ap.add_argument("--lm-sizes", type=_sizes, help="LM population sizes P (comma-separated)")
    ap.add_argument("--steps", type=int, help="MLP learning steps per variant")
    ap.add_argument("--lm-steps", type=int, help="timed PopulationLM steps per run")
    ap.add_argument("--lm-batch", type=int, help="windows per LM variant per step")
    ap.add_argument("--gemm-n", type=int, help="gemm_peak matrix size")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row; the best counts")
    ap.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="rows of these parts / engines only: gemm, membw, mlp, lm, learner, bmm, graph, compile",
    )
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json; run the others")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        msg = f"gpu.py: --device cuda but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA GPU"
        print(msg, flush=True)
        if args.json:
            Recorder(args.json, {"error": msg, "torch": torch.__version__, "cuda": torch.version.cuda})
        return 2
    meta = _meta(device, args)
    meta["data"] = _ensure_digits()
    old_rows: list[dict] = []
    if args.resume and args.json and args.json.is_file():
        prev = json.loads(args.json.read_text())
        old_rows = prev.get("rows", [])
        for r in old_rows:
            if r.get("status") == "running":
                r["status"], r["reason"] = "crashed", "the process died during this row (a previous run)"
        meta["resumed"] = prev.get("meta", {}).get("resumed", 0) + 1
    rec = Recorder(args.json, meta, old_rows)
    done = {r["key"] for r in old_rows}
    gemm = {r["precision"]: r["flops_per_s"] for r in old_rows if r["part"] == "gemm" and r["status"] == "ok"}
    print(
        f"{meta['gpu'] or device.type}: torch {meta['torch']}, CUDA {meta['cuda']}; data: {meta['data']}; "
        f"budget {args.budget_s:.0f} s",
        flush=True,
    )
    for r in old_rows:
        print("(kept) " + _row_line(r), flush=True)
    for job in build_jobs(args, device):
        if job.key in done:
            continue
        elapsed = time.perf_counter() - t_start
        row = job.base()
        if elapsed + job.est_s > args.budget_s:
            why = f"budget: {elapsed:.0f} s elapsed + ~{job.est_s:.0f} s > --budget-s {args.budget_s:.0f}"
            row.update(status="skipped", reason=why)
            rec.put(row)
            print(_row_line(row), flush=True)
            continue
        rec.put({**row, "status": "running", "started_s": round(elapsed, 1)})
        t0 = time.perf_counter()
        broken = False
        try:
            with precision(job.precision):
                row.update(job.fn())
            row["status"] = "ok"
            if job.part == "gemm":
                gemm[job.precision] = row["flops_per_s"]
            elif "flops_per_s" in row and job.precision in gemm:
                row["ratio_to_gemm"] = row["flops_per_s"] / gemm[job.precision]
        except Skip as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # one row's failure must not lose the others
            lines = str(e).strip().splitlines()
            row.update(status="error", reason=f"{type(e).__name__}: {lines[0] if lines else ''}"[:500])
            traceback.print_exc()
            broken = device.type == "cuda" and not _cuda_healthy()
        row["wall_s"] = round(time.perf_counter() - t0, 2)
        if row["status"] != "skipped":
            _cleanup(device)
        rec.put(row)
        print(_row_line(row), flush=True)
        if broken:
            print("gpu.py: the CUDA context is broken; stopping (rerun with --resume for the other rows)", flush=True)
            return 3
    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    rec.write()
    print_table(rec.rows, meta)
    print(f"\ntotal {meta['total_s']:.1f} s" + (f"; rows in {args.json}" if args.json else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
