"""What MLflow tracking costs a generation, on a SQLite store and on a local ``mlflow server``.

    python benchmarks/tracking.py [--sizes 32,1024] [--generations 3] [--stores sqlite,server] [--json PATH]

Each size runs the default experiment (``population.size=N``, ``--generations`` generations,
``--set`` on top; by default ``population.genes.epochs.init=5`` so that large sizes finish in
minutes) in a fresh ``forkpop run`` process, tracked in a new SQLite file or in an
``mlflow server`` this script starts on 127.0.0.1 (its own SQLite store and artifact folder,
one worker) and stops. Per run it reports the generations' wall time (as the driver sees it),
the tracking writer process's busy seconds (every MLflow write: the parent run, nested runs,
tables, artifacts; it works in parallel with the learners) and the driver's time waiting for
it (``tracking_wait``: generations only, and the final flush at the end), the nested runs
written (``tracking.variant_runs``: ``auto`` writes one per variant up to 256 variants on a
local store, 64 on a server, else seeds and students only; every variant is a row of
``variants/gen-NNNN.json``), and ``writer_share`` = writer busy seconds / generations' wall
time: the share of a generation that tracking takes, were it not in parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server(tmp: Path) -> tuple[subprocess.Popen, str]:
    """A local ``mlflow server`` on a free loopback port; returns it and its URI once it answers."""
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "art")],
        stdout=open(tmp / "server.log", "w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited: {(tmp / 'server.log').read_text()[-500:]}") from None
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not answer in 180 s")


def _nested_runs(uri: str, run_id: str) -> int:
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_run(run_id).info.experiment_id
    return len(c.search_runs([exp], f"tags.mlflow.parentRunId = '{run_id}'", max_results=50000))


def run_one(n: int, generations: int, uri: str, overrides: list[str], tmp: Path) -> dict:
    out = tmp / f"s-{n}.json"
    cmd = [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--quiet", "--summary", str(out)]
    cmd += ["--tracking-uri", uri, "--set", f"run.run_dir={tmp / 'runs'}", "--set", f"population.size={n}"]
    cmd += ["--set", f"run.generations={generations}"]
    for o in overrides:
        cmd += ["--set", o]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"size {n} failed: {p.stderr.strip().splitlines()[-1:]}")
    s = json.loads(out.read_text())
    secs = s["seconds"]
    gen_wall = sum(h["seconds"].get("generation", 0.0) for h in s["history"])
    writer = secs.get("tracking_writer", 0.0)
    return {
        "n_variants": n,
        "generations": generations,
        "process_wall_s": round(wall, 2),
        "generations_wall_s": round(gen_wall, 2),
        "per_generation_s": round(gen_wall / generations, 3),
        "writer_busy_s": round(writer, 2),
        "writer_cpu_s": round(secs.get("tracking_writer_cpu", 0.0), 2),
        "driver_tracking_s": round(secs.get("tracking", 0.0), 2),
        "final_flush_s": round(secs.get("tracking_flush", 0.0), 2),
        "writer_share": round(writer / gen_wall, 3) if gen_wall else None,
        "nested_runs": _nested_runs(uri, s["mlflow_run_id"]),
        "seed_test_accuracy": s["seed_test_accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,1024")
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--stores", default="sqlite,server")
    ap.add_argument("--set", action="append", default=None, metavar="KEY=VALUE")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    overrides = args.set if args.set is not None else ["population.genes.epochs.init=5"]
    rows = []
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; overrides {overrides}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for store in args.stores.split(","):
            server = None
            try:
                if store == "server":
                    server, uri = _server(tmp)
                for n in (int(x) for x in args.sizes.split(",")):
                    if store == "sqlite":
                        uri = f"sqlite:///{tmp / f'm-{n}.db'}"
                    row = {"store": store, **run_one(n, args.generations, uri, overrides, tmp)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
