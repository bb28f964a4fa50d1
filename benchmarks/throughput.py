"""Learning throughput: the per-variant loop, the batched engine and a hand-written bmm.

    python benchmarks/throughput.py [--json PATH] [--sizes 1,16,64,256] [--threads 1,2] [--device auto]

Every engine trains N digits MLPs (64 -> 128 -> 10, ReLU) with SGD (per-variant learning
rate, momentum and weight decay), mini-batches of 32, for about ``--steps`` steps each.

- ``loop`` and ``batched`` are forkpop's own learner (``GroupLearner`` with
  ``engine=loop`` / ``engine=batched``) as a worker runs it: fork noise, each variant on its
  own niche stream (short last batches included), prequential metrics, divergence checks,
  validation accuracy at the end.
- ``batched`` runs with each of its CPU kernels (``kernel`` in the row): ``native``,
  forkpop's C kernel (a variant's whole lifetime in one call, one Python thread per torch
  thread; the default wherever it builds) and ``torch``, the stacked torch ops.
- ``bmm`` is the reference: the same network and optimizer written by hand as batched matrix
  products (transposed layout, backward written out), on full batches, with no metrics.

Samples/s counts the samples learned, best of ``--repeats`` timed runs (the engines taking
turns) after a warm-up. Every ``--threads`` setting runs everything under
``torch.set_num_threads(t)``; each row carries its ``threads``.

FLOP/s = samples/s x the training FLOPs of one sample, counted from the layers (bias adds,
activations, softmax and the optimizer left out): for Linear layers of ``in_l x out_l``,

    2 * sum_l in_l * out_l          forward
  + 2 * sum_l in_l * out_l          weight gradients
  + 2 * sum_{l > 1} in_l * out_l    input gradients (none for the first layer: x needs none)

which for the digits MLP 64 -> 128 -> 10 is 2 * 9,472 + 2 * 9,472 + 2 * 1,280 = 40,448 FLOP
(the "3 x forward" rule of thumb would say 56,832, counting an input gradient nobody computes).

For reference every thread setting also times, in the same run, a large fp32 matrix product
at 2048 x 2048 x 2048 (2 n^3 FLOP, best of a few): ``torch.mm`` (MKL), ``F.linear`` and
oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, and ``torch._C._nn.mkldnn_linear``
on an input already in oneDNN's layout) where this build has them. Each is an
``engine="gemm"`` row with its ``kind``; the best is the ``engine="gemm_peak"`` row, and
``ratio_to_peak`` of an engine row is its FLOP/s over that peak at the same thread count.
On a GPU (``--device auto`` finds one) the batched engine and bmm also run at 1,024, 8,192
and 32,768 variants. The table goes to stdout; ``--json PATH`` writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.population import build_model, flat_weights, native  # noqa: E402
from forkpop.workers import DataSpec, ForkTask, GroupLearner, LearnerSpec, ModelSpec, load_data  # noqa: E402
from forkpop.workers.engine import resolve_device  # noqa: E402

BATCH = 32
HIDDEN = (128,)
N_NICHES = 4  # ~300 samples each: 10 mini-batches per pass, the last one short
GEMM_N = 2048


def train_flops_per_sample(model: nn.Module) -> int:
    """Forward + backward FLOPs of one sample through ``model``'s Linear layers (see above)."""
    macs = [m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    return 2 * sum(macs) + 2 * sum(macs) + 2 * sum(macs[1:])


def _lscpu() -> dict[str, str]:
    """``lscpu``'s fields (model name, flags ...); empty where there is no lscpu."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def _gemm_kinds(a: torch.Tensor, b: torch.Tensor) -> dict[str, object]:
    """The large matrix products timed for the peak: ``name -> zero-argument callable``."""
    kinds: dict[str, object] = {"mm": lambda: torch.mm(a, b), "linear": lambda: F.linear(a, b)}
    if a.device.type == "cpu" and torch.backends.mkldnn.is_available():
        pointwise = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if pointwise is not None:
            kinds["onednn_linear"] = lambda: pointwise(a, b, None, "none", [], "")
        if hasattr(torch._C._nn, "mkldnn_linear"):
            a_mkldnn = a.to_mkldnn()  # the input already in oneDNN's layout, as its own models keep it
            kinds["mkldnn_linear"] = lambda: torch._C._nn.mkldnn_linear(a_mkldnn, b, None)
    return kinds


def bench_gemm(threads: int, repeats: int, device: torch.device) -> list[dict]:
    """``gemm`` rows (one per kind that runs here) and the ``gemm_peak`` row (the best)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_N, GEMM_N, generator=g).to(device)
    b = torch.randn(GEMM_N, GEMM_N, generator=g).to(device)
    flop = 2.0 * GEMM_N**3
    rows = []
    for kind, fn in _gemm_kinds(a, b).items():
        try:
            fn()  # warm-up (and oneDNN's weight reorder)
        except RuntimeError:  # a kind this build lists but cannot run
            continue
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        rows.append(
            {
                "engine": "gemm",
                "kind": kind,
                "threads": threads,
                "device": device.type,
                "n_variants": 0,
                "samples_per_s": 0.0,
                "flops_per_s": flop / best,
                "seconds": best,
                "gemm_n": GEMM_N,
            }
        )
    peak = max(rows, key=lambda r: r["flops_per_s"])
    return [*rows, {**peak, "engine": "gemm_peak"}]


