"""A local run opens no socket another machine can reach: every listening socket of the run's
process tree (driver, Ray's GCS, raylet, workers, agents, the tracking process) is on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sockets import is_loopback, listening, network_address, reachable

pytestmark = pytest.mark.security


def _watch(proc: subprocess.Popen, timeout: float = 300) -> tuple[set, set]:
    """Every listening socket of ``proc``'s tree while it runs, and those reachable from this
    machine's network address."""
    seen: set = set()
    open_to_network: set = set()
    ip = network_address()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        new = listening(proc.pid) - seen
        seen |= new
        if ip is not None:
            open_to_network |= {s for s in new if reachable(ip, s[2])}
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    return seen, open_to_network


def test_a_run_on_local_ray_listens_on_loopback_only(tmp_path):
    cmd = [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--quiet", "--backend", "ray"]
    cmd += ["--set", f"run.run_dir={tmp_path}/runs", "--set", "run.generations=3"]
    cmd += ["--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--summary", f"{tmp_path}/s.json"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    with open(tmp_path / "out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        seen, open_to_network = _watch(proc)
    assert proc.wait() == 0, (tmp_path / "out").read_text()[-2000:]
    names = {name for name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # Ray's servers were seen while they ran
    assert all(is_loopback(ip) for _, ip, _ in seen), sorted(s for s in seen if not is_loopback(s[1]))
    assert not open_to_network, sorted(open_to_network)
    # Nothing of Ray's settings leaks to the run's output (the run's token is never logged).
    assert "RAY_AUTH_TOKEN" not in (tmp_path / "out").read_text()


def test_a_reachable_local_ray_needs_token_authentication(tmp_path):
    cmd = [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--quiet", "--reachable-ray"]
    cmd += ["--set", f"run.run_dir={tmp_path}/runs", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "token authentication" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 or "run.reachable_ray" in r.stderr
