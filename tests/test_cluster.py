"""On a real cluster: a two-node Ray and an MLflow tracking server, started here as processes.

One module-scoped fixture starts a Ray head and a second Ray node (``ray start --block``, one
CPU each, token authentication with a token of its own) and ``mlflow server`` on a SQLite
store, each in a session of its own on free loopback ports, and stops them by those sessions
whatever happens. forkpop runs through its command line in a subprocess, so the test
session's own in-process Ray is not involved.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from forkpop.experiments.tracking import lineage_from_mlflow

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
# `ray start` with each node on loopback only (see loopback_ray.py)
RAY_START = [sys.executable, Path(__file__).parent / "loopback_ray.py", "start"]
GENERATIONS, SIZE = 4, 8
EXPERIMENT = [
    "digits",
    "--seed",
    "0",
    "--set",
    f"population.size={SIZE}",
    "--set",
    f"run.generations={GENERATIONS}",
    "--set",
    "run.workers=2",
    "--quiet",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.1)


def _session(sid: int) -> list[int]:
    """The live processes of session ``sid`` (one this module started), zombies left out."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            state, _ppid, _pgrp, session = (d / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(d.name))
    return pids


def _stop(procs: list[subprocess.Popen], grace: float = 3.0) -> None:
    """SIGTERM the process groups these lead, then SIGKILL what is left of their sessions (Ray's
    workers have groups of their own in them). Nothing outside these sessions is touched."""
    live = [p for p in procs if p.poll() is None or _session(p.pid)]
    for proc in live:
        try:
            os.killpg(proc.pid, signal.SIGCONT)  # a paused server cannot act on SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while any(_session(p.pid) for p in live) and time.monotonic() < deadline:
        time.sleep(0.1)
    for _ in range(100):
        left = [pid for p in live for pid in _session(p.pid)]
        if not left:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


