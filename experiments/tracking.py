"""MLflow lineage tracking: the only module that talks to MLflow.

The driver is the only writer. Its calls queue plain data for a tracking process, which
writes in batches (one ``log_batch`` per variant), so learning never waits on the store.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import time
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
    """Writes one parent run per population run and one nested run per variant.

    The writes happen in a child process (started at once, so MLflow's import and store
    set-up overlap Ray's start), at a lower CPU priority: MLflow's SQL store costs several
    milliseconds of CPU per run and must not hold the driver's interpreter lock or take the
    cores from the learners. Calls queue plain data; ``flush`` waits until it is written.
    With ``FORKPOP_TRACKING_PROFILE=1`` the process prints each write's seconds to stderr.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None, nice: int = 10):
        import multiprocessing as mp

        self.uri = uri
        self.experiment = experiment
        self.run_id: str | None = None
        self.cpu_seconds = 0.0
        self._busy_seconds = 0.0
        self._error: str | None = None
        self._token = 0
        ctx = mp.get_context("spawn")
        self._jobs = ctx.Queue()
        self._acks = ctx.Queue()
        root = str(artifact_root) if artifact_root is not None else None
        self._proc = ctx.Process(
            target=_writer_main,
            args=(uri, experiment, root, nice, self._jobs, self._acks),
            name="forkpop-tracking",
            daemon=True,
        )
        self._proc.start()

    # -- the driver's API ------------------------------------------------------------------
    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> None:
        params = {k: redact(k, _param_str(v)) for k, v in params.items()}
        tags = {k: redact(k, str(v)) for k, v in tags.items()}
        self._jobs.put(("start", run_name, tags, params))

    def attach(self, run_id: str, generation: int, last_metrics: dict[str, float] | None) -> None:
        """Continue the existing parent run ``run_id`` after ``generation`` (its last
        checkpoint): runs written for later generations are deleted (they are made again),
        the last generation's metrics are written if the kill came before them."""
        self._jobs.put(("attach", run_id, generation, last_metrics))

    def wait_started(self, timeout: float = 120.0) -> str:
        if self.run_id is None:
            self._wait_for("started", timeout)
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
        vtags = {
            "forkpop.variant_id": variant.id,
            "forkpop.generation": str(variant.generation),
            "forkpop.origin": variant.origin.value,
            PARENT_TAG: ",".join(variant.parents),
            "forkpop.niche": "" if variant.niche is None else str(variant.niche),
            **(tags or {}),
        }
        params = {f"gene.{k}": repr(float(v)) for k, v in variant.genome.as_dict().items()}
        steps = {k: [float(x) for x in v] for k, v in (step_metrics or {}).items()}
        self._jobs.put(("variant", variant.id, vtags, params, {k: float(v) for k, v in metrics.items()}, steps))

    def log_generation(self, generation: int, metrics: dict[str, float]) -> None:
        self._jobs.put(("generation", generation, {k: float(v) for k, v in metrics.items()}))

    def log_text(self, text: str, name: str) -> None:
        self._jobs.put(("text", text, name))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._jobs.put(("tags", dict(tags)))

    def flush(self, timeout: float = 600.0) -> float:
        """Wait until everything queued is written; returns the writer's busy seconds so far."""
        self._token += 1
        self._jobs.put(("flush", self._token))
        self._wait_for("flushed", timeout, self._token)
        self._raise_if_failed()
        return self._busy_seconds

    def finish(self, status: str = "FINISHED", timeout: float = 600.0) -> None:
        """Close the parent run with ``status``, write what is queued and stop the writer."""
        if not self._proc.is_alive() and self._proc.exitcode is not None:
            self._raise_if_failed()
            return
        self._jobs.put(("finish", status))
        try:
            self._wait_for("finished", timeout)
        finally:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
        self._raise_if_failed()

    # -- acknowledgements from the writer ------------------------------------------------------
    def _wait_for(self, kind: str, timeout: float, token: int | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrackingError(f"MLflow at {self.uri} did not answer in {timeout:.0f}s; check --tracking-uri")
            try:
                msg = self._acks.get(timeout=min(left, 1.0))
            except queue.Empty:
                if not self._proc.is_alive():
                    self._error = self._error or f"the tracking writer process died (exit code {self._proc.exitcode})"
                    self._raise_if_failed()
                continue
            what = msg[0]
            if what == "started":
                self.run_id = msg[1]
            elif what == "error":
                self._error = self._error or msg[1]
                if kind == "started":
                    self._raise_if_failed()
            else:
                self._busy_seconds, self.cpu_seconds = msg[-2], msg[-1]
            if what == kind and (token is None or msg[1] == token):
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise TrackingError(f"MLflow at {self.uri} failed: {e}".splitlines()[0])


def _writer_main(uri: str, experiment: str, artifact_root: str | None, nice: int, jobs, acks) -> None:
    """The tracking process: writes the queued jobs to MLflow, in order, until ``finish``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the driver, which closes the run
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    w = _Writer(uri, experiment, Path(artifact_root) if artifact_root else None)
    error: str | None = None
    busy = 0.0
    held: list = []  # a job taken while gathering variants, handled next
    parent = os.getppid()
    while True:
        if held:
            job = held.pop()
        else:
            try:
                job = jobs.get(timeout=2.0)
            except queue.Empty:
                if os.getppid() != parent:  # the driver was killed: what it queued is written
                    job = ("finish", "KILLED")
                else:
                    continue
        kind = job[0]
        if kind == "flush":
            acks.put(("flushed", job[1], busy, time.process_time()))
            continue
        if kind == "finish":
            if error is None and w.run_id is not None:
                try:
                    w.client.set_terminated(w.run_id, job[1])
                except Exception as e:
                    error = f"{type(e).__name__}: {e}"
                    acks.put(("error", error))
            acks.put(("finished", busy, time.process_time()))
            return
        if error is not None:
            continue  # the first failure is reported; later writes are skipped
        t0 = time.perf_counter()
        try:
            if kind == "variant":  # every variant already queued goes in one transaction
                batch = [job[1:]]
                while len(batch) < 256:
                    try:
                        nxt = jobs.get_nowait()
                    except queue.Empty:
                        break
                    if nxt[0] != "variant":
                        held.append(nxt)
                        break
                    batch.append(nxt[1:])
                w.variants(batch)
            else:
                getattr(w, kind)(*job[1:])
            if kind in ("start", "attach"):
                acks.put(("started", w.run_id))
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            acks.put(("error", error))
        busy += time.perf_counter() - t0
        if os.environ.get("FORKPOP_TRACKING_PROFILE"):
            print(f"[tracking] {kind} {time.perf_counter() - t0:.4f}s", file=sys.stderr, flush=True)


class _Writer:
    """The MLflow calls, made in the tracking process."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None, use_bulk: bool = True):
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.run_id: str | None = None
        self.use_bulk = use_bulk

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, str]) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

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
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        self.bulk = _BulkSql.for_client(self.client, exp_id) if self.use_bulk else None
        self.bulk_off_reason = ""

    def attach(self, run_id: str, generation: int, last_metrics: dict[str, float] | None) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        self.client = MlflowClient(self.uri)
        run = self.client.get_run(run_id)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.client.update_run(run_id, status="RUNNING")
        kids = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=50000)
        for r in kids:
            t = r.data.tags
            gen, origin = int(t.get("forkpop.generation", 0)), t.get("forkpop.origin", "")
            stale = (origin == "fork" and gen > generation) or (origin == "distill" and gen > generation + 1)
            stale = stale or (origin == "seed" and generation < 0)
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, "KILLED")
            if stale:
                self.client.delete_run(r.info.run_id)
        have = {m.step for m in self.client.get_metric_history(run_id, "seed_val_accuracy")}
        # A generation redone after a corrupt checkpoint was logged before, with the same
        # figures (a run is deterministic): its metrics are not written twice.
        self.logged_steps = {s for s in have if s > generation}
        if last_metrics and generation >= 0:
            if generation not in have:
                ts = int(time.time() * 1000)
                ms = [Metric(k, float(v), ts, generation) for k, v in last_metrics.items()]
                for i in range(0, len(ms), MAX_METRICS_PER_BATCH):
                    self.client.log_batch(run_id, metrics=ms[i : i + MAX_METRICS_PER_BATCH])
        self.bulk = _BulkSql.for_client(self.client, self.experiment_id) if self.use_bulk else None
        self.bulk_off_reason = ""

    def variants(self, batch: list[tuple]) -> None:
        """Nested runs for a batch of variants: in one SQL transaction where the store allows."""
        if self.bulk is not None:
            try:
                self.bulk.write(self.experiment_id, self.run_id, batch)
                return
            except Exception as e:  # an MLflow whose tables differ: the client API, from now on
                self.bulk, self.bulk_off_reason = None, f"{type(e).__name__}: {e}"
        for item in batch:
            self.variant(*item)

    def variant(
        self, name: str, tags: dict[str, str], params: dict[str, str], metrics: dict, steps: dict[str, list[float]]
    ) -> None:
        from mlflow.entities import Metric, Param

        ts = int(time.time() * 1000)
        run = self.client.create_run(
            self.experiment_id, tags={"mlflow.parentRunId": self.run_id, **tags}, run_name=name
        )
        rid = run.info.run_id
        ms = [Metric(k, v, ts, 0) for k, v in metrics.items()]
        for k, series in steps.items():
            ms.extend(Metric(k, v, ts, s) for s, v in enumerate(series))
        ps = [Param(k, v) for k, v in params.items()]
        for i in range(0, max(len(ms), 1), MAX_METRICS_PER_BATCH):
            self.client.log_batch(rid, metrics=ms[i : i + MAX_METRICS_PER_BATCH], params=ps if i == 0 else [])
        self.client.set_terminated(rid, "FINISHED")

    def generation(self, generation: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        if generation in getattr(self, "logged_steps", ()):
            return
        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, generation) for k, v in metrics.items()])

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


