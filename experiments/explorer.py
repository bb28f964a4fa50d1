"""The explorer: one self-contained HTML page per run, the lineage as an interactive graph beside
the per-generation curves, read from MLflow alone.

The page carries its data (columnar JSON) and its own JavaScript and CSS (``explorer.js``,
``explorer.css`` beside this module): it makes no request to any host when opened, so it works
from a file, from MLflow's artifact view (a sandboxed frame) and from ``forkpop explore``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

ARTIFACT = "explorer.html"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # MLflow's model-training view, not the GenAI one
NOTE_TAG = "mlflow.note.content"  # the run's description in MLflow's UI
# MLflow 3.17's UI takes its view from a global switch (GenAI by default), not from the
# experiment's tag: forkpop's links to the UI carry the model-training one.
WORKFLOW = "workflowType=machine_learning"

# Per-node flags (a bit each), as the page reads them.
FLAGS = {
    "poisoned": 1,
    "screened": 2,
    "audited": 4,
    "diverged": 8,
    "failed": 16,
    "teacher": 32,
    "accepted": 64,
    "rejected": 128,
}
ORIGINS = ["seed", "fork", "distill"]
_HERE = Path(__file__).parent

# Curves beyond the report's plots (analysis.PLOTS), one chart each; a key ending in "." takes
# every metric it begins; "scaled" charts draw each curve over its own range (hover: values).
EXTRA_CHARTS: list[tuple[str, list[str], bool]] = [
    ("Distillation: the student against the seed (validation)", ["student_val_accuracy", "seed_val_accuracy"], False),
    ("Prediction entropy of the seed and of the student", ["seed_entropy", "student_entropy"], False),
    ("The student's acceptance test", ["accept_gain", "accept_z"], True),
    (
        "Defences: poisoned teachers, screened, audited and diverged variants",
        ["poisoned_teachers", "unaudited_poisoned_teachers", "label_screened", "audited_variants", "diverged"],
        False,
    ),
    ("Gene spread in the population (std of each gene)", ["div.gene_std."], True),
    (
        "The population: species, variants measured pairwise, lineage depth",
        ["div.species", "div.pairwise_variants", "div.depth"],
        True,
    ),
    ("Transfer set of the distillation", ["transfer_generated", "transfer_real_fraction"], True),
    ("The seed's genes", ["gene."], True),
    ("The teachers' genes (mean)", ["gene.teacher."], True),
]


def _truthy(v: Any) -> bool:
    return v is True or (isinstance(v, str) and v.lower() == "true")


def _num(v: Any, digits: int = 6) -> float | int | None:
    """A number for the page, to ``digits`` significant digits (the page shows four)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    f = float(f"{f:.{digits}g}")
    return int(f) if f.is_integer() and abs(f) < 2**53 else f


def _quantized(matrix: list[list[float]]) -> str:
    """A disagreement matrix (values in [0, 1]) as base64 bytes, 0-255, row by row."""
    flat = bytearray()
    for row in matrix:
        flat += bytes(min(255, max(0, round(255 * (x if x is not None else 0.0)))) for x in row)
    return base64.b64encode(bytes(flat)).decode()


