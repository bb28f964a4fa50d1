"""MLflow lineage tracking: the only module that talks to MLflow.

The driver is the only writer. Its calls queue plain data for a tracking process, which
writes in batches (one ``log_batch`` per variant), so learning never waits on the store.
A tracking server that stops answering is waited for: each write is retried with bounded
exponential backoff, idempotently, for ``FORKPOP_TRACKING_PATIENCE_S`` seconds in all.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from forkpop.population.genome import Genome
from forkpop.population.lineage import Lineage
from forkpop.population.variant import Origin, Variant

PARENT_TAG = "forkpop.parent_ids"
RUN_KEY_TAG = "forkpop.run_key"  # names a population run uniquely, so a retried create finds it
TAGS = ("forkpop.variant_id", "forkpop.generation", "forkpop.origin", PARENT_TAG, "forkpop.niche")
MAX_METRICS_PER_BATCH = 1000
PATIENCE_ENV = "FORKPOP_TRACKING_PATIENCE_S"
DEFAULT_PATIENCE_S = 120.0
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0
# One request to a server that accepts connections but does not answer (stopped, overloaded)
# gives up after this long and is retried; MLflow's own default is 120 s with 7 retries.
REQUEST_TIMEOUT_S = 60
_RETRY_STATUS = (429, 500, 502, 503, 504)


def resolve_tracking_uri(cli_uri: str | None, config_uri: str | None, run_root: Path) -> str:
    """``--tracking-uri``, then ``MLFLOW_TRACKING_URI``, then the config, then SQLite under run_root."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri
    if uri:
        return uri
    run_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(run_root / 'mlflow.db').resolve()}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def seed_sqlite_store(uri: str, cache_dir: Path | None = None) -> bool:
    """Make a new SQLite store as a copy of an empty one that MLflow migrated once (cached
    per MLflow version under ``~/.cache/forkpop``), instead of MLflow running its schema
    migrations on every new store (3.6 s of CPU here). The copy holds the tables only: MLflow
    adds its default experiment when it opens the store, as it does for a store it made.
    Returns whether a copy was made; anything unexpected leaves the store to MLflow."""
    if not uri.startswith("sqlite:///") or "?" in uri:
        return False
    path = Path(uri[len("sqlite:///") :])
    if path.exists():
        return False
    try:
        import mlflow
        import sqlalchemy
        from mlflow.store.db.utils import _initialize_tables

        root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "forkpop"
        template = root / f"mlflow-{mlflow.__version__}-empty-store.db"
        if not template.is_file():
            root.mkdir(parents=True, exist_ok=True)
            tmp = template.with_name(f"{template.name}.{os.getpid()}.tmp")
            tmp.unlink(missing_ok=True)
            engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
            try:
                _initialize_tables(engine)
            finally:
                engine.dispose()
            os.replace(tmp, template)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        try:
            os.link(tmp, path)  # never over a store another process made meanwhile
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True
    except Exception:
        return False


def tracking_patience(value: str | None = None) -> float:
    """Seconds a tracking server may stay unreachable before a run stops: ``FORKPOP_TRACKING_PATIENCE_S``."""
    raw = os.environ.get(PATIENCE_ENV) if value is None else value
    if raw in (None, ""):
        return DEFAULT_PATIENCE_S
    try:
        patience = float(raw)
    except ValueError:
        patience = float("nan")
    if not math.isfinite(patience) or patience < 0:
        raise TrackingError(f"{PATIENCE_ENV}={raw!r} is not a number of seconds >= 0; set it to e.g. 120")
    return patience


