"""Backends that host the learners: in-process (``local``) or Ray actors (``ray``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from forkpop.workers.learner import ForkTask, LearnerSpec, LearnResult, build_learner


class ClusterError(ValueError):
    """A cluster setting a user must change (an unsafe address, say): one line."""


@dataclass
class PoolStats:
    """Timing of the last ``learn`` call: wall time and the slowest worker's compute time."""

    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    worker_seconds: list[float] = field(default_factory=list)

    @property
    def overhead_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.compute_seconds)


# Measured on 2 cores (digits MLP, batch 16): 64 variants learn as fast in one actor as in
# two; 128 learn 1.4x faster in two.
VARIANTS_PER_CPU_WORKER = 64


def plan_workers(
    resources: dict[str, float],
    spec: LearnerSpec,
    n_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    n_variants: int | None = None,
) -> tuple[int, dict[str, float]]:
    """How many actors, and the resources each asks for, from what the cluster reports.

    One actor per GPU when the device may be CUDA and there are GPUs; otherwise one per
    ``cpus_per_worker`` CPUs, but, with the batched engine, no more than one per
    ``VARIANTS_PER_CPU_WORKER`` variants (a smaller group does not fill a core, so fewer
    actors learn as fast and leave cores to the driver). ``n_workers`` overrides the count,
    up to the actors the cluster has room for: an actor holds its CPUs for the whole run, so
    one that found no room would wait for ever; past the slots, each actor takes a larger
    group (its variants learn together, or one after another with the loop engine).
    """
    gpus = int(resources.get("GPU", 0)) if spec.device in ("auto", "cuda") else 0
    if spec.device == "cuda" and gpus == 0:
        raise ValueError("run.device=cuda but the Ray cluster reports no GPU; use run.device=auto or cpu")
    if n_workers is None:
        if gpus:
            n_workers = gpus
        else:
            n_workers = max(1, int(int(resources.get("CPU", 1)) // max(cpus_per_worker, 1e-9)))
            if n_variants is not None and spec.engine == "batched":
                per = getattr(spec, "variants_per_worker", VARIANTS_PER_CPU_WORKER)
                n_workers = max(1, min(n_workers, n_variants // per))
    if not gpus:
        slots = int(float(resources.get("CPU", 1)) // max(cpus_per_worker, 1e-9))
        n_workers = max(1, min(n_workers, slots))
    opts: dict[str, float] = {"num_cpus": cpus_per_worker}
    if gpus:
        opts["num_gpus"] = min(1.0, gpus / n_workers)
    return n_workers, opts


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class Pool(Protocol):
    stats: PoolStats
    n_workers: int

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]: ...

    def submit(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> Any: ...

    def collect(self, handle: Any) -> tuple[torch.Tensor, list[LearnResult]]: ...

    def describe(self) -> list[dict]: ...

    def close(self) -> None: ...


class LocalPool:
    """Runs the learner in this process (one group, batched or loop): for debugging and tests."""

    n_workers = 1

    def __init__(self, spec: LearnerSpec):
        self.learner = build_learner(spec)
        self.stats = PoolStats()

    def describe(self) -> list[dict]:
        return [{"node": "local", "ip": "127.0.0.1", **self.learner.describe(), "peak_rss": peak_rss_bytes()}]

    def submit(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> Any:
        """In-process there is nothing to overlap: the work happens at :meth:`collect`."""
        return seed_weights, tasks

    def collect(self, handle: Any) -> tuple[torch.Tensor, list[LearnResult]]:
        return self.learn(*handle)

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        t0 = time.perf_counter()
        out = self.learner.learn(seed_weights, tasks)
        wall = time.perf_counter() - t0
        self.stats = PoolStats(wall, sum(r.seconds for r in out[1]), [wall])
        return out

    def close(self) -> None:
        pass


BACKENDS = ("local", "ray")


def make_pool(
    backend: str,
    spec: LearnerSpec,
    *,
    n_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    n_variants: int | None = None,
    retries: int = 2,
) -> Pool:
    """A pool for ``backend``; Ray is imported only when asked for."""
    if backend == "local":
        return LocalPool(spec)
    if backend == "ray":
        try:
            from forkpop.workers.ray_pool import RayPool
        except ImportError as e:  # pragma: no cover - ray is a declared dependency
            raise RuntimeError(f"backend 'ray' needs Ray ({e}); pip install 'ray' or use run.backend=local") from None
        return RayPool(spec, n_workers, cpus_per_worker, n_variants=n_variants, retries=retries)
    raise ValueError(f"unknown run.backend {backend!r}; use one of {BACKENDS}")