def _label(row: dict) -> str:
    """``batched (native)`` / ``batched (torch)`` for the engine's rows, else the engine."""
    return f"{row['engine']} ({row['kernel']})" if row.get("kernel") else row["engine"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _tasks(n: int, epochs: int) -> list[ForkTask]:
    lrs, moms = (0.01, 0.03, 0.05, 0.1), (0.0, 0.5, 0.8, 0.9)
    out = []
    for i in range(n):
        genome = {"lr": lrs[i % 4], "momentum": moms[i // 4 % 4], "weight_decay": 1e-5, "epochs": epochs}
        out.append(ForkTask(f"v{i}", i % N_NICHES, {**genome, "fork_noise": 0.01}, i))
    return out


def bench_learner(engine: str, n: int, steps: int, repeats: int, device: str, kernel: str = "auto") -> dict:
    spec = LearnerSpec(
        DataSpec(partition="iid", n_niches=N_NICHES),
        ModelSpec("mlp", HIDDEN),
        BATCH,
        torch.get_num_threads(),  # the learner sets its threads: keep the benchmark's
        engine=engine,
        device=device,
        kernel=kernel,
    )
    learner = GroupLearner(spec)
    d = learner.data
    seed = flat_weights(build_model("mlp", d.n_features, d.n_classes, HIDDEN, seed=0))
    per_pass = min(len(s) for s in learner.streams)
    tasks = _tasks(n, max(1, round(steps / per_pass)))
    dev = learner.engine.device if learner.engine is not None else torch.device("cpu")
    learner.learn(seed, tasks[: min(n, 4)])  # warm-up
    best = float("inf")
    samples = 0
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        _, res = learner.learn(seed, tasks)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
        samples = sum(r.samples for r in res)
        assert all(r.status == "ok" for r in res), [r.reason for r in res if r.reason]
    return {
        "engine": engine,
        "kernel": learner.describe()["kernel"] if engine == "batched" else "",
        "n_variants": n,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "samples_per_s": samples / best,
        "seconds": best,
    }


def bench_bmm(n: int, steps: int, repeats: int, device: torch.device) -> dict:
    """The hand-written reference: forward, backward and SGD as batched matrix products."""
    g = torch.Generator().manual_seed(0)
    spec = LearnerSpec(DataSpec(partition="iid", n_niches=N_NICHES), ModelSpec("mlp", HIDDEN), BATCH)
    data = load_data(spec.data)
    x_pool = torch.from_numpy(data.x_pool).to(device)
    y_pool = torch.from_numpy(data.y_pool).to(device)
    d, h, c = data.n_features, HIDDEN[0], data.n_classes
    w1 = (torch.randn(n, h, d, generator=g) * d**-0.5).to(device)
    b1 = torch.zeros(n, h, 1, device=device)
    w2 = (torch.randn(n, c, h, generator=g) * h**-0.5).to(device)
    b2 = torch.zeros(n, c, 1, device=device)
    params = [w1, b1, w2, b2]
    bufs = [torch.zeros_like(p) for p in params]
    lr = torch.linspace(0.01, 0.1, n, device=device).view(n, 1, 1)
    mom = torch.full((n, 1, 1), 0.9, device=device)
    wd = torch.full((n, 1, 1), 1e-5, device=device)
    idx = torch.randint(0, len(y_pool), (steps, n, BATCH), generator=g).to(device)

    def step(t: int) -> None:
        x, y = x_pool[idx[t]], y_pool[idx[t]]  # (n, B, D), (n, B)
        a1 = torch.baddbmm(b1, w1, x.transpose(1, 2)).clamp_(min=0)  # (n, H, B)
        z = torch.baddbmm(b2, w2, a1)  # (n, C, B)
        p = (z - z.amax(1, keepdim=True)).exp_()
        p.div_(p.sum(1, keepdim=True))
        yi = y.unsqueeze(1)
        p.scatter_(1, yi, p.gather(1, yi) - 1.0).mul_(1.0 / BATCH)
        gw2, gb2 = torch.bmm(p, a1.transpose(1, 2)), p.sum(2, keepdim=True)
        da = torch.ops.aten.threshold_backward(torch.bmm(w2.transpose(1, 2), p), a1, 0)
        grads = [torch.bmm(da, x), da.sum(2, keepdim=True), gw2, gb2]
        for prm, gr, bf in zip(params, grads, bufs, strict=True):
            gr.addcmul_(wd, prm)
            bf.mul_(mom).add_(gr)
            prm.addcmul_(lr, bf, value=-1.0)

    step(0)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for t in range(steps):
            step(t)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    assert torch.isfinite(w1).all()
    return {
        "engine": "bmm",
        "n_variants": n,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "samples_per_s": n * BATCH * steps / best,
        "seconds": best,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here as JSON")
    ap.add_argument("--sizes", default="1,16,64,256", help="CPU population sizes")
    ap.add_argument("--gpu-sizes", default="1024,8192,32768", help="GPU population sizes (batched and bmm)")
    ap.add_argument("--steps", type=int, default=100, help="learning steps per variant")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine, taken in turns")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (1: as an actor runs)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    threads = [int(s) for s in args.threads.split(",") if s]
    device = resolve_device(args.device)
    cpu = torch.device("cpu")
    fps = train_flops_per_sample(build_model("mlp", 64, 10, HIDDEN, seed=0))
    info = _lscpu()
    print(f"CPU: {info.get('Model name', platform.processor() or platform.machine())}, {info.get('CPU(s)', '?')} CPUs")
    print(f"flags: {info.get('Flags', '?')}")
    print(f"torch {torch.__version__}; MLP 64 -> {HIDDEN[0]} -> 10, batch {BATCH}: {fps} training FLOP per sample\n")

    rows: list[dict] = []
    peak: dict[tuple[int, str], float] = {}  # (threads, device) -> the gemm_peak FLOP/s

    def add(row: dict) -> None:
        if "flops_per_s" not in row:
            row["flops_per_s"] = row["samples_per_s"] * fps
        row["ratio_to_peak"] = row["flops_per_s"] / peak[row["threads"], row["device"]]
        rows.append(row)
        gflops = row["flops_per_s"] / 1e9
        if row["engine"].startswith("gemm"):
            head = f"threads={row['threads']} {row['engine']:>9} {row['device']:>5}"
            print(f"{head} {row['kind']:>13}: {gflops:7.1f} GFLOP/s")
            return
        print(
            f"threads={row['threads']} {_label(row):>16} {row['device']:>5} N={row['n_variants']:>6}  "
            f"{row['samples_per_s'] / 1e6:8.3f} M samples/s  {gflops:6.1f} GFLOP/s  "
            f"{row['ratio_to_peak']:.2f} of peak  ({row['seconds']:.3f} s)",
            flush=True,
        )

    # the batched engine's CPU kernels: native (forkpop's C kernel, the default where it builds) and torch
    lib, why = native.kernel()
    kernels = ("native", "torch") if lib is not None else ("torch",)
    print(f"native kernel: {'built' if lib is not None else why}")
    for th in threads:
        torch.set_num_threads(th)
        gemm = bench_gemm(th, max(args.repeats, 3), cpu)
        peak[th, "cpu"] = gemm[-1]["flops_per_s"]
        for row in gemm:
            add(row)
        for n in [int(s) for s in args.sizes.split(",") if s]:
            # The engines take turns, repeat after repeat, so a slow moment of the machine
            # falls on all of them alike; each keeps its best repeat.
            best: dict[str, dict] = {}
            for _ in range(args.repeats):
                for row in (
                    bench_learner("loop", n, args.steps, 1, "cpu"),
                    *(bench_learner("batched", n, args.steps, 1, "cpu", k) for k in kernels),
                    bench_bmm(n, args.steps, 1, cpu),
                ):
                    label = _label(row)
                    if label not in best or row["samples_per_s"] > best[label]["samples_per_s"]:
                        best[label] = row
            for row in best.values():
                add(row)
    if device.type == "cuda":
        th = threads[-1]
        torch.set_num_threads(th)
        gpu = bench_gemm(th, max(args.repeats, 3), device)
        peak[th, "cuda"] = gpu[-1]["flops_per_s"]  # GPU rows are measured against the GPU's own product
        for row in gpu:
            add(row)
        add(bench_learner("loop", 16, args.steps // 4, 1, "cpu"))
        for n in [int(s) for s in args.gpu_sizes.split(",") if s]:
            add(bench_learner("batched", n, args.steps, args.repeats, "cuda"))
            add(bench_bmm(n, args.steps, args.repeats, device))

    print(
        "\n| engine | threads | device | N | M samples/s | GFLOP/s | / gemm_peak | batched / loop | batched / bmm |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    by = {(_label(r), r["threads"], r["device"], r["n_variants"]): r["samples_per_s"] for r in rows}
    for r in rows:
        gflops, ratio = f"{r['flops_per_s'] / 1e9:.1f}", f"{r['ratio_to_peak']:.2f}"
        if r["engine"].startswith("gemm"):
            name = f"{r['engine']} ({r['kind']}, {GEMM_N}^3)"
            print(f"| {name} | {r['threads']} | {r['device']} | | | {gflops} | {ratio} | | |")
            continue
        key = (r["threads"], r["device"], r["n_variants"])
        ratio_loop = ratio_bmm = ""
        if r["engine"] == "batched":
            if ("loop", *key) in by:
                ratio_loop = f"{r['samples_per_s'] / by[('loop', *key)]:.2f}x"
            if ("bmm", *key) in by:
                ratio_bmm = f"{r['samples_per_s'] / by[('bmm', *key)]:.2f}x"
        print(
            f"| {_label(r)} | {r['threads']} | {r['device']} | {r['n_variants']} | {r['samples_per_s'] / 1e6:.3f} "
            f"| {gflops} | {ratio} | {ratio_loop} | {ratio_bmm} |"
        )
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpu_model": info.get("Model name"),
            "cpu_flags": info.get("Flags"),
            "cpus": info.get("CPU(s)"),
            "threads": threads,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "batch_size": BATCH,
            "steps": args.steps,
            "flops_per_sample": fps,
            "gemm_n": GEMM_N,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
