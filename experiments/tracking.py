"""MLflow lineage tracking: the only module that talks to MLflow.

The driver is the only writer. Calls queue work for one background thread, which writes in
batches (one ``log_batch`` per variant), so learning never waits on the store.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from population.genome import Genome
from population.lineage import Lineage
from population.variant import Origin, Variant

PARENT_TAG = "forkpop.parent_ids"
TAGS = ("forkpop.variant_id", "forkpop.generation", "forkpop.origin", PARENT_TAG, "forkpop.niche")
MAX_METRICS_PER_BATCH = 1000


def resolve_tracking_uri(cli_uri: str | None, config_uri: str | None, run_root: Path) -> str:
    """``--tracking-uri``, then ``MLFLOW_TRACKING_URI``, then the config, then SQLite under run_root."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if uri:
        return uri
    run_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_root / 'mlflow.db').resolve()}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


class Tracker:
    """Writes one parent run per population run and one nested run per variant."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        self.uri = uri
        self.experiment = experiment
        self.artifact_root = artifact_root
        self.run_id: str | None = None
        self._q: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._busy_seconds = 0.0
        self.cpu_seconds = 0.0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._work, name="forkpop-tracking", daemon=True)
        self._thread.start()

    # -- the writer thread ---------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is None:
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    job()
                except BaseException as e:  # reported to the driver at the next flush
                    self._error = e
                self._busy_seconds += time.perf_counter() - t0
                self.cpu_seconds += time.thread_time() - c0
            self._q.task_done()

    def _submit(self, job: Callable[[], None]) -> None:
        self._q.put(job)

    # -- the driver's API ------------------------------------------------------------------
    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        def job() -> None:
            from mlflow import MlflowClient
            from mlflow.entities import Param, RunTag

            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                loc = None
                if self.artifact_root is not None and _is_local_store(self.uri):
                    loc = (self.artifact_root / "mlartifacts").resolve().as_uri()
                exp_id = self.client.create_experiment(self.experiment, artifact_location=loc)
            else:
                exp_id = exp.experiment_id
            self.experiment_id = exp_id
            run = self.client.create_run(exp_id, tags={"mlflow.runName": run_name, **tags}, run_name=run_name)
            self.run_id = run.info.run_id
            self.client.log_batch(
                self.run_id,
                params=[Param(k, _param_str(v)) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
            )
            self._ready.set()

        self._submit(job)

    def wait_started(self, timeout: float = 120.0) -> str:
        if not self._ready.wait(timeout):
            self._raise_if_failed()
            raise RuntimeError("the MLflow store did not answer; check --tracking-uri")
        assert self.run_id is not None
        return self.run_id

    def log_variant(
        self,
        variant: Variant,
        metrics: dict[str, float],
        step_metrics: dict[str, list[float]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """One nested run for ``variant``: lineage tags, genome params, final and per-step metrics."""

        def job() -> None:
            from mlflow.entities import Metric, Param

            ts = int(time.time() * 1000)
            all_tags = {
                "mlflow.parentRunId": self.run_id,
                "forkpop.variant_id": variant.id,
                "forkpop.generation": str(variant.generation),
                "forkpop.origin": variant.origin.value,
                PARENT_TAG: ",".join(variant.parents),
                "forkpop.niche": "" if variant.niche is None else str(variant.niche),
                **(tags or {}),
            }
            run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=variant.id)
            rid = run.info.run_id
            ms = [Metric(k, float(v), ts, 0) for k, v in metrics.items()]
            for k, series in (step_metrics or {}).items():
                ms.extend(Metric(k, float(v), ts, s) for s, v in enumerate(series))
            params = [Param(f"gene.{k}", repr(float(v))) for k, v in variant.genome.as_dict().items()]
            for i in range(0, max(len(ms), 1), MAX_METRICS_PER_BATCH):
                self.client.log_batch(rid, metrics=ms[i : i + MAX_METRICS_PER_BATCH], params=params if i == 0 else [])
            self.client.set_terminated(rid, "FINISHED")

        self._submit(job)

    def log_generation(self, generation: int, metrics: dict[str, float]) -> None:
        def job() -> None:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            ms = [Metric(k, float(v), ts, generation) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=ms)

        self._submit(job)

    def log_text(self, text: str, name: str) -> None:
        self._submit(lambda: self.client.log_text(self.run_id, text, name))

    def set_tags(self, tags: dict[str, str]) -> None:
        def job() -> None:
            from mlflow.entities import RunTag

            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

        self._submit(job)

    def flush(self) -> float:
        """Wait until everything queued is written; returns the writer's busy seconds so far."""
        self._q.join()
        self._raise_if_failed()
        return self._busy_seconds

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None and self._error is None:
            self._submit(lambda: self.client.set_terminated(self.run_id, status))
        self._q.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise TrackingError(f"MLflow at {self.uri} failed: {type(e).__name__}: {e}".splitlines()[0]) from e


class TrackingError(RuntimeError):
    pass


def _param_str(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def lineage_from_mlflow(run_id: str, tracking_uri: str | None = None) -> Lineage:
    """Rebuild a population run's :class:`Lineage` from its nested MLflow runs alone."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'", max_results=50000
    )
    records = []
    for r in runs:
        t = r.data.tags
        if "forkpop.variant_id" not in t:
            continue
        genome = {k.removeprefix("gene."): float(v) for k, v in r.data.params.items() if k.startswith("gene.")}
        records.append(
            Variant(
                id=t["forkpop.variant_id"],
                genome=Genome(genome),
                generation=int(t["forkpop.generation"]),
                origin=Origin(t["forkpop.origin"]),
                parents=tuple(p for p in t.get(PARENT_TAG, "").split(",") if p),
                niche=int(t["forkpop.niche"]) if t.get("forkpop.niche") else None,
            ).to_dict()
        )
    return Lineage.from_dict({"variants": records})