class Services:
    """A two-node Ray and an MLflow server, each process started in a session of its own."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        self.env.update(
            RAY_USAGE_STATS_ENABLED="0",
            RAY_AUTH_MODE="token",  # `ray start` turns it on by default; a token of this cluster's own
            RAY_AUTH_TOKEN=secrets.token_hex(32),
            MLFLOW_DISABLE_TELEMETRY="true",
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job runner processes: the server starts in seconds
            PYTHONUNBUFFERED="1",
        )
        self.server: subprocess.Popen | None = None
        self.outputs: dict[int, str] = {}  # pid of a forkpop command -> its output file
        self.mlflow_port = _free_port()
        self.uri = f"http://127.0.0.1:{self.mlflow_port}"

    def spawn(self, args: list, log: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``args`` in a session of its own; stdout and stderr go to ``log`` (and ``log.err``)."""
        err_log = self.root / f"{log}.err"
        with open(self.root / log, "ab") as out, open(err_log, "ab") as err:
            proc = subprocess.Popen(
                [str(a) for a in args],
                env={**self.env, **(env or {})},
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def started(self, node: str) -> bool:
        return "Ray runtime started" in self.log(f"{node}.log") + self.log(f"{node}.log.err")

    def start_ray(self) -> None:
        self.ray_port = _free_port()
        self.address = f"127.0.0.1:{self.ray_port}"
        node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0"]
        node += ["--min-worker-port", "0", "--max-worker-port", "0", "--object-store-memory", str(100 * 2**20)]
        node += ["--disable-usage-stats", "--block"]
        head = self.spawn(
            [*RAY_START, "--head", "--port", self.ray_port, "--include-dashboard", "false"]
            + ["--dashboard-port", _free_port(), "--dashboard-agent-listen-port", _free_port()]
            + ["--temp-dir", self.root / "head", *node],
            "head.log",
        )
        _wait(lambda: self.started("head"), 120, "ray head", head)
        second = self.spawn(
            [*RAY_START, "--address", self.address, "--resources", json.dumps({"node2": 1})]
            + ["--dashboard-agent-listen-port", _free_port(), "--temp-dir", self.root / "node2", *node],
            "node2.log",
        )
        _wait(lambda: self.started("node2"), 120, "second ray node", second)

    def node_id(self, name: str) -> str:
        """The Ray node id of ``head`` or ``node2``, from its raylet's log."""
        text = (self.root / name / "session_latest" / "logs" / "raylet.out").read_text()
        return re.search(r"Setting node ID node_id=([0-9a-f]+)", text).group(1)

    def start_server(self, wait: bool = True) -> None:
        """``mlflow server`` on this module's port and SQLite store (again after a stop)."""
        self.server = self.spawn(
            [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
            + ["--artifacts-destination", self.root / "artifacts", "--host", "127.0.0.1"]
            + ["--port", self.mlflow_port, "--workers", "1"],
            "mlflow.log",
        )
        if wait:
            self.wait_server()

    def wait_server(self) -> None:
        _wait(self.healthy, 120, "mlflow server", self.server)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def signal_server(self, sig: int) -> None:
        os.killpg(self.server.pid, sig)

    def stop_server(self) -> None:
        _stop([self.server], grace=0.0)

    def launch(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        """``forkpop ARGS``; its output goes to ``name`` and ``name.err``."""
        proc = self.spawn([BIN / "forkpop", *args], name, env)
        self.outputs[proc.pid] = name
        return proc

    def result(self, proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
        """Wait for a ``launch``: exit status, stdout, stderr."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop([proc])
            raise
        name = self.outputs[proc.pid]
        return proc.returncode, self.log(name), self.log(f"{name}.err")

    def forkpop(self, name: str, *args: str, env: dict | None = None) -> tuple[int, str, str]:
        return self.result(self.launch(name, *args, env=env))

    def close(self) -> None:
        _stop(self.procs)


@pytest.fixture(scope="module")
def cluster():
    if not Path("/proc/self/stat").exists():
        pytest.skip("stopping what the fixture started needs /proc (Linux)")
    for tool in ("ray", "mlflow", "forkpop"):
        if not (BIN / tool).exists():
            pytest.skip(f"no {tool} command beside {sys.executable}")
    root = Path(tempfile.mkdtemp(prefix="fp-cluster-"))  # short: Ray's socket paths have a length limit
    services = Services(root)
    try:
        services.start_server(wait=False)  # it comes up while Ray does
        services.start_ray()
        services.wait_server()
        yield services
    finally:
        services.close()
        shutil.rmtree(root, ignore_errors=True)


def _run(services: Services, name: str, *extra: str) -> list[str]:
    """``forkpop run`` of the experiment, its run directory and summary named after ``name``."""
    runs = services.root / f"runs-{name}"
    return [
        "run",
        *EXPERIMENT,
        "--set",
        f"run.run_dir={runs}",
        "--summary",
        str(services.root / f"{name}.json"),
        *extra,
    ]


def _summary(services: Services, name: str) -> dict:
    return json.loads((services.root / f"{name}.json").read_text())


def _timing(key: str) -> bool:
    return key.startswith("time_") or "seconds" in key


def _points(uri: str, run_id: str) -> tuple[set, int]:
    """Every metric point of a population run and its variant runs, as (run, key, step, value)
    (a timing's value left out), and how many points or variant runs are there twice."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(run_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=5000)
    ids = [k.data.tags["forkpop.variant_id"] for k in kids]
    doubles = len(ids) - len(set(ids))
    points = set()
    for name, run in [("parent", parent), *zip(ids, kids, strict=True)]:
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            doubles += len(history) - len({m.step for m in history})
            points |= {(name, key, m.step, None if _timing(key) else m.value) for m in history}
    return points, doubles


@pytest.fixture(scope="module")
def cluster_run(cluster) -> dict:
    """The experiment on the two-node Ray, tracked on the server, undisturbed."""
    rc, _, err = cluster.forkpop(
        "calm", *_run(cluster, "calm"), "--address", cluster.address, "--tracking-uri", cluster.uri
    )
    assert rc == 0, err[-3000:]
    return _summary(cluster, "calm")


def test_the_two_node_cluster_and_the_tracking_server_listen_on_loopback_only(cluster, cluster_run):
    from sockets import is_loopback, listening, network_address, reachable

    seen = set().union(*(listening(p.pid) for p in cluster.procs if p.poll() is None))
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in seen} and len(seen) >= 5, seen
    assert all(is_loopback(ip) for _, ip, _ in seen), sorted(s for s in seen if not is_loopback(s[1]))
    ip = network_address()
    assert ip is None or not any(reachable(ip, port) for _, _, port in seen)


def test_a_run_spreads_over_both_nodes_and_its_whole_lineage_is_on_the_server(cluster, cluster_run):
    from forkpop.population import Lineage, Origin
    from mlflow import MlflowClient

    nodes = {w["node"] for w in cluster_run["workers"]}
    assert nodes == {cluster.node_id("head"), cluster.node_id("node2")}  # one actor on each Ray node
    run_id = cluster_run["mlflow_run_id"]
    client = MlflowClient(cluster.uri)
    assert set(client.get_run(run_id).data.tags["forkpop.ray_nodes"].split(",")) == nodes

    lineage = lineage_from_mlflow(run_id, cluster.uri)
    forks = {f"g{g:02d}-v{i:03d}" for g in range(GENERATIONS) for i in range(SIZE)}
    seeds = {f"g{g:02d}-seed" for g in range(GENERATIONS + 1)}
    assert {v.id for v in lineage} == forks | seeds
    for v in lineage:
        parents = lineage.parents(v.id)  # every parent is in the lineage too
        if v.origin == Origin.FORK:
            assert len(parents) == 1 and parents[0].id in seeds and parents[0].generation <= v.generation
        elif v.origin == Origin.DISTILL:
            assert parents and all(p.origin == Origin.FORK and p.generation == v.generation - 1 for p in parents)
    path = client.download_artifacts(run_id, "lineage.json", str(cluster.root))
    assert lineage == Lineage.from_dict(json.loads(Path(path).read_text()))  # what the driver held
    # the explorer, built by the writer through the server (mlflow-artifacts:/), one node per birth
    page = Path(client.download_artifacts(run_id, "explorer.html", str(cluster.root))).read_text()
    assert all(f'"{v.id}"' in page for v in lineage)
    assert "explorer.html" in client.get_run(run_id).data.tags["mlflow.note.content"]


def test_the_cluster_and_the_local_backend_give_the_same_run(cluster, cluster_run):
    local_uri = f"sqlite:///{cluster.root / 'local.db'}"
    rc, _, err = cluster.forkpop("local", *_run(cluster, "local", "--backend", "local", "--tracking-uri", local_uri))
    assert rc == 0, err[-3000:]
    local = _summary(cluster, "local")
    keys = ["seed_id", "seed_val_accuracy", "seed_test_accuracy", "best_fitness", "mean_fitness", "teachers"]
    assert [[h[k] for k in keys] for h in cluster_run["history"]] == [[h[k] for k in keys] for h in local["history"]]
    assert [h["diversity"] for h in cluster_run["history"]] == [h["diversity"] for h in local["history"]]
    assert _points(cluster.uri, cluster_run["mlflow_run_id"]) == _points(local_uri, local["mlflow_run_id"])


def _first_generation_done(services: Services, name: str) -> bool:
    return any((services.root / f"runs-{name}").glob("*/checkpoints/gen-0000"))


def test_a_tracking_server_outage_mid_run_loses_and_doubles_nothing(cluster, cluster_run):
    # Requests to the stopped server time out after 2 s, and may still be carried out when it goes on.
    proc = cluster.launch(
        "outage",
        *_run(cluster, "outage", "--address", cluster.address, "--tracking-uri", cluster.uri),
        env={"MLFLOW_HTTP_REQUEST_TIMEOUT": "2"},
    )
    _wait(lambda: _first_generation_done(cluster, "outage"), 120, "the first generation", proc)
    cluster.signal_server(signal.SIGSTOP)
    try:
        _wait(lambda: "is not answering" in cluster.log("outage.err"), 60, "the run meeting the outage", proc)
        time.sleep(3)  # the outage itself, while writes are retried
    finally:
        cluster.signal_server(signal.SIGCONT)
    rc, _, err = cluster.result(proc)
    assert rc == 0, err[-3000:]
    assert "is not answering" in err and "answers again" in err  # writes were cut off, then retried
    points, doubles = _points(cluster.uri, _summary(cluster, "outage")["mlflow_run_id"])
    calm, calm_doubles = _points(cluster.uri, cluster_run["mlflow_run_id"])
    assert doubles == calm_doubles == 0
    assert points == calm


def test_a_server_down_past_the_patience_stops_the_run_and_resume_finishes_it(cluster, cluster_run):
    proc = cluster.launch(
        "down",
        *_run(cluster, "down", "--address", cluster.address, "--tracking-uri", cluster.uri),
        env={"FORKPOP_TRACKING_PATIENCE_S": "3"},
    )
    _wait(lambda: _first_generation_done(cluster, "down"), 120, "the first generation", proc)
    cluster.stop_server()
    try:
        rc, _, err = cluster.result(proc, timeout=120)
    finally:
        cluster.start_server()  # on the same port and store
    lines = err.strip().splitlines()
    assert rc == 2, err[-3000:]
    assert "unreachable" in lines[-1] and "forkpop resume" in lines[-1], lines[-1]
    assert sum("forkpop resume" in line for line in lines) == 1 and "Traceback" not in err
    (run_dir,) = [d for d in (cluster.root / "runs-down").iterdir() if (d / "run.json").exists()]
    assert str(run_dir) in lines[-1]
    assert 1 <= len(list((run_dir / "checkpoints").glob("gen-[0-9]*"))) < GENERATIONS

    rc, out, err = cluster.forkpop("down-resume", "resume", str(run_dir), "--quiet", "--address", cluster.address)
    assert rc == 0, err[-3000:]
    assert "final seed" in out
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    calm_id = cluster_run["mlflow_run_id"]
    assert lineage_from_mlflow(run_id, cluster.uri) == lineage_from_mlflow(calm_id, cluster.uri)
    points, doubles = _points(cluster.uri, run_id)
    assert doubles == 0
    assert points == _points(cluster.uri, calm_id)[0]


def test_a_write_whose_answer_was_lost_is_not_made_twice(cluster, monkeypatch):
    """Every other create, log and close lands on the server but its answer is lost: each
    retry finds what landed and writes only the rest."""
    from functools import partial

    import requests
    from forkpop.experiments.tracking import RUN_KEY_TAG, _attempt, _Retry, _Writer
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    calls: dict[str, int] = {}

    def losing(method):
        original = getattr(MlflowClient, method)

        def lost(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            calls[method] = calls.get(method, 0) + 1
            if calls[method] % 2:
                raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected())")
            return out

        return lost

    batch = [
        (
            f"g00-v{i:03d}",
            {"forkpop.variant_id": f"g00-v{i:03d}", "forkpop.generation": "0", "forkpop.origin": "fork"},
            {"gene.lr": "0.1"},
            {"val_accuracy": 0.5 + i / 10},
            {"loss_epoch": [(0, 2.0), (1, 1.0), (2, 0.5)]},  # (step, value), as Tracker.log_variant hands them on
        )
        for i in range(3)
    ]
    writer, retry, ts = _Writer(cluster.uri, "lost-answers", None), _Retry("test", 60.0, sleep=lambda s: None), 1
    run_key = secrets.token_hex(8)
    with monkeypatch.context() as m:
        for method in ("create_run", "log_batch", "set_terminated"):
            m.setattr(MlflowClient, method, losing(method))
        retry.run(partial(_attempt, writer.start, ("parent", {RUN_KEY_TAG: run_key}, {"p": "1"}), ts))
        retry.run(partial(_attempt, writer.variants, (batch,), ts))
        retry.run(partial(_attempt, writer.generation, (0, {"seed_val_accuracy": 0.9}), ts))
    client = MlflowClient(cluster.uri)
    stray = {"mlflow.parentRunId": writer.run_id, **batch[0][1]}  # a create carried out after the look-up
    client.create_run(writer.experiment_id, tags=stray, run_name="g00-v000")
    retry.run(partial(_attempt, writer.finish, ("FINISHED",), ts))
    assert retry.retries >= 6

    assert len(client.search_runs([writer.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{run_key}'")) == 1
    points, doubles = _points(cluster.uri, writer.run_id)
    assert doubles == 0
    assert points == {("parent", "seed_val_accuracy", 0, 0.9)} | {
        (f"g00-v{i:03d}", key, step, value)
        for i in range(3)
        for key, step, value in [("val_accuracy", 0, 0.5 + i / 10), ("loss_epoch", 0, 2.0), ("loss_epoch", 1, 1.0)]
        + [("loss_epoch", 2, 0.5)]
    }
    kids = client.search_runs([writer.experiment_id], f"tags.mlflow.parentRunId = '{writer.run_id}'")
    assert {k.info.status for k in kids} == {"FINISHED"}


def test_retries_back_off_from_half_a_second_to_eight_and_stop_at_the_patience():
    from forkpop.experiments.tracking import TrackingUnreachable, _Retry

    now, sleeps, tries = [0.0], [], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    def down(again):
        tries.append(again)
        raise ConnectionError("Connection refused")

    retry = _Retry("http://tracking:5000", 30.0, sleep=sleep, clock=lambda: now[0])
    with pytest.raises(
        TrackingUnreachable, match=r"http://tracking:5000 has been unreachable for 30s \(connection refused\)"
    ):
        retry.run(down)
    assert sleeps == [0.5, 1, 2, 4, 8, 8, 6.5] and tries == [False] + [True] * 7

    def refused(again):
        raise ValueError("a bad value is not retried")

    with pytest.raises(ValueError):
        retry.run(refused)
    flaky = iter([ConnectionError("reset"), TimeoutError("slow"), None])

    def twice(again):
        if (e := next(flaky)) is not None:
            raise e
        return "written"

    assert retry.run(twice) == "written"