def explorer_data(client: Any, run_id: str) -> dict[str, Any]:
    """What the page shows, read from the MLflow store: the run, every birth (from the
    ``variants/`` tables and the nested runs), the parent run's curves and the per-generation
    disagreement matrices."""
    from forkpop.experiments.tracking import PARENT_TAG, artifact_jsons, table_rows

    run = client.get_run(run_id)
    exp_id = run.info.experiment_id
    tags = run.data.tags
    read = _SqlReads.of(client)
    metrics = read.metrics(run_id) if read else _client_metrics(client, run_id, run.data.metrics)
    kids = read.children(run_id) if read else _client_children(client, exp_id, run_id)

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in table_rows(artifact_jsons(client, run, "variants", tmp).values()):
            rows.setdefault(row["id"], {}).update({k: v for k, v in row.items() if v is not None})
        matrices = {
            int(Path(name).stem.split("-")[1]): m
            for name, m in artifact_jsons(client, run, "diversity", tmp).items()
            if name.startswith("gen-")
        }
    run_ids: dict[str, str] = {}
    for kid_id, t, params, kid_metrics in kids:
        vid = t.get("forkpop.variant_id")
        if vid is None:
            continue
        run_ids[vid] = kid_id
        if vid in rows:
            continue
        rows[vid] = {  # a birth with a nested run and no table row (the first seed)
            "id": vid,
            "generation": int(t.get("forkpop.generation", 0)),
            "origin": t.get("forkpop.origin", "seed"),
            "parents": t.get(PARENT_TAG, ""),
            "niche": int(t["forkpop.niche"]) if t.get("forkpop.niche") else None,
            **{k: float(v) for k, v in params.items() if k.startswith("gene.")},
            **{k.removeprefix("forkpop."): v for k, v in t.items() if k.startswith("forkpop.")},
            **kid_metrics,
        }

    return {
        "run": {
            "id": run_id,
            "name": run.info.run_name or run_id,
            "experiment_id": exp_id,
            "status": run.info.status,
            "world": tags.get("forkpop.world", ""),
        },
        **_columns(list(rows.values())),
        "metrics": {k: v for k, v in metrics.items() if not k.startswith("time_")},
        "groups": chart_groups(metrics, tags.get("forkpop.world", "")),
        "matrices": {
            str(g): {"ids": m["ids"], "n": len(m["ids"]), "q": _quantized(m["disagreement"])}
            for g, m in sorted(matrices.items())
            if m.get("ids") and m.get("disagreement")
        },
        "mlflow_runs": run_ids,
    }