class _BulkSql:
    """Many finished nested runs in one transaction, through MLflow's own SQL table models.

    MLflow's client API costs three transactions and ~15 ms of CPU per run (create, log,
    terminate); a generation's variants are written here as the same rows (the store's
    ``create_run`` + ``log_batch`` + ``set_terminated`` would write: run, tags, params,
    metrics, latest metrics) in one. Only for SQL stores; anything unexpected makes the
    writer go back to the client API (tests compare both paths row for row).
    """

    def __init__(self, store: Any, experiment_id: str, artifact_location: str):
        self.store = store
        self.experiment_id = experiment_id
        self.artifact_location = artifact_location

    @classmethod
    def for_client(cls, client: Any, experiment_id: str) -> _BulkSql | None:
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = client._tracking_client.store
            if not isinstance(store, SqlAlchemyStore):
                return None
            return cls(store, experiment_id, client.get_experiment(experiment_id).artifact_location)
        except Exception:
            return None

    def write(self, experiment_id: str, parent_run_id: str, batch: list[tuple]) -> None:
        import uuid

        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
        from mlflow.utils.uri import append_to_uri_path

        ts = int(time.time() * 1000)
        runs, tags_rows, param_rows, metric_rows, latest_rows = [], [], [], [], []
        for name, tags, params, metrics, steps in batch:
            run_id = uuid.uuid4().hex
            runs.append(
                {
                    "run_uuid": run_id,
                    "name": name,
                    "source_type": "UNKNOWN",
                    "source_name": "",
                    "entry_point_name": "",
                    "user_id": "unknown",
                    "status": "FINISHED",
                    "start_time": ts,
                    "end_time": ts,
                    "deleted_time": None,
                    "source_version": "",
                    "lifecycle_stage": "active",
                    "artifact_uri": append_to_uri_path(self.artifact_location, run_id, "artifacts"),
                    "experiment_id": int(experiment_id),
                }
            )
            all_tags = {"mlflow.parentRunId": parent_run_id, **tags, "mlflow.runName": name}
            tags_rows.extend({"key": k, "value": v, "run_uuid": run_id} for k, v in all_tags.items())
            param_rows.extend({"key": k, "value": v, "run_uuid": run_id} for k, v in params.items())
            series = {k: [(0, v)] for k, v in metrics.items()}
            for k, vs in steps.items():
                series.setdefault(k, []).extend(enumerate(vs))
            for k, points in series.items():
                seen = set()
                latest = None
                for step, v in points:
                    is_nan, value = _sql_metric_value(v)
                    if (step, value, is_nan) in seen:
                        continue
                    seen.add((step, value, is_nan))
                    metric_rows.append(
                        {"key": k, "value": value, "timestamp": ts, "step": step, "is_nan": is_nan, "run_uuid": run_id}
                    )
                    if latest is None or (step, value) > (latest["step"], latest["value"]):
                        latest = metric_rows[-1]
                latest_rows.append(dict(latest))
        with self.store.ManagedSessionMaker(read_only=False) as session:
            for model, rows in (
                (SqlRun, runs),
                (SqlTag, tags_rows),
                (SqlParam, param_rows),
                (SqlMetric, metric_rows),
                (SqlLatestMetric, latest_rows),
            ):
                if rows:
                    session.execute(model.__table__.insert(), rows)


def _sql_metric_value(v: float) -> tuple[bool, float]:
    """As MLflow's SQL store keeps a metric: NaN as 0 with a flag, infinities as the float limits."""
    if math.isnan(v):
        return True, 0.0
    if math.isinf(v):
        return False, 1.7976931348623157e308 if v > 0 else -1.7976931348623157e308
    return False, float(v)


class TrackingError(RuntimeError):
    pass


_SECRET_KEYS = ("token", "password", "passwd", "secret", "api_key", "apikey", "credential")


def redact(key: str, value: str) -> str:
    """A value fit to record: secrets by key name hidden, credentials in URIs removed."""
    import re

    if any(w in key.lower() for w in _SECRET_KEYS):
        return "***"
    # scheme://user:password@host -> scheme://***@host
    return re.sub(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\1***@", value)


def redact_tree(tree: Any, key: str = "") -> Any:
    """A nested config (dicts, lists, scalars) with :func:`redact` applied to every string leaf."""
    if isinstance(tree, dict):
        return {k: redact_tree(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact_tree(v, key) for v in tree]
    if isinstance(tree, str) or (tree is not None and any(w in key.lower() for w in _SECRET_KEYS)):
        return redact(key, str(tree))
    return tree


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
