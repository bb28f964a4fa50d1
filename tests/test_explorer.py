"""The explorer: one self-contained page per run, logged to the parent MLflow run at the run's end,
written by ``forkpop analyze`` and served by ``forkpop explore``; opened in a real headless
Chromium from MLflow's artifact view and from ``forkpop explore``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from browser import Requests, browser, screenshot
from forkpop.experiments import explorer
from forkpop.experiments.tracking import lineage_from_mlflow
from forkpop.population.variant import Origin

BIN = Path(sys.executable).parent
SMALL = [
    "--set", "run.generations=2", "--set", "population.size=8", "--set", "data.n_niches=4",
    "--set", "data.poison.niches=1", "--set", "distill.steps=40",
    "--set", "population.genes.epochs.init=3",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small poisoned run made by ``forkpop run`` (real SQLite store, real artifacts)."""
    tmp = tmp_path_factory.mktemp("explorer")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    p = subprocess.run(
        [BIN / "forkpop", "run", "digits_poisoned", "--quiet", "--tracking-uri", uri, "--summary", tmp / "s.json"]
        + [*SMALL, "--set", f"run.run_dir={tmp / 'runs'}"],
        capture_output=True,
        text=True,
        cwd=tmp,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads((tmp / "s.json").read_text())
    return {"tmp": tmp, "uri": uri, "id": s["mlflow_run_id"], "summary": s, "stdout": p.stdout}


def _client(run):
    from mlflow import MlflowClient

    return MlflowClient(run["uri"])


def _page_data(page: str) -> dict:
    m = re.search(r"<script type='application/json' id='forkpop-data'>(.*?)</script>", page, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_a_run_logs_its_explorer_its_description_and_the_model_training_view(run):
    c = _client(run)
    parent = c.get_run(run["id"])
    page = Path(c.download_artifacts(run["id"], explorer.ARTIFACT, str(run["tmp"] / "dl"))).read_text()
    assert len(page.encode()) <= 5e6
    assert not re.findall(r"""(?:src|href)\s*=\s*["']https?://""", page)  # nothing from another host
    assert "default-src 'none'" in page  # and the page's own policy forbids it
    data = _page_data(page)
    lin = lineage_from_mlflow(run["id"], run["uri"])
    assert sorted(data["nodes"]["id"]) == sorted(v.id for v in lin)  # one node per birth
    idx = {v: i for i, v in enumerate(data["nodes"]["id"])}
    edges = {
        (data["nodes"]["id"][p], data["nodes"]["id"][c]) for c, ps in enumerate(data["nodes"]["parents"]) for p in ps
    }
    assert edges == set(lin.edges())
    for v in lin:  # the genome shown is the one recorded
        got = dict(zip(data["genes"], data["genome"][idx[v.id]], strict=True))
        assert got == pytest.approx(v.genome.as_dict(), rel=1e-5)  # six significant digits
    poisoned = run["summary"]["poisoned_niches"]
    forks = [i for i, o in enumerate(data["nodes"]["origin"]) if o == explorer.ORIGINS.index("fork")]
    marked = {i for i in forks if data["nodes"]["flags"][i] & explorer.FLAGS["poisoned"]}
    assert poisoned and marked == {i for i in forks if data["nodes"]["niche"][i] in poisoned}
    assert any(data["nodes"]["audit"][i] for i in marked)  # the label audit's tag travels with it
    assert data["run"]["status"] == "FINISHED" and data["matrices"]
    assert data["metrics"]["seed_test_accuracy"][-1][1] == pytest.approx(run["summary"]["seed_test_accuracy"])
    note = parent.data.tags[explorer.NOTE_TAG]
    assert "final seed" in note and f"{run['summary']['seed_test_accuracy']:.4f}" in note
    assert explorer.ui_link(parent.info.experiment_id, run["id"]) in note
    exp = c.get_experiment(parent.info.experiment_id)
    assert exp.tags[explorer.EXPERIMENT_KIND_TAG] == explorer.EXPERIMENT_KIND
    assert f"runs/{run['id']}?{explorer.WORKFLOW}" in run["stdout"]  # the printed link opens that view


def test_the_store_is_read_the_same_by_sql_and_by_the_client(run, monkeypatch):
    c = _client(run)
    fast = explorer.explorer_data(c, run["id"])
    monkeypatch.setattr(explorer._SqlReads, "of", classmethod(lambda cls, client: None))
    assert explorer.explorer_data(c, run["id"]) == fast


def test_analyze_writes_the_explorer_beside_the_report_and_bad_ids_get_one_line(run):
    out = run["tmp"] / "rep"
    cli = [BIN / "forkpop", "analyze", run["id"], "--out", out, "--quiet", "--tracking-uri", run["uri"]]
    p = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1500:]
    assert "explorer.html" in (out / "report.html").read_text()
    assert len(_page_data((out / "explorer.html").read_text())["nodes"]["id"]) == len(
        lineage_from_mlflow(run["id"], run["uri"])
    )
    p = subprocess.run(
        [BIN / "forkpop", "explore", "nosuchrun", "--tracking-uri", run["uri"]], capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no MLflow run" in p.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(cmd: list, cwd: Path, pattern: str, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start a server in its own process group; wait for ``pattern`` (a URL) in its output."""
    log = cwd / f"server-{time.monotonic_ns()}.log"
    f = open(log, "w")  # noqa: SIM115 - the server writes to it while the test runs
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(pattern, log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    _stop(proc)
    raise AssertionError(f"no {pattern!r} from {cmd[:2]}: {log.read_text()[-1500:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a server this test started, by its own process group (never by name)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _open(page, url: str, frame_of=None):  # noqa: ANN001, ANN202
    """Go to ``url``; the explorer's frame (the page itself, or the blob frame MLflow made)."""
    page.goto(url)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        frames = [page.main_frame] if frame_of is None else [f for f in page.frames if f.url.startswith(frame_of)]
        for f in frames:
            try:
                if f.evaluate("document.body && document.body.dataset.ready") == "true":
                    return f
            except Exception:  # a frame still loading
                pass
        page.wait_for_timeout(250)  # (Playwright's events are handled while it waits)
    screenshot(page, "explorer-did-not-start")
    raise AssertionError(f"the explorer did not start at {url}")


@pytest.mark.explorer
def test_forkpop_explore_serves_a_page_where_a_click_shows_the_genome(run):
    lin = lineage_from_mlflow(run["id"], run["uri"])
    proc, url = _serve(
        [BIN / "forkpop", "explore", run["id"], "--port", "0", "--tracking-uri", run["uri"]],
        run["tmp"],
        r"at (http://127\.0\.0\.1:\d+/)",
    )
    try:
        with browser() as b:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            reqs = Requests(page)
            f = _open(page, url)
            assert f.evaluate("forkpopExplorer.nodeCount()") == len(lin)
            assert f.evaluate("forkpopExplorer.edgeCount()") == len(lin.edges())
            fork = next(v for v in lin if v.origin is Origin.FORK and v.generation == 1)
            f.evaluate(f"forkpopExplorer.center('{fork.id}')")
            pos = f.evaluate(f"forkpopExplorer.screenPosition('{fork.id}')")
            page.mouse.move(pos["x"], pos["y"])
            page.mouse.click(pos["x"], pos["y"])
            assert page.locator("#details").get_attribute("data-variant") == fork.id
            shown = dict(line.split("\t") for line in page.locator("#genome").inner_text().splitlines())
            assert {g: float(v) for g, v in shown.items()} == pytest.approx(fork.genome.as_dict(), rel=1e-3)
            assert f"niche\t{fork.niche}" in page.locator("#details").inner_text()
            # a distilled seed's teachers are listed, and one click away
            seed = next(v for v in lin if v.origin is Origin.DISTILL and v.generation == 1)
            f.evaluate(f"forkpopExplorer.select('{seed.id}')")
            assert f"teachers ({len(seed.parents)})" in page.locator("#details").inner_text()
            # wheel zooms, a drag pans, a generation's label picks it
            before = f.evaluate("forkpopExplorer.view.sx")
            box = page.locator("#graph").bounding_box()
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.mouse.wheel(0, -400)
            assert f.evaluate("forkpopExplorer.view.sx") > before
            tx = f.evaluate("forkpopExplorer.view.tx")
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] / 2 + 120, box["y"] + box["height"] / 2, steps=5)
            page.mouse.up()
            assert f.evaluate("forkpopExplorer.view.tx") == pytest.approx(tx + 120, abs=2)
            page.click("#fit")
            f.evaluate("forkpopExplorer.selectGeneration(0)")
            assert "Generation 0" in page.locator("#gen-panel").inner_text()
            assert page.locator("#heat").count() == 1
            shot = screenshot(page, "explorer-forkpop-explore")
            assert shot.stat().st_size > 10_000
            assert not errors, errors
            assert reqs.off_machine() == []
    finally:
        _stop(proc)


@pytest.mark.explorer
def test_the_explorer_runs_inside_mlflows_artifact_view(run):
    port = _free_port()
    db = run["uri"]
    proc, base = _serve(
        [BIN / "mlflow", "server", "--backend-store-uri", db, "--host", "127.0.0.1", "--port", str(port)]
        + ["--workers", "1"],
        run["tmp"],
        r"(http://127\.0\.0\.1:\d+)",
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # the server's log names its address before it answers
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer"
            time.sleep(0.5)
        exp = _client(run).get_run(run["id"]).info.experiment_id
        lin = lineage_from_mlflow(run["id"], run["uri"])
        with browser() as b:
            page = b.new_page(viewport={"width": 1500, "height": 1100})
            reqs = Requests(page)
            origin = f"http://127.0.0.1:{port}"
            f = _open(page, f"{origin}/{explorer.ui_link(exp, run['id'])}", frame_of=f"blob:{origin}/")
            assert f.evaluate("forkpopExplorer.nodeCount()") == len(lin)  # its scripts ran in MLflow's frame
            fork = next(v for v in lin if v.origin is Origin.FORK)
            f.evaluate(f"forkpopExplorer.select('{fork.id}')")
            link = f.locator("#mlflow-link")
            assert link.count() == 1 and link.get_attribute("href").startswith(f"{origin}/#/experiments/{exp}/runs/")
            page.wait_for_timeout(500)
            screenshot(page, "explorer-in-mlflow-artifact-view")
            # the run's page: the model-training view (the link's workflowType), the description
            page.goto(f"{origin}/#/experiments/{exp}/runs/{run['id']}?{explorer.WORKFLOW}")
            page.get_by_text("forkpop population run.").wait_for(timeout=60_000)
            assert page.get_by_text("Evaluation runs").count() == 0
            screenshot(page, "mlflow-run-page")
            assert reqs.off_machine() == []
    finally:
        _stop(proc)


def test_a_live_run_is_built_again_at_each_request_and_kept_once_ended(run):
    c = _client(run)
    exp = c.get_run(run["id"]).info.experiment_id
    live = c.create_run(exp, tags={"forkpop.kind": "population"}, run_name="live").info.run_id  # no births yet
    page = explorer.LivePage(live, run["uri"])
    assert not page.ended and _page_data(page.page)["nodes"]["id"] == []
    c.log_metric(live, "seed_test_accuracy", 0.5, step=0)
    assert _page_data(page())["metrics"]["seed_test_accuracy"] == [[0, 0.5]]
    c.set_terminated(live, "KILLED")
    page()
    assert page.ended
    c.log_metric(live, "seed_test_accuracy", 0.6, step=1)
    assert _page_data(page())["metrics"]["seed_test_accuracy"] == [[0, 0.5]]  # an ended run's page is kept
