"""The closing table of a run: what ``forkpop run`` prints at its end and what the parent MLflow
run keeps as its description."""

from __future__ import annotations

from typing import Any

NAN = float("nan")


def _text_lines(s: Any) -> list[str]:
    """The text world's table: bits per byte, not accuracy."""
    w = s.world
    out = [
        f"{'model':<18} {'test bits/byte':>14}",
        f"{'final seed':<18} {w.get('test_bpb', NAN):>14.3f}",
        f"{'best teacher':<18} {-s.best_individual_test_accuracy:>14.3f}",
        f"{'teachers mixed':<18} {-s.ensemble_test_accuracy:>14.3f}",
    ]
    niches = {k.split(".", 1)[1]: v for k, v in w.items() if k.startswith("test_bpb.")}
    if niches:
        out.append("per niche: " + ", ".join(f"{k} {v:.3f}" for k, v in niches.items()))
    out.append(
        f"rare 4-grams {w.get('test_bpb_rare4', NAN):.3f}, frequent {w.get('test_bpb_frequent4', NAN):.3f} "
        f"bits/byte; {w.get('tokens_per_s', NAN):,.0f} tokens/s learning"
    )
    out += ["sample of the final seed: " + repr(text[:160]) for text in s.samples[:2]]
    out.append(f"{'wall time':<18} {s.wall_seconds:>12.1f}s")
    out.append(f"generations {s.generations}, MLflow run {s.mlflow_run_id}")
    return out


def _env_lines(s: Any) -> list[str]:
    """The environment world's table: greedy returns on the reported episodes, not accuracy."""
    w = s.world
    return [
        f"{'model':<18} {'test return':>13}",
        f"{'final seed':<18} {s.seed_test_accuracy:>13.1f}",
        f"{'best individual':<18} {s.best_individual_test_accuracy:>13.1f}",
        f"{'median variant':<18} {w.get('env.median_return', NAN):>13.1f}",
        f"System M: median {w.get('env.switches', NAN):.0f} switches per lifetime, "
        f"{w.get('env.observe_share', NAN):.0%} of the steps observing",
    ]


def closing_table(s: Any) -> str:
    """A :class:`RunSummary` as the lines ``forkpop run`` ends with."""
    if s.world and "test_bpb" in s.world:
        return "\n".join(_text_lines(s))
    if s.world and "env.median_return" in s.world:
        out = _env_lines(s)
    else:
        out = [f"{'model':<18} {'test accuracy':>13}"]
        for name, acc in (
            ("final seed", s.seed_test_accuracy),
            ("best individual", s.best_individual_test_accuracy),
            ("top-k ensemble", s.ensemble_test_accuracy),
        ):
            out.append(f"{name:<18} {acc:>13.4f}")
    out.append(f"{'wall time':<18} {s.wall_seconds:>12.1f}s")
    if s.poisoned_niches:
        line = (
            f"poisoned niches {s.poisoned_niches}: {s.poisoned_teachers} poisoned teachers over the run "
            f"({s.unaudited_poisoned_teachers} with labels the audit left as they were)"
        )
        if s.backdoor_success == s.backdoor_success:
            line += f", backdoor success {s.backdoor_success:.3f}"
        out.append(line)
    out.append(f"generations {s.generations}, MLflow run {s.mlflow_run_id}")
    t = s.seconds
    parts = {
        "startup": "start-up (Ray, actors, MLflow)",
        "learn_compute": "learning (slowest worker)",
        "ray_overhead": "Ray overhead (and report time learning did not hide)",
        "select": "selection",
        "distill": "distillation",
        "tracking_flush": "final tracking flush",
    }
    hidden = {
        "evaluate": "evaluation",
        "tracking": "tracking (driver)",
        "checkpoint": "checkpoints",
        "tracking_writer_cpu": "MLflow process CPU",
    }
    out.append("where the time went: " + ", ".join(f"{v} {t.get(k, 0.0):.2f}s" for k, v in parts.items()))
    out.append("overlapped with learning: " + ", ".join(f"{v} {t.get(k, 0.0):.2f}s" for k, v in hidden.items()))
    return "\n".join(out)
