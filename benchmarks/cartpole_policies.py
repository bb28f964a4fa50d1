"""The environment world's System M against its fixed policies, on several run seeds.

    python benchmarks/cartpole_policies.py [--seeds 0,1,2,3,4] [--policies evolved,act,observe,random]
                                           [--json PATH] [--set KEY=VALUE ...]

Each policy runs the bundled ``cartpole`` config (16 linear policies, 5,000-step lifetimes, 5
generations) once per run seed (``run.seed``: the root policy, the forks' noise, the episode
seeds). Per policy and seed it prints the forks' median greedy return at the end of their
lifetimes and the seed's, per generation, both on the reported episodes (never selection's),
the first generation whose seed reaches 475, the median switches between acting and observing,
the share of steps observing, and the run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--policies", default="evolved,act,observe,random")
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    import numpy as np

    import forkpop

    out: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        uri = f"sqlite:///{tmp}/m.db"
        for policy in args.policies.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                sets = [f"env.policy={policy}", f"run.seed={seed}", f"run.run_dir={tmp}/runs", *args.set]
                r = forkpop.run("cartpole", overrides=sets, backend="local", tracking_uri=uri).summary
                h = r["history"]
                reach = next((x["generation"] for x in h if x["seed_return"] >= 475), None)
                row = {
                    "seed": seed,
                    "median_return": [x["median_return"] for x in h],
                    "seed_return": [x["seed_return"] for x in h],
                    "first_generation_475": reach,
                    "switches": [x["switches"] for x in h],
                    "observe_share": [x["observe_share"] for x in h],
                    "wall_seconds": r["wall_seconds"],
                }
                out.setdefault(policy, []).append(row)
                print(
                    f"{policy:>8} seed {seed}: median {[round(v) for v in row['median_return']]} "
                    f"seed {[round(v) for v in row['seed_return']]} 475 at {reach} "
                    f"switches {row['switches']} observing {np.mean(row['observe_share']):.0%} "
                    f"{row['wall_seconds']:.1f}s",
                    flush=True,
                )
    for policy, rows in out.items():
        best = [max(r["median_return"]) for r in rows]
        last = [r["seed_return"][-1] for r in rows]
        print(
            f"{policy:>8}: best median end-of-life return {np.mean(best):.1f} ± {np.std(best, ddof=1):.1f}, "
            f"last seed {np.mean(last):.1f} ± {np.std(last, ddof=1):.1f} over {len(rows)} seeds"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
