"""Reference points on forkpop's own splits and partitions: FedAvg and one centralized model.

    python benchmarks/baselines.py [--partitions 0,1,2,3] [--seeds 1] [--json PATH] [--config PATH]

What each baseline does, its grid and how its settings are chosen (on validation data only):
``forkpop.experiments.baselines``. Rows: ``{"method", "partition", "seed", "test_accuracy",
"val_accuracy", "settings", "seconds"}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forkpop.experiments.baselines import BASELINES, run_partition  # noqa: E402
from forkpop.experiments.config import ConfigError, load_config  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "experiments/configs/digits.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    ap.add_argument("--partitions", default="0", help="data.seed values, comma-separated (e.g. 0,1,2,3)")
    ap.add_argument("--seeds", type=int, default=1, help="model-initialisation seeds per partition")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--central-epochs", type=int, default=60)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        partitions = [int(p) for p in args.partitions.split(",") if p.strip()]
        cfg = load_config(args.config)
    except ValueError as e:
        msg = str(e) if isinstance(e, ConfigError) else f"--partitions {args.partitions!r}: give integers, e.g. 0,1,2,3"
        print(f"baselines: {msg}", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)
    rows = []
    for p in partitions:
        rows += run_partition(cfg, p, args.seeds, args.rounds, args.central_epochs)
    for m in BASELINES:
        accs = [r["test_accuracy"] for r in rows if r["method"] == m]
        sd = np.std(accs, ddof=1) if len(accs) > 1 else 0.0
        print(f"{m:<12} mean test accuracy {np.mean(accs):.4f} ± {sd:.4f} over {len(accs)} runs")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
