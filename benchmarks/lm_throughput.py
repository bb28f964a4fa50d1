"""Byte-LM training throughput: one model alone, N models one by one, and PopulationLM (N as one step).

    python benchmarks/lm_throughput.py [--json PATH] [--threads 1,2] [--variants 16] [--batch 8]
                                       [--steps N] [--quick] [--device cpu]

Every engine trains the default ``LMConfig`` (2 layers, 4 heads, d_model 128, context 64) on
random byte windows, ``--batch`` windows per variant per step, with AdamW (betas 0.9/0.95,
weight decay 0.1 on the 2-D weights, global-norm clipping at 1.0):

- ``bytelm``: one ``ByteLM`` and ``torch.optim.AdamW`` + ``clip_grad_norm_``, as anyone would write it;
- ``one_by_one``: ``--variants`` such models trained in sequence (new model and optimizer each,
  the first step of each timed too): what a per-variant loop costs;
- ``population``: ``PopulationLM`` with ``P = --variants`` (and ``P = 1``), ``P * B * T``
  tokens per step.

Tokens/s is best of ``--repeats`` timed runs after a warm-up. Achieved FLOP/s = tokens/s x
``PopulationLM.flops_per_token()`` (6 x matmul weights + 12 x n_layer x T x D per token). For
reference, every thread count also times a large fp32 matrix product (``torch.mm`` and
``F.linear`` at 2048 x 2048 x 2048, 2 n^3 FLOP, best of a few); ``ratio_to_gemm`` is an
engine's FLOP/s over the ``torch.mm`` figure at the same thread count. The table goes to
stdout; ``--json PATH`` writes ``{"meta": ..., "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.population.lm import ByteLM, LMConfig, PopulationLM, init_flat  # noqa: E402

CFG = LMConfig()
LR, WD, CLIP, BETAS = 1e-3, 0.1, 1.0, (0.9, 0.95)
GEMM_N = 2048


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batches(n: int, shape: tuple[int, ...], device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, shape, generator=g).to(device) for _ in range(n)]


def _best(run, repeats: int, device: torch.device) -> float:
    """Best wall time (s) of ``repeats`` calls of ``run``."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def bench_gemm(repeats: int, device: torch.device) -> dict[str, float]:
    """FLOP/s of ``torch.mm`` and ``F.linear`` at ``GEMM_N`` cubed, fp32."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(GEMM_N, GEMM_N, generator=g).to(device)
    b = torch.randn(GEMM_N, GEMM_N, generator=g).to(device)
    flop = 2.0 * GEMM_N**3
    out = {}
    for name, fn in (("gemm_peak", lambda: torch.mm(a, b)), ("linear_peak", lambda: F.linear(a, b))):
        fn()
        out[name] = flop / _best(fn, repeats, device)
    return out


class _Single:
    """One ByteLM with AdamW (decay on 2-D weights) and clip_grad_norm_."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.model = ByteLM(CFG, seed).to(device)
        ps = list(self.model.parameters())
        groups = [
            {"params": [p for p in ps if p.dim() >= 2], "weight_decay": WD},
            {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-8)

    def step(self, tokens: torch.Tensor) -> None:
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, CFG.vocab), tokens[:, 1:].reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()


def bench_single(batch: int, steps: int, repeats: int, device: torch.device) -> float:
    """Tokens/s of one ByteLM trained alone."""
    data = _batches(steps, (batch, CFG.context + 1), device)
    single = _Single(0, device)
    for x in data[:2]:
        single.step(x)

    def run() -> None:
        for x in data:
            single.step(x)

    return steps * batch * CFG.context / _best(run, repeats, device)


def bench_one_by_one(n: int, batch: int, steps: int, device: torch.device) -> float:
    """Tokens/s of ``n`` ByteLMs trained one after the other, ``steps`` steps each (construction not timed)."""
    data = _batches(steps, (batch, CFG.context + 1), device, seed=1)
    warm = _Single(0, device)
    for x in data[:2]:
        warm.step(x)
    total = 0.0
    for i in range(n):
        single = _Single(i, device)
        _sync(device)
        t = time.perf_counter()
        for x in data:
            single.step(x)
        _sync(device)
        total += time.perf_counter() - t
    return n * steps * batch * CFG.context / total


