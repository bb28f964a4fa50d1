"""Backends that host the learners: in-process (``local``) or Ray actors (``ray``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from workers.data import DataSpec, SplitPlan
from workers.learner import ForkTask, GroupLearner, LearnResult, ModelSpec


@dataclass
class PoolStats:
    """Timing of the last ``learn`` call: wall time and the slowest worker's compute time."""

    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    worker_seconds: list[float] = field(default_factory=list)

    @property
    def overhead_seconds(self) -> float:
        return max(0.0, self.wall_seconds - self.compute_seconds)


class Pool(Protocol):
    stats: PoolStats
    n_workers: int

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]: ...

    def close(self) -> None: ...


class LocalPool:
    """Runs the learner in this process, one variant after another: for debugging and tests."""

    n_workers = 1

    def __init__(
        self,
        data_spec: DataSpec,
        model_spec: ModelSpec,
        batch_size: int,
        torch_threads: int = 1,
        plan: SplitPlan | None = None,
    ):
        self.learner = GroupLearner(data_spec, model_spec, batch_size, torch_threads, plan)
        self.stats = PoolStats()

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
    data_spec: DataSpec,
    model_spec: ModelSpec,
    batch_size: int,
    *,
    torch_threads: int = 1,
    n_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    plan: SplitPlan | None = None,
) -> Pool:
    """A pool for ``backend``; Ray is imported only when asked for."""
    if backend == "local":
        return LocalPool(data_spec, model_spec, batch_size, torch_threads, plan)
    if backend == "ray":
        try:
            from workers.ray_pool import RayPool
        except ImportError as e:  # pragma: no cover - ray is a declared dependency
            raise RuntimeError(f"backend 'ray' needs Ray ({e}); pip install 'ray' or use run.backend=local") from None
        return RayPool(data_spec, model_spec, batch_size, torch_threads, n_workers, cpus_per_worker, plan=plan)
    raise ValueError(f"unknown run.backend {backend!r}; use one of {BACKENDS}")
