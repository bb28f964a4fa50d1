"""The Ray backend: actors each host a group of variants. The only module that imports Ray."""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import ray
import torch
from forkpop.workers.learner import (
    ForkTask,
    LearnerSpec,
    LearnResult,
    build_learner,
    pack_results,
    split_tasks,
    unpack_results,
)
from forkpop.workers.pool import ClusterError, PoolStats, peak_rss_bytes, plan_workers

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def token_auth_configured() -> bool:
    """Whether this process would connect to Ray with token authentication: ``RAY_AUTH_MODE``
    when it is set (``token``), else, as Ray does with it unset, whether a token is there to
    send (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or Ray's default ``~/.ray/auth_token``).
    Ray's own token loader is not asked: it caches the token for the life of the process."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.strip().lower() == "token"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip() or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return True
    try:
        return (Path.home() / ".ray" / "auth_token").is_file()
    except RuntimeError:  # no home directory
        return False


def check_address(address: str, allow_insecure: bool = False) -> None:
    """Refuse a Ray address off this machine unless token authentication is configured (see
    :func:`token_auth_configured`) or ``allow_insecure`` (``--allow-unauthenticated-ray``)."""
    host = _host(address)
    if host in LOOPBACK or allow_insecure or token_auth_configured():
        return
    raise ClusterError(
        f"Ray address {address} is not on this machine and Ray token authentication is not configured: anyone "
        "who reaches it can run code; set RAY_AUTH_MODE=token with a token (RAY_AUTH_TOKEN or "
        "`ray get-auth-token --generate`), or pass --allow-unauthenticated-ray"
    )


def ensure_ray(
    address: str | None = None, num_cpus: int | None = None, allow_insecure: bool = False, reachable: bool = False
) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray, no dashboard.

    A local Ray listens on loopback only (:func:`start_local_ray`); ``reachable`` starts it on
    the machine's address instead, so other nodes can join, and then needs Ray's token
    authentication configured (see :func:`token_auth_configured`).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address, allow_insecure)
        if _host(address) in LOOPBACK:  # a cluster on loopback: reached on loopback
            with _loopback_only(own_token=False):
                ray.init(address=address, **_INIT)
        else:
            ray.init(address=address, **_INIT)
    elif reachable:
        if not token_auth_configured():
            raise ClusterError(
                "run.reachable_ray starts a Ray that other machines can reach: configure Ray token "
                "authentication first (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or `ray get-auth-token --generate`)"
            )
        ray.init(num_cpus=num_cpus, **_INIT)
    else:
        start_local_ray(num_cpus)


_INIT: dict = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
# One per process: Ray keeps the first token it reads for the life of the process, so every
# local Ray this process starts (a notebook's second run) gets the same one.
_TOKEN = secrets.token_hex(32)


def _host(address: str) -> str:
    if address in ("auto", "local"):
        return "127.0.0.1"
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host.strip("[]") if host.startswith("[") else host


def start_local_ray(num_cpus: int | None = None, **kwargs: object) -> None:
    """Start a Ray on this machine that no other machine can reach (see :func:`_loopback_only`)."""
    with _loopback_only(own_token=True):
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **{**_INIT, **kwargs})


def _reload_auth_config() -> None:
    """Make Ray's C++ config read the authentication settings of the environment as it is now:
    it reads them when ``ray`` is imported, and a driver that imported Ray before the run set
    its token would otherwise connect without it (the GCS refuses: "Authentication token is
    missing")."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextmanager
def _loopback_only(own_token: bool) -> Iterator[None]:
    """Ray on loopback for what starts or connects inside.

    Ray 2.60 turns a loopback node address into the machine's network address on Linux, and
    its gRPC servers then listen on every interface. Its loopback-only mode (the one it uses
    on macOS and Windows: ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the node address on
    loopback, and every server (GCS, raylet, workers, the driver, the runtime-env agent)
    binds it. Ray's processes read it from their environment, this one from the flag it
    parsed at import: both are set. With ``own_token``, unless the user configured Ray's token
    authentication, the run also gets a random token (one per process, never logged), so a
    process of another user on this machine cannot submit work either. The environment is
    restored afterwards: processes started later (a tracking server, a second Ray) do not
    inherit it.
    """
    from ray._private import ray_constants

    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if own_token and not token_auth_configured():
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=_TOKEN)
    saved = {k: os.environ.get(k) for k in env}
    flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ.update(env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    _reload_auth_config()
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


INLINE_BYTES = 1 << 20


@ray.remote
class LearnerActor:
    """A Ray actor around the world's learner (:func:`build_learner`); returns weights and
    metrics, never logs."""

    def __init__(self, spec: LearnerSpec):
        self.learner = build_learner(spec)

    def ping(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> dict:
        """Where this actor computes and how: node (id and IP), device, engine, peak memory (bytes)."""
        return {
            "node": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            **self.learner.describe(),
            "peak_rss": peak_rss_bytes(),
        }

    def learn(self, seed_weights: np.ndarray, tasks: list[ForkTask]) -> tuple[np.ndarray, dict]:
        """Learn the group; weights and results come back as plain arrays (zero-copy in Ray)."""
        w, results = self.learner.learn(torch.from_numpy(seed_weights.copy()), tasks)
        return w.numpy(), pack_results(results)


def _failed(tasks: list[ForkTask], seed_weights: torch.Tensor, reason: str) -> tuple[np.ndarray, dict]:
    """Results for variants whose worker could not finish them: status ``failed``, no fitness."""
    res = [LearnResult(t.variant_id, val_accuracy=float("nan"), status="failed", reason=reason) for t in tasks]
    seed = seed_weights if seed_weights.dim() == 1 else seed_weights[0]
    w = seed.numpy()[None].repeat(len(tasks), 0)
    return w, pack_results(res)


class RayPool:
    """A fixed set of actors, started once and reused every generation.

    Without ``n_workers`` there is one actor per GPU Ray reports (when the spec's device
    allows CUDA), else one per CPU, but no more than one per ``VARIANTS_PER_CPU_WORKER``
    variants when the engine is batched. Each actor hosts its share of the population as one
    batched group. The seed's weights travel with the calls (or, when large, through the
    object store once per generation); each actor returns its group's weights as one array
    and its results as a few flat arrays. On a cluster of several nodes the actors are
    spread over the nodes (Ray would otherwise fill the driver's node first).
    """

    remote = True  # learning happens in other processes: its wall time beyond compute is overhead

    def __init__(
        self,
        spec: LearnerSpec,
        n_workers: int | None = None,
        cpus_per_worker: float = 1.0,
        address: str | None = None,
        n_variants: int | None = None,
        retries: int = 2,
    ):
        ensure_ray(address)
        self.n_workers, self._opts = plan_workers(ray.cluster_resources(), spec, n_workers, cpus_per_worker, n_variants)
        if sum(1 for n in ray.nodes() if n.get("Alive")) > 1:
            self._opts["scheduling_strategy"] = "SPREAD"
        self.spec = spec
        self.retries = retries
        self.actors = [LearnerActor.options(**self._opts).remote(spec) for _ in range(self.n_workers)]
        self._ready = [a.ping.remote() for a in self.actors]
        self.stats = PoolStats()
        self.replaced = 0  # actors lost and replaced so far

    def node_ids(self) -> list[str]:
        return ray.get(self._ready)

    def describe(self) -> list[dict]:
        """Each actor's node, device, engine and peak memory."""
        return ray.get([a.describe.remote() for a in self.actors])

    def submit(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple:
        """Start the generation's learning on the actors; :meth:`collect` waits for it."""
        t0 = time.perf_counter()
        groups = split_tasks(tasks, min(self.n_workers, len(tasks)))
        seed = seed_weights.numpy()
        # A small seed travels inside the calls; a large one goes to the object store once.
        seed_ref = ray.put(seed) if seed.nbytes > INLINE_BYTES and len(groups) > 1 else seed
        refs = [a.learn.remote(seed_ref, g) for a, g in zip(self.actors, groups, strict=False)]
        return t0, refs, groups, tasks, seed_weights, seed_ref

    def collect(self, handle: tuple) -> tuple[torch.Tensor, list[LearnResult]]:
        """Wait for every group. A group whose actor dies (killed, out of memory) is re-run
        from the generation's start on a fresh actor, up to ``retries`` times; then its
        variants are recorded as failed, with the reason, and the generation goes on."""
        t0, refs, groups, tasks, seed_weights, seed_ref = handle
        n_params = seed_weights.shape[-1]
        packed: list = [None] * len(refs)
        tries = [0] * len(refs)
        pending = {ref: k for k, ref in enumerate(refs)}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            k = pending.pop(ready)
            try:
                packed[k] = ray.get(ready)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                tries[k] += 1
                self._replace(k)
                if tries[k] <= self.retries:
                    pending[self.actors[k].learn.remote(seed_ref, groups[k])] = k
                    continue
                reason = f"worker lost {tries[k]} times ({type(e).__name__}); gave up after run.retries={self.retries}"
                packed[k] = _failed(groups[k], seed_weights, reason)
        outs = [(w, unpack_results(p)) for w, p in packed]
        wall = time.perf_counter() - t0
        per_worker = [sum(r.seconds for r in res) for _, res in outs]
        self.stats = PoolStats(wall, max(per_worker, default=0.0), per_worker)
        # Back into the order of ``tasks``, whatever group each ran in.
        where = {r.variant_id: (k, i) for k, (_, res) in enumerate(outs) for i, r in enumerate(res)}
        order = [where[t.variant_id] for t in tasks]
        if not order:
            return torch.empty(0, n_params), []
        weights = torch.from_numpy(np.stack([outs[k][0][i] for k, i in order]))
        return weights, [outs[k][1][i] for k, i in order]

    def _replace(self, k: int) -> None:
        try:
            ray.kill(self.actors[k])
        except Exception:  # already gone
            pass
        self.actors[k] = LearnerActor.options(**self._opts).remote(self.spec)
        self.replaced += 1

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        return self.collect(self.submit(seed_weights, tasks))

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