def _client_metrics(client: Any, run_id: str, keys: Any) -> dict[str, list]:
    out = {}
    for key in sorted(keys):
        out[key] = _series((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    return out


def _series(points: Any) -> list[list]:
    """A metric's points by step (the last written of a step kept), NaN as null."""
    by_step: dict[int, tuple[int, float]] = {}
    for step, ts, v in points:
        if step not in by_step or ts >= by_step[step][0]:
            by_step[step] = (ts, v)
    return [[s, v if v is not None and math.isfinite(v) else None] for s, (_, v) in sorted(by_step.items())]


def _client_children(client: Any, exp_id: str, run_id: str) -> list[tuple]:
    from forkpop.experiments.tracking import _all_child_runs

    return [
        (r.info.run_id, r.data.tags, r.data.params, r.data.metrics) for r in _all_child_runs(client, exp_id, run_id)
    ]


class _SqlReads:
    """The same reads as the client's, for a SQL store, in a few queries: a run's metric
    histories (one query, not one per key) and its nested runs with their tags, params and
    latest metrics (MLflow's search costs about 2 ms per run)."""

    def __init__(self, store: Any):
        self.store = store

    @classmethod
    def of(cls, client: Any) -> _SqlReads | None:
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            store = client._tracking_client.store
            return cls(store) if isinstance(store, SqlAlchemyStore) else None
        except Exception:
            return None

    def metrics(self, run_id: str) -> dict[str, list]:
        from mlflow.store.tracking.dbmodels.models import SqlMetric
        from sqlalchemy import select

        m = SqlMetric.__table__
        q = select(m.c.key, m.c.step, m.c.timestamp, m.c.value, m.c.is_nan).where(m.c.run_uuid == run_id)
        points: dict[str, list] = {}
        with self.store.ManagedSessionMaker() as session:
            for key, step, ts, value, is_nan in session.execute(q):
                points.setdefault(key, []).append((step, ts, None if is_nan else value))
        return {k: _series(v) for k, v in sorted(points.items())}

    def children(self, run_id: str) -> list[tuple]:
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlParam, SqlRun, SqlTag
        from sqlalchemy import and_, select

        runs, tags, params, latest = (x.__table__ for x in (SqlRun, SqlTag, SqlParam, SqlLatestMetric))
        kids_q = (
            select(runs.c.run_uuid)
            .join(tags, and_(tags.c.run_uuid == runs.c.run_uuid, tags.c.key == "mlflow.parentRunId"))
            .where(tags.c.value == run_id, runs.c.lifecycle_stage == "active")
        )
        out: dict[str, tuple[dict, dict, dict]] = {}
        with self.store.ManagedSessionMaker() as session:
            for (rid,) in session.execute(kids_q):
                out[rid] = ({}, {}, {})
            sub = kids_q.scalar_subquery()
            for rid, k, v in session.execute(
                select(tags.c.run_uuid, tags.c.key, tags.c.value).where(tags.c.run_uuid.in_(sub))
            ):
                out[rid][0][k] = v
            for rid, k, v in session.execute(
                select(params.c.run_uuid, params.c.key, params.c.value).where(params.c.run_uuid.in_(sub))
            ):
                out[rid][1][k] = v
            for rid, k, v, nan in session.execute(
                select(latest.c.run_uuid, latest.c.key, latest.c.value, latest.c.is_nan).where(
                    latest.c.run_uuid.in_(sub)
                )
            ):
                out[rid][2][k] = float("nan") if nan else v
        return [(rid, t, p, m) for rid, (t, p, m) in out.items()]


# The text world's fitness and "accuracies" are minus bits per byte: its charts say so.
TEXT_TITLES = {
    "fitness": "Fitness of the forks (minus validation bits per byte)",
    "seed_accuracy": "Minus bits per byte: the seed (validation, test), the best teacher, the teachers mixed",
}


def chart_groups(metrics: dict[str, Any], world: str = "") -> list[list]:
    """The page's charts, ``[title, keys, scaled]``: the report's plots, then :data:`EXTRA_CHARTS`,
    then each metric no chart has taken, alone (a world's own measures among them)."""
    from forkpop.experiments.analysis import PLOTS

    taken: set[str] = set()
    out = []

    def claim(title: str, keys: list[str], scaled: bool) -> None:
        found = []
        for k in keys:
            if k.endswith("."):
                found += sorted(m for m in metrics if m.startswith(k) and m not in taken and "." not in m[len(k) :])
            elif k in metrics and k not in taken:
                found.append(k)
        if found:
            taken.update(found)
            out.append([title, found, scaled])

    for name, (title, keys) in PLOTS.items():
        claim(TEXT_TITLES.get(name, title) if world == "text" else title, keys, False)
    for title, keys, scaled in EXTRA_CHARTS:
        claim(title, keys, scaled)
    for k in sorted(metrics):
        if k not in taken and not k.startswith("time_"):
            claim(k, [k], False)
    return out


# Row fields the page shows in their own places, not among a variant's figures.
_OWN = {"id", "generation", "origin", "parents", "niche", "status", "reason", "label_audit", "species", "variant_id"}
_OWN |= {"teacher", "accepted", "poisoned", "label_screened", "parent_ids", "run_key", "kind", "world"}


def _columns(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Births as columns: ids, generations, origins, parent indices, niches, flags, genes, figures."""
    order = {"seed": 0, "distill": 1, "fork": 2}
    rows = sorted(rows, key=lambda r: (int(r["generation"]), order.get(r["origin"], 3), r["id"]))
    index = {r["id"]: i for i, r in enumerate(rows)}
    genes = sorted({k.removeprefix("gene.") for r in rows for k in r if k.startswith("gene.")})
    figures = sorted(
        {
            k
            for r in rows
            for k, v in r.items()
            if k not in _OWN and not k.startswith("gene.") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
    )
    nodes: dict[str, list] = {
        k: [] for k in ("id", "gen", "origin", "parents", "niche", "flags", "species", "status", "reason", "audit")
    }
    for r in rows:
        parents = [p for p in str(r.get("parents") or "").split(",") if p]
        status = str(r.get("status") or "")
        flags = 0
        flags |= FLAGS["poisoned"] * _truthy(r.get("poisoned"))
        flags |= FLAGS["screened"] * _truthy(r.get("label_screened"))
        flags |= FLAGS["audited"] * bool(r.get("label_audit"))
        flags |= FLAGS["diverged"] * (status == "diverged")
        flags |= FLAGS["failed"] * (status == "failed")
        flags |= FLAGS["teacher"] * _truthy(r.get("teacher"))
        if r.get("accepted") is not None:
            flags |= FLAGS["accepted"] if _truthy(r["accepted"]) else FLAGS["rejected"]
        nodes["id"].append(r["id"])
        nodes["gen"].append(int(r["generation"]))
        nodes["origin"].append(ORIGINS.index(r["origin"]) if r["origin"] in ORIGINS else 0)
        nodes["parents"].append([index[p] for p in parents if p in index])
        nodes["niche"].append(None if r.get("niche") in (None, "") else int(r["niche"]))
        nodes["flags"].append(flags)
        nodes["species"].append(None if r.get("species") in (None, "") else int(r["species"]))
        nodes["status"].append(status)
        nodes["reason"].append(str(r.get("reason") or ""))
        nodes["audit"].append(str(r.get("label_audit") or ""))
    return {
        "genes": genes,
        "figures": figures,
        "nodes": nodes,
        "genome": [[_num(r.get(f"gene.{g}")) for g in genes] for r in rows],
        "values": {f: [_num(r.get(f)) for r in rows] for f in figures},
    }


def explorer_html(data: dict[str, Any], mlflow_ui: str = "") -> str:
    """The page: data, script and style in one file."""
    data = {**data, "mlflow_ui": mlflow_ui.rstrip("/")}
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    title = html.escape(f"forkpop explorer: {data['run']['name']}")
    css = (_HERE / "explorer.css").read_text()
    js = (_HERE / "explorer.js").read_text()
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        # Nothing but what the page carries: no other host, even by mistake.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src data: blob:\">"
        f"<title>{title}</title><style>{css}</style></head><body>"
        f"<script type='application/json' id='forkpop-data'>{payload}</script>"
        f"<script>{js}</script></body></html>"
    )


def build(run_id: str, tracking_uri: str | None, mlflow_ui: str = "") -> str:
    """The explorer page of a population run in a reachable store."""
    return _build(run_id, tracking_uri, mlflow_ui)[0]


def _build(run_id: str, tracking_uri: str | None, mlflow_ui: str = "") -> tuple[str, str]:
    """The page and the run's status."""
    from forkpop.experiments.analysis import population_run

    client, _ = population_run(run_id, tracking_uri)
    data = explorer_data(client, run_id)
    return explorer_html(data, mlflow_ui), data["run"]["status"]


def ui_link(experiment_id: str, run_id: str) -> str:
    """The explorer's place in MLflow's UI, relative to the UI's address."""
    return f"#/experiments/{experiment_id}/runs/{run_id}/artifacts/{ARTIFACT}?{WORKFLOW}"


def description(summary_text: str, experiment_id: str, run_id: str, explorer: bool = True) -> str:
    """The parent run's description (Markdown): the closing table of ``forkpop run`` and where
    the explorer is."""
    where = (
        f"[{ARTIFACT}]({ui_link(experiment_id, run_id)}) among this run's artifacts, or "
        if explorer
        else "not built at the run's end; "
    )
    return (
        "forkpop population run.\n\n```\n"
        + summary_text.strip("\n")
        + "\n```\n\n"
        + f"**Explorer** (the lineage and the curves, interactive): {where}`forkpop explore {run_id}`.\n"
    )


def serve(page: Any, host: str = "127.0.0.1", port: int = 0):  # noqa: ANN201 - an http.server
    """A server for one page on ``host`` (loopback by default); ``port`` 0 takes a free one.
    ``page`` is the page, or a function that returns it at each request (a live run)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] not in ("/", "/index.html", f"/{ARTIFACT}"):
                self.send_error(404)
                return
            with lock:
                body = (page() if callable(page) else page).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:  # no line per request
            pass

    return ThreadingHTTPServer((host, port), Handler)


class LivePage:
    """A run's page, built again at each request while the run is still going (a reload shows
    its newest generations), kept once it has ended."""

    def __init__(self, run_id: str, tracking_uri: str | None, mlflow_ui: str = ""):
        self.run_id, self.uri, self.ui = run_id, tracking_uri, mlflow_ui
        self.page, status = _build(run_id, tracking_uri, mlflow_ui)  # a bad id fails here, before serving
        self.ended = status != "RUNNING"

    def __call__(self) -> str:
        if not self.ended:
            try:
                self.page, status = _build(self.run_id, self.uri, self.ui)
                self.ended = status != "RUNNING"
            except Exception as e:  # the store went away: the last page is served, and said so
                print(f"forkpop: the page is as it was; the store did not answer: {e}", file=sys.stderr)
        return self.page