class Tracker:
    """Writes one parent run per population run and one nested run per variant.

    The writes happen in a child process, started before the driver imports torch so that
    MLflow's import (seconds) runs beside it; once the parent run is open it drops to a lower
    CPU priority: MLflow's SQL store costs milliseconds of CPU per run and must not hold the
    driver's interpreter lock or take the cores from the learners. Calls queue plain data;
    ``flush`` waits until it is written; the driver lets it lag by one generation.
    With ``FORKPOP_TRACKING_PROFILE=1`` the process prints each write's seconds to stderr.

    A tracking server (not a local store) that stops answering is retried with backoff
    for ``patience_s`` seconds (default: ``FORKPOP_TRACKING_PATIENCE_S``, else 120) while the
    queue holds what the driver logs; past that, :class:`TrackingUnreachable` is raised.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        artifact_root: Path | None = None,
        nice: int = 10,
        patience_s: float | None = None,
    ):
        import multiprocessing as mp

        self.uri = uri
        self.experiment = experiment
        self.patience_s = tracking_patience() if patience_s is None else float(patience_s)
        # How long the driver waits on the writer: past a whole outage and one hung request.
        self.timeout_s = max(600.0, self.patience_s + 2 * REQUEST_TIMEOUT_S + 60.0)
        self.run_id: str | None = None
        self.experiment_id = ""
        self.cpu_seconds = 0.0
        self._busy_seconds = 0.0
        self._error: str | None = None
        self._unreachable = False
        self._token = 0
        self._flushed = 0  # the last mark (flush token) the writer has reached without a failure
        ctx = mp.get_context("spawn")
        self._jobs = ctx.Queue()
        self._acks = ctx.Queue()
        root = str(artifact_root) if artifact_root is not None else None
        self._proc = ctx.Process(
            target=_writer_main,
            args=(uri, experiment, root, nice, self._jobs, self._acks, os.getpid(), self.patience_s),
            name="forkpop-tracking",
            daemon=True,
        )
        self._proc.start()

    # -- the driver's API ------------------------------------------------------------------
    def start(
        self,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        resume: tuple[int, dict[str, float] | None] | None = None,
    ) -> str:
        """Open the parent run (the driver does not wait: :meth:`poll` or :meth:`wait_started`
        tell its id). Returns its ``forkpop.run_key``, which finds it again before the id is
        known. ``resume=(generation, last_metrics)``: a run killed before its id was saved
        continues the run with that key, as :meth:`attach` would, or opens it if none was made."""
        params = {k: redact(k, _param_str(v)) for k, v in params.items()}
        tags = {k: redact(k, str(v)) for k, v in tags.items()}
        tags.setdefault(RUN_KEY_TAG, uuid.uuid4().hex)
        self._jobs.put(
            ("start", run_name, tags, params) if resume is None else ("rejoin", run_name, tags, params, *resume)
        )
        return tags[RUN_KEY_TAG]

    def poll(self) -> str | None:
        """The parent run's id once the writer has opened it (None before), without waiting;
        a failure the writer reported is raised here."""
        if self.run_id is None or self._error is None:
            self._drain()
        if self._error is not None and (self.run_id is None or self._unreachable):
            self._raise_if_failed()
        return self.run_id

    def started(self) -> bool:
        """Whether the writer has opened the parent run (without waiting)."""
        return self.poll() is not None

    def attach(self, run_id: str, generation: int, last_metrics: dict[str, float] | None) -> None:
        """Continue the existing parent run ``run_id`` after ``generation`` (its last
        checkpoint): runs written for later generations are deleted (they are made again),
        the last generation's metrics are written if the kill came before them."""
        self._jobs.put(("attach", run_id, generation, last_metrics))

    def wait_started(self, timeout: float | None = None) -> str:
        if self.run_id is None:
            self._wait_for("started", self.timeout_s if timeout is None else timeout)
        assert self.run_id is not None
        return self.run_id

    def log_variant(
        self,
        variant: Variant,
        metrics: dict[str, float],
        step_metrics: dict[str, list[float] | tuple[int, list[float]]] | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        """One nested run for ``variant``: lineage tags, genome params, final and per-step metrics
        (a series is a list from step 0, or ``(first_step, values)``)."""
        vtags = {
            "forkpop.variant_id": variant.id,
            "forkpop.generation": str(variant.generation),
            "forkpop.origin": variant.origin.value,
            PARENT_TAG: ",".join(variant.parents),
            "forkpop.niche": "" if variant.niche is None else str(variant.niche),
            **(tags or {}),
        }
        params = {f"gene.{k}": repr(float(v)) for k, v in variant.genome.as_dict().items()}
        steps = {}
        for k, v in (step_metrics or {}).items():
            first, values = v if isinstance(v, tuple) else (0, v)
            steps[k] = [(first + i, float(x)) for i, x in enumerate(values)]
        self._jobs.put(("variant", variant.id, vtags, params, {k: float(v) for k, v in metrics.items()}, steps))

    def log_generation(self, generation: int, metrics: dict[str, float]) -> None:
        self._jobs.put(("generation", generation, {k: float(v) for k, v in metrics.items()}))

    def log_text(self, text: str, name: str) -> None:
        self._jobs.put(("text", text, name))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._jobs.put(("tags", dict(tags)))

    def publish(self, summary_text: str) -> None:
        """After the run's last record: the explorer page as the parent run's artifact, and the
        run's description (``summary_text``, the closing table, and the explorer's link)."""
        self._jobs.put(("publish", summary_text))

    def flush(self, timeout: float | None = None) -> float:
        """Wait until everything queued is written; returns the writer's busy seconds so far."""
        self.wait_flushed(self.flush_async(), timeout)
        return self._busy_seconds

    def flush_async(self) -> int:
        """Mark what is queued so far; returns the mark's token (:meth:`wait_flushed`), at once."""
        self._token += 1
        self._jobs.put(("flush", self._token))
        return self._token

    def wait_flushed(self, token: int, timeout: float | None = None) -> None:
        """Wait until everything queued before mark ``token`` is written (raises what failed)."""
        if self._flushed < token:
            self._wait_for("flushed", self.timeout_s if timeout is None else timeout, token)
        self._raise_if_failed()

    def discard(self) -> None:
        """Stop a writer that was never given a run (its run failed on its input first)."""
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join(timeout=10)
        self._release_queues()

    def _release_queues(self) -> None:
        """Once the writer is gone: close the queues and drop them, so that their semaphores are
        released now. The CLI ends with ``os._exit``, which runs no finalizer, and Python's
        resource tracker would report them as leaked."""
        if self._proc.is_alive() or self._jobs is None:
            return
        for q in (self._jobs, self._acks):
            q.close()
            q.join_thread()
        self._jobs = self._acks = None

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        """Close the parent run with ``status``, write what is queued and stop the writer."""
        if not self._proc.is_alive() and self._proc.exitcode is not None:
            self._release_queues()
            self._raise_if_failed()
            return
        self._jobs.put(("finish", status))
        try:
            self._wait_for("finished", self.timeout_s if timeout is None else timeout)
        finally:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=10)
            self._release_queues()
        self._raise_if_failed()

    # -- acknowledgements from the writer ------------------------------------------------------
    def _drain(self) -> None:
        while self._acks is not None:  # (None: the writer has ended and its queues are closed)
            try:
                self._take(self._acks.get_nowait())
            except queue.Empty:
                return

    def _take(self, msg: tuple) -> None:
        what = msg[0]
        if what == "started":
            self.run_id = msg[1]
            self.experiment_id = msg[2] if len(msg) > 2 else ""
        elif what == "error":
            if self._error is None:
                self._error, self._unreachable = msg[1], msg[2:] == ("unreachable",)
        else:
            if what == "flushed" and self._error is None:  # a mark after a failure vouches for nothing
                self._flushed = max(self._flushed, msg[1])
            self._busy_seconds, self.cpu_seconds = msg[-2], msg[-1]

    def _wait_for(self, kind: str, timeout: float, token: int | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self._acks is not None:  # None: the writer ended after writing all it was given
            left = deadline - time.monotonic()
            if left <= 0:
                uri = redact("uri", self.uri)
                raise TrackingError(f"MLflow at {uri} did not answer in {timeout:.0f}s; check --tracking-uri")
            try:
                msg = self._acks.get(timeout=min(left, 1.0))
            except queue.Empty:
                if not self._proc.is_alive():
                    self._error = self._error or f"the tracking writer process died (exit code {self._proc.exitcode})"
                    self._raise_if_failed()
                continue
            self._take(msg)
            what = msg[0]
            if what == "error" and kind == "started":
                self._raise_if_failed()
            if what == kind and (token is None or msg[1] >= token):
                return

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            if self._unreachable:
                raise TrackingUnreachable(e.splitlines()[0])
            raise TrackingError(f"MLflow at {redact('uri', self.uri)} failed: {e}".splitlines()[0])


class NullTracker:
    """A tracker that records nothing (``forkpop.run(..., tracking=False)``): the run
    directory still gets its checkpoints and summary, MLflow gets no records."""

    uri = ""
    run_id = ""
    experiment_id = ""
    cpu_seconds = 0.0

    def start(self, run_name: str, tags: dict[str, str], params: dict[str, Any], resume=None) -> str:  # noqa: ANN001
        return ""

    def attach(self, run_id: str, generation: int, last_metrics: dict[str, float] | None) -> None:
        pass

    def poll(self) -> str:
        return ""

    def started(self) -> bool:
        return True

    def flush_async(self) -> int:
        return 0

    def wait_flushed(self, token: int, timeout: float | None = None) -> None:
        pass

    def wait_started(self, timeout: float | None = None) -> str:
        return ""

    def log_variant(self, variant: Variant, metrics: dict[str, float], step_metrics=None, tags=None) -> None:  # noqa: ANN001
        pass

    def log_generation(self, generation: int, metrics: dict[str, float]) -> None:
        pass

    def log_text(self, text: str, name: str) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def publish(self, summary_text: str) -> None:
        pass

    def flush(self, timeout: float | None = None) -> float:
        return 0.0

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        pass


def _writer_main(
    uri: str,
    experiment: str,
    artifact_root: str | None,
    nice: int,
    jobs,
    acks,
    driver: int,
    patience_s: float = DEFAULT_PATIENCE_S,
) -> None:
    """The tracking process: writes the queued jobs to MLflow, in order, until ``finish``, or
    until its ``driver`` (the pid that started it) is gone."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the driver, which closes the run
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per run
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the explorer reads artifacts back
    remote = not _is_local_store(uri)
    if remote:  # this process retries, with backoff and a bound; MLflow's retries would hide an outage for minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(REQUEST_TIMEOUT_S))
    # MLflow's import (seconds) starts at once, in parallel with the driver's own start-up; the
    # store itself is opened (made, for a new SQLite file) only by the first job: a run that
    # fails on its input before it starts recording leaves no store behind.
    profile = bool(os.environ.get("FORKPOP_TRACKING_PROFILE"))
    t_import = time.perf_counter()
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    from mlflow import MlflowClient  # noqa: F401

    if profile:
        print(
            f"[tracking] import {time.perf_counter() - t_import:.4f}s at {time.time():.2f}", file=sys.stderr, flush=True
        )
    opened = False
    w = _Writer(uri, experiment, Path(artifact_root) if artifact_root else None)
    retry = _Retry(redact("uri", uri), patience_s if remote else None)
    error: str | None = None
    busy = 0.0
    held: list = []  # a job taken while gathering variants, handled next
    # the driver's pid, as the driver gave it: one killed while this process was still starting
    # (importing MLflow takes seconds) has already left it to init, and getppid() here would say 1
    parent = driver
    while True:
        if held:
            job = held.pop()
        else:
            try:
                job = jobs.get(timeout=2.0)
            except queue.Empty:
                if os.getppid() == parent:
                    continue
                job = ("idle",)
        if job[0] != "finish" and os.getppid() != parent:
            # The driver was killed: what it queued is not written. A resume redoes every
            # generation whose records were not all confirmed, and writing them now would race
            # with the resume's own writer (records made twice). The run is marked KILLED.
            job = ("finish", "KILLED")
        kind = job[0]
        if kind == "flush":
            acks.put(("flushed", job[1], busy, time.process_time()))
            continue
        if kind == "finish":
            if error is None and w.run_id is not None:
                try:
                    retry.run(partial(_attempt, w.finish, job[1:], _now_ms()))
                except Exception as e:
                    error = _report_failure(acks, e)
            acks.put(("finished", busy, time.process_time()))
            # Everything is written and committed: the acknowledgement is flushed and the process
            # ends at once, without the interpreter's teardown of MLflow and SQLAlchemy (1.7 s
            # here, which the driver would wait for).
            acks.close()
            acks.join_thread()
            from multiprocessing import util

            util._run_finalizers(0)  # what this process made (a semaphore of MLflow's) is released
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        if error is not None:
            continue  # the first failure is reported; later writes are skipped
        if not opened:
            t_seed = time.perf_counter()
            seed_sqlite_store(uri)
            opened = True
            if profile:
                print(
                    f"[tracking] seed {time.perf_counter() - t_seed:.4f}s at {time.time():.2f}",
                    file=sys.stderr,
                    flush=True,
                )
        t0 = time.perf_counter()
        ts = _now_ms()  # one timestamp per record, kept when it is retried
        args = job[1:]
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
                kind, args = "variants", (batch,)
            retry.run(partial(_attempt, getattr(w, kind), args, ts))
            if kind in ("start", "attach", "rejoin"):
                acks.put(("started", w.run_id, str(w.experiment_id)))
                if nice:  # started at the driver's priority (the driver waits for it); writes yield to learners
                    try:
                        os.nice(nice)
                    except OSError:
                        pass
        except Exception as e:
            error = _report_failure(acks, e)
        busy += time.perf_counter() - t0
        if profile:
            print(
                f"[tracking] {kind} {time.perf_counter() - t0:.4f}s at {time.time():.2f}", file=sys.stderr, flush=True
            )


def _attempt(write: Callable[..., Any], args: tuple, ts: int, again: bool) -> Any:
    return write(*args, ts=ts, retry=again)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _report_failure(acks: Any, e: BaseException) -> str:
    """Tell the driver of a write that failed for good; returns the message."""
    if isinstance(e, TrackingUnreachable):
        acks.put(("error", str(e), "unreachable"))
        return str(e)
    acks.put(("error", f"{type(e).__name__}: {e}"))
    return f"{type(e).__name__}: {e}"


def is_transient(e: BaseException) -> bool:
    """Whether a failed request may succeed later: no answer (refused, reset, timed out) or an
    overloaded/unavailable server (429, 5xx). A request the server refused (4xx) is not."""
    import requests

    if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return True
    if isinstance(e, requests.exceptions.HTTPError):
        return e.response is not None and e.response.status_code in _RETRY_STATUS
    if isinstance(e, (ConnectionError, TimeoutError)):
        return True
    try:
        from mlflow.exceptions import MlflowException, RestException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    if isinstance(e, MlflowException):
        msg = str(e.message)
        if msg.startswith("API request to") and ("failed with exception" in msg or "timeout exception" in msg):
            return True  # MLflow's REST client found no server, or no answer
        if isinstance(e, RestException) or msg.startswith("API request to"):
            return e.get_http_status_code() in _RETRY_STATUS
    return False


class _Retry:
    """Runs a write until it succeeds, retrying transient failures after 0.5 s, 1 s, 2 s, ...
    (at most ``BACKOFF_MAX_S`` apart) until ``patience_s`` seconds from the first failure.

    The write is called as ``write(retry)``; ``retry`` is true when an earlier attempt may
    have landed in part, so the write first looks up what is there. ``patience_s`` None: no
    retries (a local store fails at once). The first failure of an outage and the recovery
    are each said in one line on stderr.
    """

    def __init__(
        self,
        where: str,
        patience_s: float | None,
        transient: Callable[[BaseException], bool] = is_transient,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.where, self.patience_s = where, patience_s
        self.transient, self.sleep, self.clock = transient, sleep, clock
        self.retries = 0  # over the writer's life

    def run(self, write: Callable[[bool], Any]) -> Any:
        delay, first_failure, again = BACKOFF_FIRST_S, None, False
        while True:
            t_try = self.clock()
            try:
                out = write(again)
            except Exception as e:
                if self.patience_s is None or not self.transient(e):
                    raise
                if first_failure is None:
                    first_failure = t_try
                    print(
                        f"forkpop: MLflow at {self.where} is not answering ({_short(e)}); "
                        f"retrying for up to {self.patience_s:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
                waited = self.clock() - first_failure
                if waited >= self.patience_s:
                    raise TrackingUnreachable(
                        f"the MLflow tracking server at {self.where} has been unreachable for {waited:.0f}s "
                        f"({_short(e)})"
                    ) from e
                self.sleep(min(delay, self.patience_s - waited))  # the last try comes at the deadline
                delay = min(2 * delay, BACKOFF_MAX_S)
                again = True
                self.retries += 1
                continue
            if first_failure is not None:
                print(
                    f"forkpop: MLflow at {self.where} answers again after {self.clock() - first_failure:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
            return out


def _short(e: BaseException) -> str:
    """A failed request in a few words (MLflow's messages hold whole URLs and urllib3 reprs)."""
    text = str(e)
    status = getattr(e, "get_http_status_code", None)
    if status is not None and "failed with exception" not in text and "timeout exception" not in text:
        return f"HTTP {status()}: {text}".splitlines()[0][:160]  # the server answered, with an error
    for needle, words in (
        ("Connection refused", "connection refused"),
        ("timed out", "timed out"),
        ("Read timed out", "timed out"),
        ("RemoteDisconnected", "connection closed"),
        ("Connection reset", "connection reset"),
        ("Connection aborted", "connection closed"),
        ("Name or service not known", "host not found"),
    ):
        if needle in text:
            return words
    return f"{type(e).__name__}: {text}".splitlines()[0][:160]


def _metric_id(m: Any) -> tuple:
    """A metric point as the store keeps it: NaN and infinities as MLflow's SQL store does."""
    is_nan, value = _sql_metric_value(float(m.value))
    return (m.key, int(m.step), int(m.timestamp), is_nan, value)


class _Writer:
    """The MLflow calls, made in the tracking process.

    Every write may be called again with ``retry=True`` after a failure that left it unknown
    what landed (a request that timed out may still be carried out by the server); it then
    looks up the runs it would create (by ``forkpop.run_key``, or the variant id under the
    parent run) and the metric points it would log, and writes only what is missing. Runs
    made twice all the same (a timed-out create the server carried out after the retry's
    look-up) are deleted before the parent run is closed, keeping the one that was written.
    """

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None, use_bulk: bool = True):
        self.uri, self.experiment, self.artifact_root = uri, experiment, artifact_root
        self.run_id: str | None = None
        self.run_key: str | None = None
        self.use_bulk = use_bulk
        self.bulk: _BulkSql | None = None
        self.retried = False  # some write was retried: look for runs made twice before closing
        self.written: set[str] = set()  # variant runs this writer filled

    def _experiment_id(self) -> str:
        from forkpop.experiments.explorer import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made before forkpop set it; a user's choice is kept
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        loc = None
        if self.artifact_root is not None and _is_local_store(self.uri):
            loc = (self.artifact_root / "mlartifacts").resolve().as_uri()
        try:
            # MLflow's UI opens it in its model-training view, not the GenAI one
            return self.client.create_experiment(
                self.experiment, artifact_location=loc, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
            )
        except MlflowException as e:  # made meanwhile, by another run or by a create that timed out
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def start(
        self, run_name: str, tags: dict[str, str], params: dict[str, str], ts: int | None = None, retry: bool = False
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.retried |= retry
        self.client = MlflowClient(self.uri)
        exp_id = self._experiment_id()
        self.experiment_id = exp_id
        self.run_key = tags.get(RUN_KEY_TAG)
        found = self._runs_with_key(exp_id, self.run_key) if retry and self.run_key else []
        if found:
            self.run_id = found[0].info.run_id
            params = {k: v for k, v in params.items() if k not in found[0].data.params}
        else:
            run = self.client.create_run(exp_id, tags={"mlflow.runName": run_name, **tags}, run_name=run_name)
            self.run_id = run.info.run_id
        if params or not found:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        self.bulk = _BulkSql.for_client(self.client, exp_id) if self.use_bulk else None
        self.bulk_off_reason = ""

    def rejoin(
        self,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        generation: int,
        last_metrics: dict[str, float] | None,
        ts: int | None = None,
        retry: bool = False,
    ) -> None:
        """Continue the parent run with ``tags``' run key (a run killed before the driver saved
        its id), or open it when the kill came before it was made."""
        from mlflow import MlflowClient

        self.client = MlflowClient(self.uri)
        key = tags.get(RUN_KEY_TAG)
        found = self._runs_with_key(self._experiment_id(), key) if key else []
        if found:
            self.attach(found[0].info.run_id, generation, last_metrics, ts=ts, retry=retry)
        else:
            self.start(run_name, tags, params, ts=ts, retry=retry)

    def _runs_with_key(self, exp_id: str, key: str) -> list:
        runs = self.client.search_runs([exp_id], f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def attach(
        self,
        run_id: str,
        generation: int,
        last_metrics: dict[str, float] | None,
        ts: int | None = None,
        retry: bool = False,
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        self.retried |= retry
        self.client = MlflowClient(self.uri)
        run = self.client.get_run(run_id)
        self.run_id, self.experiment_id = run_id, run.info.experiment_id
        self.run_key = run.data.tags.get(RUN_KEY_TAG)
        self.client.update_run(run_id, status="RUNNING")
        kids = self._kids()
        keep = []
        for r in kids:
            t = r.data.tags
            gen, origin = int(t.get("forkpop.generation", 0)), t.get("forkpop.origin", "")
            stale = (origin == "fork" and gen > generation) or (origin == "distill" and gen > generation + 1)
            stale = stale or (origin == "seed" and generation < 0)
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, "KILLED")
            if stale:
                self.client.delete_run(r.info.run_id)
            else:
                keep.append(r)
        self._delete_doubles(keep)
        have = {m.step for m in self.client.get_metric_history(run_id, "seed_val_accuracy")}
        # A generation redone after a corrupt checkpoint was logged before, with the same
        # figures (a run is deterministic): its metrics are not written twice.
        self.logged_steps = {s for s in have if s > generation}
        if last_metrics and generation >= 0:
            if generation not in have:
                ts = _now_ms() if ts is None else ts
                self._log_metrics(run_id, [Metric(k, float(v), ts, generation) for k, v in last_metrics.items()], retry)
        self.bulk = _BulkSql.for_client(self.client, self.experiment_id) if self.use_bulk else None
        self.bulk_off_reason = ""

    def _kids(self, generation: str | None = None) -> list:
        where = f"tags.mlflow.parentRunId = '{self.run_id}'"
        if generation is not None:
            where += f" and tags.`forkpop.generation` = '{generation}'"
        return self.client.search_runs([self.experiment_id], where, max_results=50000)

    def _delete_doubles(self, kids: list) -> int:
        """Delete all but one run of each variant; the one kept is the one this writer filled,
        else a finished one with the most metrics, else the first made."""
        by_id: dict[str, list] = {}
        for r in kids:
            by_id.setdefault(_variant_key(r), []).append(r)
        gone = 0
        for runs in by_id.values():
            for r in sorted(runs, key=self._rank)[1:]:
                self.client.delete_run(r.info.run_id)
                gone += 1
        return gone

    def _rank(self, run: Any) -> tuple:
        """Of several runs of one variant, the one to keep sorts first."""
        info = run.info
        filled = info.run_id in self.written
        return (not filled, info.status != "FINISHED", -len(run.data.metrics), info.start_time or 0, info.run_id)

    def variants(self, batch: list[tuple], ts: int | None = None, retry: bool = False) -> None:
        """Nested runs for a batch of variants: in one SQL transaction where the store allows."""
        ts = _now_ms() if ts is None else ts
        self.retried |= retry
        if self.bulk is not None and not retry:
            try:
                self.bulk.write(self.experiment_id, self.run_id, batch, ts)
                return
            except Exception as e:  # an MLflow whose tables differ: the client API, from now on
                self.bulk, self.bulk_off_reason = None, f"{type(e).__name__}: {e}"
        found: dict[str, list] = {}
        if retry:  # runs an earlier attempt made, by variant id
            for gen in sorted({item[1].get("forkpop.generation") for item in batch}, key=str):
                for r in self._kids(gen):
                    found.setdefault(_variant_key(r), []).append(r)
        for item in batch:
            runs = found.get(item[1].get("forkpop.variant_id", item[0]))
            self.variant(*item, ts=ts, run=min(runs, key=self._rank) if runs else None)

    def variant(
        self,
        name: str,
        tags: dict[str, str],
        params: dict[str, str],
        metrics: dict,
        steps: dict[str, list[tuple[int, float]]],
        ts: int | None = None,
        run: Any = None,
    ) -> None:
        """One nested run; ``run``: this variant's run as an earlier attempt left it, to complete."""
        from mlflow.entities import Metric, Param

        ts = _now_ms() if ts is None else ts
        ms = [Metric(k, v, ts, 0) for k, v in metrics.items()]
        for k, series in steps.items():
            ms.extend(Metric(k, v, ts, int(s)) for s, v in series)
        ps = [Param(k, v) for k, v in params.items()]
        if run is None:
            rid = self.client.create_run(
                self.experiment_id, tags={"mlflow.parentRunId": self.run_id, **tags}, run_name=name
            ).info.run_id
        else:  # what an earlier attempt wrote is not written again
            rid = run.info.run_id
            ms = self._missing(rid, ms, run.data.metrics)
            ps = [p for p in ps if p.key not in run.data.params]
            if not ms and not ps and run.info.status == "FINISHED":
                self.written.add(rid)
                return
        self.written.add(rid)
        for i in range(0, max(len(ms), 1), MAX_METRICS_PER_BATCH):
            if ms or ps:
                self.client.log_batch(rid, metrics=ms[i : i + MAX_METRICS_PER_BATCH], params=ps if i == 0 else [])
        self.client.set_terminated(rid, "FINISHED")

    def _missing(self, run_id: str, metrics: list, logged_keys: Any) -> list:
        """The points of ``metrics`` not yet in run ``run_id`` (``logged_keys``: its metric keys)."""
        there: set[tuple] = set()
        for key in sorted({m.key for m in metrics} & set(logged_keys)):
            there.update(_metric_id(m) for m in self.client.get_metric_history(run_id, key))
        return [m for m in metrics if _metric_id(m) not in there]

    def _log_metrics(self, run_id: str, metrics: list, retry: bool) -> None:
        if retry:
            metrics = self._missing(run_id, metrics, self.client.get_run(run_id).data.metrics)
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + MAX_METRICS_PER_BATCH])

    def generation(
        self, generation: int, metrics: dict[str, float], ts: int | None = None, retry: bool = False
    ) -> None:
        from mlflow.entities import Metric

        self.retried |= retry
        if generation in getattr(self, "logged_steps", ()):
            return
        ts = _now_ms() if ts is None else ts
        if self.bulk is not None and not retry:
            try:
                self.bulk.metrics(self.run_id, [(k, v, generation) for k, v in metrics.items()], ts)
                return
            except Exception as e:  # an MLflow whose tables differ: the client API, from now on
                self.bulk, self.bulk_off_reason = None, f"{type(e).__name__}: {e}"
        self._log_metrics(self.run_id, [Metric(k, v, ts, generation) for k, v in metrics.items()], retry)

    def text(self, text: str, name: str, ts: int | None = None, retry: bool = False) -> None:
        self.client.log_text(self.run_id, text, name)  # the same file again: idempotent

    def tags(self, tags: dict[str, str], ts: int | None = None, retry: bool = False) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def publish(self, summary_text: str, ts: int | None = None, retry: bool = False) -> None:
        """The explorer, built from what the store now holds (every generation, a resumed
        run's earlier ones too), and the run's description. A page that cannot be built costs
        a warning, never the run's records; a store that does not answer is retried as any write."""
        from forkpop.experiments import explorer

        try:
            data = explorer.explorer_data(self.client, self.run_id)
            data["run"]["status"] = "FINISHED"  # closed right after this page is logged
            page = explorer.explorer_html(data)
        except Exception as e:
            if is_transient(e):
                raise
            print(f"forkpop: the explorer page was not built: {_short(e)}", file=sys.stderr)
            page = None
        if page is not None:
            self.client.log_text(self.run_id, page, explorer.ARTIFACT)
        text = explorer.description(summary_text, self.experiment_id, self.run_id, explorer=page is not None)
        self.client.set_tag(self.run_id, explorer.NOTE_TAG, text)

    def finish(self, status: str, ts: int | None = None, retry: bool = False) -> None:
        """Close the parent run; after any retry, first delete runs that were made twice."""
        self.retried |= retry
        if self.retried:
            self._delete_doubles(self._kids())
            if self.run_key:
                for r in self._runs_with_key(self.experiment_id, self.run_key):
                    if r.info.run_id != self.run_id:
                        self.client.delete_run(r.info.run_id)
        self.client.set_terminated(self.run_id, status)


def _variant_key(run: Any) -> str:
    return run.data.tags.get("forkpop.variant_id") or run.info.run_name


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

    def write(self, experiment_id: str, parent_run_id: str, batch: list[tuple], ts: int | None = None) -> None:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag
        from mlflow.utils.uri import append_to_uri_path

        ts = _now_ms() if ts is None else ts
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
                series.setdefault(k, []).extend((int(s), v) for s, v in vs)
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
                if latest is not None:  # a series with no points writes nothing, as log_batch
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

    def metrics(self, run_id: str, points: list[tuple[str, float, int]], ts: int) -> None:
        """Metric points ``(key, value, step)`` of one run, and its latest metrics, in one
        transaction: what the store's ``log_batch`` writes (same de-duplication, same rule for
        the latest point: the greatest ``(step, timestamp, value)``), without its per-row ORM."""
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

        rows, seen = [], set()
        for key, v, step in points:
            is_nan, value = _sql_metric_value(v)
            if (key, step, value, is_nan) not in seen:
                seen.add((key, step, value, is_nan))
                rows.append({"key": key, "value": value, "timestamp": ts, "step": int(step), "is_nan": is_nan})
        newest: dict[str, dict] = {}
        for r in rows:
            b = newest.get(r["key"])
            if b is None or (r["step"], r["timestamp"], r["value"]) > (b["step"], b["timestamp"], b["value"]):
                newest[r["key"]] = r
        if not rows:
            return
        table = SqlLatestMetric.__table__
        with self.store.ManagedSessionMaker(read_only=False) as session:
            session.execute(SqlMetric.__table__.insert(), [{**r, "run_uuid": run_id} for r in rows])
            old = {
                m.key: (m.step, m.timestamp, m.value)
                for m in session.execute(
                    table.select().where(table.c.run_uuid == run_id, table.c.key.in_(sorted(newest)))
                )
            }
            newer = [k for k, r in newest.items() if k not in old or (r["step"], r["timestamp"], r["value"]) > old[k]]
            stale = [k for k in newer if k in old]
            if stale:  # replaced in two statements, not one UPDATE per key
                session.execute(table.delete().where(table.c.run_uuid == run_id, table.c.key.in_(stale)))
            if newer:
                session.execute(table.insert(), [{**newest[k], "run_uuid": run_id} for k in newer])


def _sql_metric_value(v: float) -> tuple[bool, float]:
    """As MLflow's SQL store keeps a metric: NaN as 0 with a flag, infinities as the float limits."""
    if math.isnan(v):
        return True, 0.0
    if math.isinf(v):
        return False, 1.7976931348623157e308 if v > 0 else -1.7976931348623157e308
    return False, float(v)


class TrackingError(RuntimeError):
    pass


class TrackingUnreachable(TrackingError):
    """The tracking server stayed unreachable past the patience: the run stops, resumable."""


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


VARIANT_RUNS_LOCAL, VARIANT_RUNS_SERVER = 256, 64  # tracking.variant_runs=auto: nested runs up to this many


def variant_runs_for(policy: str, n_variants: int, uri: str) -> bool:
    """Whether each of a generation's ``n_variants`` forks gets a nested run
    (``tracking.variant_runs``); seeds and students always do."""
    if policy == "auto":
        return n_variants <= (VARIANT_RUNS_LOCAL if _is_local_store(uri) else VARIANT_RUNS_SERVER)
    return policy == "all"


def variants_table(rows: list[dict[str, Any]]) -> str:
    """A generation's variants as one JSON table, ``{"columns": [...], "data": [[...], ...]}``
    (pandas' ``orient="split"``): the record of every birth, nested run or not."""
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    data = [[_json_value(r.get(c)) for c in columns] for r in rows]
    return json.dumps({"columns": columns, "data": data}, separators=(",", ":"))


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def artifact_jsons(client: Any, run: Any, folder: str, tmp: str) -> dict[str, Any]:
    """Every ``folder/*.json`` artifact of ``run``, by file name ({} when there is none), in one
    download. The artifact store is the client's (``mlflow-artifacts:/`` resolves through it)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
    try:
        files = [f.path for f in repo.list_artifacts(folder) if f.path.endswith(".json")]
    except Exception:
        return {}
    if not files:
        return {}
    local = Path(repo.download_artifacts(folder, tmp))
    return {Path(p).name: json.loads((local / Path(p).name).read_text()) for p in sorted(files)}


def table_rows(tables: Any) -> list[dict[str, Any]]:
    """The rows of ``variants/`` tables (:func:`variants_table`) as dicts, in order."""
    return [dict(zip(t["columns"], row, strict=True)) for t in tables for row in t["data"]]


def _table_variants(client: Any, run: Any) -> list[dict]:
    """The births recorded in ``run``'s ``variants/`` tables."""
    import tempfile

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        tables = artifact_jsons(client, run, "variants", tmp).values()
    for r in table_rows(tables):
        genome = {k.removeprefix("gene."): float(v) for k, v in r.items() if k.startswith("gene.")}
        out.append(
            Variant(
                id=r["id"],
                genome=Genome(genome),
                generation=int(r["generation"]),
                origin=Origin(r["origin"]),
                parents=tuple(p for p in (r.get("parents") or "").split(",") if p),
                niche=None if r.get("niche") in (None, "") else int(r["niche"]),
            ).to_dict()
        )
    return out


def _all_child_runs(client: Any, experiment_id: str, run_id: str) -> list:
    """Every nested run of ``run_id``, page by page (a run may have more than a page holds)."""
    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", max_results=10000, page_token=token
        )
        out += list(page)
        token = page.token
        if not token:
            return out


def lineage_from_mlflow(run_id: str, tracking_uri: str | None = None) -> Lineage:
    """Rebuild a population run's :class:`Lineage` from MLflow alone: its nested runs, and the
    ``variants/`` tables for births without one (``tracking.variant_runs``)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    records = []
    for r in _all_child_runs(client, parent.info.experiment_id, run_id):
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
    have = {r["id"] for r in records}
    records += [r for r in _table_variants(client, parent) if r["id"] not in have]
    return Lineage.from_dict({"variants": records})
