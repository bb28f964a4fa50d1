"""Shared fixtures: a tiny config, a temp MLflow store, and one real local Ray per session."""

from __future__ import annotations

import os

import pytest
from forkpop.experiments.config import ExperimentConfig, build_config, deep_merge

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def tiny_config(tmp_path, **sections) -> ExperimentConfig:
    """A 2-generation, 6-variant run on digits that takes a second or two."""
    raw = {
        "run": {"name": "tiny", "generations": 2, "backend": "local", "run_dir": str(tmp_path / "runs")},
        "data": {"n_niches": 6, "alpha": 0.5},
        "population": {"size": 6, "genes": {"epochs": {"low": 1, "high": 3, "init": 2, "kind": "int"}}},
        "selection": {"k": 3},
        "distill": {"steps": 30},
    }
    return build_config(deep_merge(deep_merge(ExperimentConfig().model_dump(mode="json"), raw), sections))


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray for the whole test session: 2 CPUs, no dashboard, listening on loopback only."""
    import ray
    from forkpop.workers.ray_pool import start_local_ray

    if not ray.is_initialized():
        start_local_ray(2)
    yield ray
    ray.shutdown()


def require_native() -> None:
    """Skip a test of the native kernel where it cannot build here (no C compiler), unless
    ``FORKPOP_REQUIRE_NATIVE=1`` (CI sets it): then it fails with the reason."""
    import os

    from forkpop.population import native

    lib, why = native.kernel()
    if lib is None:
        if os.environ.get("FORKPOP_REQUIRE_NATIVE") == "1":
            pytest.fail(f"the native kernel is required here: {why}")
        pytest.skip(f"the native kernel does not build here: {why}")
