"""The ``forkpop`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + traceback
        self.exit(EXIT_USAGE, f"forkpop: {message}; see {self.prog} --help\n")


def _fail(message: str) -> int:
    print(f"forkpop: {message}", file=sys.stderr)
    return EXIT_USAGE


def bundled_config(name: str) -> Path:
    return Path(__file__).parent / "configs" / f"{name}.yaml"


def _resolve_config(path: str) -> str:
    """A config path as given, or the name of a bundled config (``digits``)."""
    if not Path(path).exists() and bundled_config(path).exists():
        return str(bundled_config(path))
    return path


def cmd_run(args: argparse.Namespace) -> int:
    from forkpop.experiments.config import ConfigError, load_config

    try:
        cfg = load_config(_resolve_config(args.config), args.set, args.seed)
    except ConfigError as e:
        return _fail(str(e))

    return _launch(args, cfg)


def _launch(args: argparse.Namespace, cfg, resume_dir: Path | None = None) -> int:  # noqa: ANN001 - a config
    """Run (or, with ``resume_dir``, continue) a population run; print and write its summary."""
    from forkpop.experiments.config import ConfigError
    from forkpop.experiments.tracking import TrackingError, TrackingUnreachable, redact

    # MLflow's process starts first: its import (seconds) runs beside torch's, below.
    early = _early_tracker(args, cfg, resume_dir)
    from forkpop.experiments.checkpoint import CheckpointError
    from forkpop.experiments.runner import PopulationRun
    from forkpop.workers.data import DataError
    from forkpop.workers.pool import ClusterError

    from forkpop.plugins import PluginError

    if args.backend:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"backend": args.backend})})
    if args.reachable_ray:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"reachable_ray": True})})
    try:
        run = PopulationRun(  # resolves the model family: a bad one fails before anything is recorded
            cfg,
            tracking_uri=args.tracking_uri,
            address=args.address,
            progress=not args.quiet,
            resume_dir=resume_dir,
            allow_unauthenticated_ray=args.allow_unauthenticated_ray,
            tracker=early,
        )
    except (ConfigError, PluginError) as e:
        if early is not None:
            early.discard()
        return _fail(str(e))
    try:
        try:
            run.load_data()  # data errors surface before anything starts or is recorded
        except BaseException:
            run.discard_early_tracker()
            raise
        if resume_dir is None:
            print(f"forkpop: run directory {run.run_dir}", file=sys.stderr)
            print(f"forkpop: MLflow store {redact('uri', run.tracking_uri)}", file=sys.stderr)
        summary = run.run()
    except TrackingUnreachable as e:  # the run stopped cleanly at its last checkpoint
        if (run.run_dir / "run.json").is_file():
            return _fail(f"{e}; once it answers, `forkpop resume {run.run_dir}` continues the run")
        return _fail(f"{e}; nothing was recorded yet: run again once it answers")
    except (DataError, CheckpointError, TrackingError, ClusterError, PluginError, ConfigError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        if resume_dir is not None:
            return _fail("interrupted; resume again to go on")
        return _fail("interrupted; the MLflow run is marked KILLED and checkpoints up to the last generation are kept")

    _print_summary(summary)
    if args.summary:
        out = Path(args.summary)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary.__dict__, indent=1, default=str))
    if summary.mlflow_run_id:
        from forkpop.experiments.explorer import WORKFLOW

        uri = redact("uri", summary.tracking_uri)
        run = f"#/experiments/{summary.mlflow_experiment_id}/runs/{summary.mlflow_run_id}?{WORKFLOW}"
        if summary.tracking_uri.startswith("sqlite:"):
            print(f"see it: mlflow ui --backend-store-uri {uri}, then http://127.0.0.1:5000/{run}")
        elif summary.tracking_uri.startswith(("http://", "https://")):
            print(f"see it: {uri.rstrip('/')}/{run}")
        print(f"its explorer: forkpop explore {summary.mlflow_run_id} --tracking-uri {uri}")
    return 0


def _early_tracker(args: argparse.Namespace, cfg, resume_dir: Path | None):  # noqa: ANN001, ANN202
    """The run's MLflow writer process, started before the driver imports torch (None: the run
    keeps no records, or its store is not known yet). The runner uses it if it names the same
    store, else starts its own."""
    from forkpop.experiments.tracking import PATIENCE_ENV, Tracker, resolve_tracking_uri

    uri = args.tracking_uri
    if resume_dir is not None:
        try:
            uri = uri or json.loads((resume_dir / "run.json").read_text())["tracking_uri"]
        except (OSError, ValueError, KeyError):
            return None
        if not uri:
            return None
    root = Path(cfg.run.run_dir)
    uri = resolve_tracking_uri(uri, cfg.tracking.uri, root)
    patience = None if os.environ.get(PATIENCE_ENV) else cfg.tracking.outage_s
    return Tracker(uri, cfg.tracking.experiment, root, patience_s=patience)


def cmd_resume(args: argparse.Namespace) -> int:
    from forkpop.experiments.config import ConfigError, load_config

    run_dir = Path(args.run)
    if not (run_dir / "run.json").is_file():
        return _fail(f"{args.run!r} is not a run directory with run.json (give runs/<name>-s<seed>-<time>)")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as e:
        return _fail(str(e))
    return _launch(args, cfg, resume_dir=run_dir)


def cmd_study(args: argparse.Namespace) -> int:
    from forkpop.experiments.config import ConfigError
    from forkpop.experiments.study import format_table, load_study, mode_configs, summarize, write

    path = Path(args.study)
    if args.study == "abm" and not path.exists():
        from forkpop.experiments.abm_study import cmd_abm_study

        try:
            return cmd_abm_study(args)
        except ConfigError as e:
            return _fail(str(e))
        except ValueError:
            return _fail("--partitions takes integers separated by commas, e.g. 0,1,2,3,4")
    if not path.exists():
        path = Path(__file__).parent / "configs" / f"study_{args.study}.yaml"
    if not path.exists():
        return _fail(
            f"no study {args.study!r}: give a study YAML or a bundled name (diversity, selection, text, collapse, abm)"
        )
    from forkpop.experiments.text_study import cmd_text_study, study_kind

    if study_kind(path):
        from forkpop.experiments.tracking import TrackingError
        from forkpop.workers.data import DataError

        from forkpop.plugins import PluginError

        try:
            return cmd_text_study(args, path, _resolve_config)
        except ValueError as e:
            if isinstance(e, (ConfigError, DataError, PluginError)):
                return _fail(str(e))
            return _fail("--seeds takes integers separated by commas, e.g. 0,1,2")
        except TrackingError as e:
            return _fail(str(e))
    try:
        study = load_study(path)
        configs = mode_configs(study, _resolve_config(str(study["base"])), args.set)
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else study["seeds"]
        if args.partitions:
            partitions = [int(x) for x in args.partitions.split(",")]
        else:
            partitions = study["partitions"] or [next(iter(configs.values())).data.seed]
    except ConfigError as e:
        return _fail(str(e))
    except ValueError:
        return _fail("--seeds and --partitions take integers separated by commas, e.g. 0,1,2,3")

    import numpy as np
    from forkpop.experiments.analysis import compare
    from forkpop.experiments.runner import PopulationRun
    from forkpop.experiments.tracking import TrackingError
    from forkpop.workers.data import DataError

    from forkpop.plugins import PluginError

    keys = study["report"]
    rows = []
    uri = args.tracking_uri
    for name, cfg in configs.items():
        for part in partitions:
            for seed in seeds:
                run_cfg = cfg.model_copy(
                    update={
                        "run": cfg.run.model_copy(
                            update={
                                "seed": seed,
                                "name": f"study-{name}",
                                **({"backend": args.backend} if args.backend else {}),
                            }
                        ),
                        "data": cfg.data.model_copy(update={"seed": part}),
                    }
                )
                print(f"forkpop: study mode {name}, partition {part}, seed {seed}", file=sys.stderr)
                try:
                    s = PopulationRun(run_cfg, tracking_uri=uri, progress=not args.quiet).run()
                except (DataError, TrackingError, PluginError) as e:
                    return _fail(str(e))
                uri = s.tracking_uri
                last = s.history[-1]
                row = {
                    "mode": name,
                    "partition": part,
                    "seed": seed,
                    "mlflow_run_id": s.mlflow_run_id,
                    "wall_seconds": s.wall_seconds,
                    "teachers": float(np.mean([len(h["teachers"]) for h in s.history])),
                }
                for k in keys:
                    v = last["diversity"].get(k.removeprefix("div.")) if k.startswith("div.") else getattr(s, k, None)
                    row[k] = float(v) if v is not None else float("nan")
                rows.append(row)
    if study["baselines"]:
        from forkpop.experiments.baselines import run_partition

        base_cfg = next(iter(configs.values()))
        for part in partitions:
            print(f"forkpop: study baselines {study['baselines']}, partition {part}", file=sys.stderr)
            for b in run_partition(base_cfg, part, methods=tuple(study["baselines"]), log=lambda m: None):
                row = {"mode": b["method"], "partition": part, "seed": b["seed"], "mlflow_run_id": ""}
                row.update({k: float("nan") for k in keys})
                row["seed_test_accuracy"], row["seed_val_accuracy"] = b["test_accuracy"], b["val_accuracy"]
                rows.append(row)
    table = summarize(rows, keys)
    print(format_table(table, keys))
    out = Path(args.out)
    print(f"forkpop: {write(out, rows, table)}")
    shown = (partitions[0], seeds[0])
    first = [r["mlflow_run_id"] for r in rows if (r["partition"], r["seed"]) == shown and r["mlflow_run_id"]]
    files = compare(first, out, uri, progress=False)
    pngs = ", ".join(str(f) for f in files if f.suffix == ".png")
    print(f"forkpop: curves of partition {shown[0]}, seed {shown[1]}'s runs: {pngs}")
    return 0


def _store_uri(arg: str | None) -> str:
    """``--tracking-uri``, ``MLFLOW_TRACKING_URI``, or ``runs/mlflow.db`` here, which must exist."""
    uri = arg or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = Path("runs") / "mlflow.db"
    if not db.is_file():
        raise FileNotFoundError("no runs/mlflow.db here; give --tracking-uri (or set MLFLOW_TRACKING_URI)")
    return f"sqlite:///{db.resolve()}"


def _with_store(fn):  # noqa: ANN001, ANN202 - a command that reads MLflow: one-line errors
    def wrapped(args: argparse.Namespace) -> int:
        from forkpop.experiments.analysis import AnalysisError

        try:
            return fn(args, _store_uri(args.tracking_uri))
        except (AnalysisError, FileNotFoundError) as e:
            return _fail(str(e))
        except Exception as e:  # an unreachable store, a corrupt database
            if type(e).__name__ in ("MlflowException", "OperationalError", "RestException", "ConnectionError"):
                return _fail(f"cannot read the MLflow store: {str(e).splitlines()[0]}")
            raise

    return wrapped


@_with_store
def cmd_lineage(args: argparse.Namespace, uri: str) -> int:
    from forkpop.experiments.analysis import lineage_text, load_run, write_lineage

    data = load_run(args.run, uri, matrices=False)
    print(lineage_text(data.lineage, args.max_forks))
    files = write_lineage(data, Path(args.out))
    print(f"forkpop: lineage of {data.name} ({len(data.lineage)} births) written to " + ", ".join(map(str, files)))
    return 0


@_with_store
def cmd_analyze(args: argparse.Namespace, uri: str) -> int:
    from forkpop.experiments.analysis import analyze

    heat = [int(g) for g in args.generations.split(",")] if args.generations else None
    report = analyze(args.run, Path(args.out), uri, heat, progress=not args.quiet)
    print(f"forkpop: report {report} (and the PNGs beside it)")
    return 0


@_with_store
def cmd_explore(args: argparse.Namespace, uri: str) -> int:
    from forkpop.experiments.explorer import LivePage, serve

    ui = args.mlflow_ui or (uri if uri.startswith(("http://", "https://")) else "")
    page = LivePage(args.run, uri, ui)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(page.page)
        print(f"forkpop: explorer written to {args.out}")
        if args.no_serve:
            return 0
    try:
        server = serve(page, "127.0.0.1", args.port)
    except OSError as e:
        return _fail(f"cannot listen on 127.0.0.1:{args.port} ({e.strerror}); choose another --port (0: any free one)")
    live = "" if page.ended else "; the run is going on: a reload shows its newest generations"
    print(f"forkpop: explorer of run {args.run} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops{live})")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


@_with_store
def cmd_compare(args: argparse.Namespace, uri: str) -> int:
    from forkpop.experiments.analysis import compare

    files = compare(args.runs, Path(args.out), uri, progress=not args.quiet)
    print("forkpop: " + ", ".join(map(str, files)))
    return 0


def _print_summary(s) -> None:  # noqa: ANN001 - RunSummary, imported lazily
    from forkpop.experiments.closing import closing_table

    print()
    print(closing_table(s))


def _launch_options(p: argparse.ArgumentParser, tracking_help: str) -> None:
    """The options ``run`` and ``resume`` share."""
    p.add_argument("--summary", default=None, metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--tracking-uri", default=None, help=tracking_help)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument(
        "--allow-unauthenticated-ray",
        action="store_true",
        help="connect to a Ray address off this machine even with RAY_AUTH_MODE=disabled (unsafe)",
    )
    p.add_argument(
        "--reachable-ray",
        action="store_true",
        help="start the local Ray on this machine's network address so other nodes can join "
        "(run.reachable_ray; needs Ray token authentication); by default it listens on loopback only",
    )
    p.add_argument("--backend", choices=["auto", "ray", "local"], default=None, help="override run.backend")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # No usage reports from a research run unless asked for (set these to opt back in).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # no INFO lines about creating tables
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bar per artifact read
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = _Parser(prog="forkpop", description="Evolving, forking model populations on Ray, tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("run", help="run a population experiment from a YAML config")
    p.add_argument("config", help="path of a YAML config, or the name of a bundled one (digits)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--seed", type=int, default=None, help="run seed (overrides run.seed)")
    _launch_options(p, "MLflow tracking URI (default: MLFLOW_TRACKING_URI or SQLite)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("resume", help="continue a killed run from its last completed generation")
    p.add_argument("run", help="the run directory (runs/<name>-s<seed>-<time>)")
    _launch_options(p, "MLflow tracking URI (default: the run's own)")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("study", help="run several modes of an experiment over several seeds and compare them")
    p.add_argument(
        "study", help="a study YAML, or the name of a bundled one (diversity, selection, text, collapse, abm)"
    )
    p.add_argument("--seeds", default=None, help="run seeds, e.g. 0,1,2 (default: the study's)")
    p.add_argument(
        "--partitions", default=None, help="partitions (data.seed), e.g. 0,1,2,3 (default: the study's or the base's)"
    )
    p.add_argument("--out", default="study", help="folder for study.json and the comparison plots")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of every mode")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default as for run)")
    p.add_argument("--backend", choices=["auto", "ray", "local"], default=None, help="override run.backend")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--jobs", type=int, default=None, help="abm study: runs at once, each in its own process (default: the cores)"
    )
    p.set_defaults(func=cmd_study)

    store = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else runs/mlflow.db here)"
    p = sub.add_parser("lineage", help="print a run's lineage tree and write it as PNG, SVG, GraphML and JSON")
    p.add_argument("run", help="MLflow run id of the population run")
    p.add_argument("--out", default="lineage", help="folder for the files (default: ./lineage)")
    p.add_argument("--max-forks", type=int, default=6, help="forks shown per seed in the terminal")
    p.add_argument("--tracking-uri", default=None, help=store)
    p.set_defaults(func=cmd_lineage)

    p = sub.add_parser("analyze", help="plots of fitness, accuracy and diversity, and an HTML report")
    p.add_argument("run", help="MLflow run id of the population run")
    p.add_argument("--out", required=True, help="folder for the PNGs and report.html")
    p.add_argument("--generations", default=None, help="generations for disagreement heat maps, e.g. 0,5,9")
    p.add_argument("--tracking-uri", default=None, help=store)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("explore", help="serve a run's interactive lineage and diversity explorer on 127.0.0.1")
    p.add_argument("run", help="MLflow run id of the population run")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free one)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the page to FILE")
    p.add_argument("--no-serve", action="store_true", help="with --out: write the page and stop")
    p.add_argument(
        "--mlflow-ui",
        default=None,
        metavar="URL",
        help="MLflow UI the page links variants to (default: the tracking URI when it is a server)",
    )
    p.add_argument("--tracking-uri", default=None, help=store)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("compare", help="several runs' curves on the same axes")
    p.add_argument("runs", nargs="+", help="MLflow run ids")
    p.add_argument("--out", default="compare", help="folder for the PNGs (default: ./compare)")
    p.add_argument("--tracking-uri", default=None, help=store)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    return args.func(args)


def entry() -> None:
    """The console script: run, shut down the Ray this process started, and exit at once.

    Interpreter teardown after a Ray session costs seconds and does nothing for the user:
    everything is written and flushed before ``os._exit``.
    """
    rc = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
