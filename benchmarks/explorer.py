"""How the explorer page copes with a large run, in Debian's headless Chromium.

    python benchmarks/explorer.py --run RUN_ID --tracking-uri sqlite:///path/mlflow.db [--json PATH]
    python benchmarks/explorer.py --synthetic 1024x20 [--json PATH]

Reports the page's size, the time to build it from the store, the time until it has drawn
itself, the JavaScript time of one full repaint, and the frames of 2 seconds of panning, of
zooming by the wheel and of the whole graph drawn anew every frame (median and worst frame,
in ms, rasterisation included; 16.7 ms is 60 frames per second).

``--synthetic VxG`` makes a run of V variants over G generations with the shape of a real one
(a seed per generation, 16 teachers, genes, figures, 256-variant disagreement matrices)
without MLflow, so the page's cost can be measured apart from a run.
Chromium renders on the CPU here (``--disable-gpu``): a desktop browser with a GPU is faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import browser  # noqa: E402
from forkpop.experiments import explorer  # noqa: E402


def synthetic(n: int, gens: int, seed: int = 0) -> dict:
    """Explorer data shaped like a run of ``n`` variants over ``gens`` generations."""
    rng = random.Random(seed)
    rows = [{"id": "g00-seed", "generation": 0, "origin": "seed", "parents": "", "gene.lr": 0.1}]
    for g in range(gens):
        seed = rows[-1]["id"] if g else "g00-seed"
        forks = []
        for i in range(n):
            forks.append(
                {
                    "id": f"g{g:02d}-v{i:04d}",
                    "generation": g,
                    "origin": "fork",
                    "parents": seed,
                    "niche": i % 16,
                    "status": "ok" if rng.random() > 0.01 else "diverged",
                    "teacher": "false",
                    "poisoned": "true" if i % 16 == 3 else "false",
                    "val_accuracy": rng.random(),
                    "samples": 1000 + i,
                    "learn_seconds": rng.random(),
                    **{f"gene.{k}": rng.random() for k in ("lr", "momentum", "weight_decay", "epochs", "fork_noise")},
                }
            )
        teachers = rng.sample(forks, 16)
        for t in teachers:
            t["teacher"] = "true"
        rows += forks
        rows.append(
            {
                "id": f"g{g + 1:02d}-seed",
                "generation": g + 1,
                "origin": "distill",
                "parents": ",".join(t["id"] for t in teachers),
                "accepted": True,
                "val_accuracy": rng.random(),
                "gene.lr": 0.1,
            }
        )
    m = min(n, 256)
    matrices = {
        str(g): {
            "ids": [f"g{g:02d}-v{i:04d}" for i in range(m)],
            "n": m,
            "q": explorer._quantized([[rng.random() * 0.3 for _ in range(m)] for _ in range(m)]),
        }
        for g in range(gens)
    }
    metrics = {
        k: [[g, rng.random()] for g in range(gens)] for k in ("seed_test_accuracy", "best_fitness", "div.disagreement")
    }
    return {
        "run": {
            "id": "synthetic",
            "name": f"synthetic {n}x{gens}",
            "experiment_id": "0",
            "status": "FINISHED",
            "world": "",
        },
        **explorer._columns(rows),
        "metrics": metrics,
        "groups": explorer.chart_groups(metrics),
        "matrices": matrices,
        "mlflow_runs": {},
    }


FRAMES = """async ([kind, ms]) => {
  const c = document.getElementById('graph'), b = c.getBoundingClientRect();
  const times = []; let last = performance.now(); const t0 = last;
  return await new Promise((done) => {
    function step(now) {
      times.push(now - last); last = now;
      const x = b.left + b.width / 2, y = b.top + b.height / 2;
      if (kind === 'pan') forkpopExplorer.panBy(6, 1);
      else if (kind === 'zoom') c.dispatchEvent(new WheelEvent('wheel',
        {clientX: x, clientY: y, deltaY: -20, bubbles: true, cancelable: true}));
      if (kind === 'settle') forkpopExplorer.paintMs(true);
      if (now - t0 < ms) requestAnimationFrame(step); else done(times.slice(1));
    }
    requestAnimationFrame(step);
  });
}"""


def measure(page_html: str) -> dict:
    out: dict = {"page_mb": len(page_html.encode()) / 1e6}
    with tempfile.TemporaryDirectory() as tmp, browser() as b:
        path = Path(tmp) / "explorer.html"
        path.write_text(page_html)
        page = b.new_page(viewport={"width": 1500, "height": 1000})
        t0 = time.perf_counter()
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready=true]", timeout=120_000)
        out["ready_s"] = time.perf_counter() - t0
        out["nodes"] = page.evaluate("forkpopExplorer.nodeCount()")
        out["repaint_all_js_ms"] = statistics.median(page.evaluate("forkpopExplorer.paintMs(true)") for _ in range(5))
        # idle: the browser's own frame rate, nothing drawn; settle: the whole graph drawn anew
        # each frame (what happens once, when a pan or zoom comes to rest)
        for kind in ("idle", "pan", "zoom", "settle"):
            frames = page.evaluate(FRAMES, [kind, 2000])
            out[f"{kind}_frame_ms_median"] = statistics.median(frames)
            out[f"{kind}_frame_ms_worst"] = max(frames)
            out[f"{kind}_frames"] = len(frames)
        out["js_heap_mb"] = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize / 1e6 : null")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="MLflow run id of a population run")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--synthetic", default=None, metavar="VxG", help="e.g. 1024x20")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res: dict = {"machine": platform.processor() or platform.machine()}
    t0 = time.perf_counter()
    if args.synthetic:
        n, g = (int(x) for x in args.synthetic.lower().split("x"))
        page_html = explorer.explorer_html(synthetic(n, g))
        res["source"] = f"synthetic {n}x{g}"
    elif args.run:
        page_html = explorer.build(args.run, args.tracking_uri)
        res["source"] = f"run {args.run}"
    else:
        ap.error("give --run or --synthetic")
    res["build_s"] = time.perf_counter() - t0
    res.update(measure(page_html))
    for k, v in res.items():
        print(f"{k:>22}: {v:.3f}" if isinstance(v, float) else f"{k:>22}: {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