def bench_population(p: int, batch: int, steps: int, repeats: int, device: torch.device) -> float:
    """Tokens/s of PopulationLM with ``p`` variants (``p * batch * context`` tokens per step)."""
    lrs = [LR * (1.0 + i / max(p, 1)) for i in range(p)]
    pop = PopulationLM(CFG, init_flat(CFG, range(p)), lr=lrs, weight_decay=WD, clip=CLIP, betas=BETAS, device=device)
    data = _batches(steps, (p, batch, CFG.context + 1), device, seed=2)
    for x in data[:2]:
        pop.step(x)

    def run() -> None:
        for x in data:
            pop.step(x)

    rate = steps * p * batch * CFG.context / _best(run, repeats, device)
    if bool(pop.diverged.any()):
        raise RuntimeError("a variant diverged during the benchmark")
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the rows here as JSON")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated")
    ap.add_argument("--variants", type=int, default=16, help="population size (and models trained one by one)")
    ap.add_argument("--batch", type=int, default=8, help="windows per variant per step")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run (one-by-one: per model)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per engine; the best one counts")
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 repeat (about a minute on 2 cores)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = 3, 1
    device = torch.device(args.device)
    threads = [int(s) for s in args.threads.split(",") if s]
    n, b, t = args.variants, args.batch, CFG.context
    fpt = PopulationLM(CFG, init_flat(CFG, [0]), lr=LR).flops_per_token()
    print(f"LMConfig {CFG}; {fpt / 1e6:.3f} MFLOP per training token; batch {b} x {t} tokens per variant", flush=True)

    rows: list[dict] = []
    for th in threads:
        torch.set_num_threads(th)
        peaks = bench_gemm(max(args.repeats, 3), device)
        gemm = peaks["gemm_peak"]
        for name, flops in peaks.items():
            row = {"engine": name, "threads": th, "n": GEMM_N, "flops_per_s": flops}
            rows.append({**row, "ratio_to_gemm": flops / gemm})
            print(f"threads={th} {name:>12}: {flops / 1e9:7.1f} GFLOP/s", flush=True)

        def add(engine: str, variants: int, tokens_per_s: float, th: int = th, gemm: float = gemm) -> None:
            flops = tokens_per_s * fpt
            row = {"engine": engine, "threads": th, "variants": variants, "batch": b, "tokens_per_s": tokens_per_s}
            rows.append({**row, "flops_per_s": flops, "ratio_to_gemm": flops / gemm})
            print(f"threads={th} {engine:>12} x{variants:<3}: {tokens_per_s:9.0f} tokens/s  {flops / 1e9:6.1f} GFLOP/s")

        add("bytelm", 1, bench_single(b, max(args.steps, 5), args.repeats, device))
        add("one_by_one", n, bench_one_by_one(n, b, args.steps, device))
        add("population", 1, bench_population(1, b, max(args.steps, 5), args.repeats, device))
        add("population", n, bench_population(n, b, args.steps, args.repeats, device))

    print("\n| engine | threads | variants | tokens/s | GFLOP/s | / torch.mm |\n|---|---|---|---|---|---|")
    for r in rows:
        if "tokens_per_s" in r:
            print(
                f"| {r['engine']} | {r['threads']} | {r['variants']} | {r['tokens_per_s']:.0f} "
                f"| {r['flops_per_s'] / 1e9:.1f} | {r['ratio_to_gemm']:.2f} |"
            )
        else:
            gflops = r["flops_per_s"] / 1e9
            print(f"| {r['engine']} ({GEMM_N}^3) | {r['threads']} | | | {gflops:.1f} | {r['ratio_to_gemm']:.2f} |")
    print()
    by = {(r["engine"], r["threads"], r.get("variants")): r.get("tokens_per_s") for r in rows}
    for th in threads:
        ratio = by[("population", th, n)] / by[("one_by_one", th, n)]
        print(f"threads={th}: population({n}) / one-by-one({n}) tokens/s = {ratio:.2f}")
    if args.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "device": str(device),
            "config": CFG.__dict__,
            "flops_per_token": fpt,
            "steps": args.steps,
            "repeats": args.repeats,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
