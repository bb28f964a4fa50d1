"""The label-budget world (``data.world: budget``): the classification data, labels bought.

Each niche is an unlabelled stream whose class mix drifts (:func:`forkpop.workers.budget.drift_order`,
``budget.phases``, ``budget.deal``, fixed by ``data.seed``). A variant's lifetime is one pass
over its niche's stream (:func:`forkpop.workers.abm.live`): ``budget.free`` of the labels
arrive free, and it may buy ``budget.share`` of the niche from the oracle. Its meta-controller
is ``budget.policy``: ``evolved`` (System M, the genome's ``m_*`` genes) or a fixed policy of
:data:`forkpop.workers.abm.POLICIES`. Selection reads the validation split's labels and elitism
the acceptance split's: both count in the run's label ledger (``describe()["labels"]``), with
every label bought or given free (each variant's ``metrics``). The test split is reported only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from forkpop.population.models import accuracy, load_flat_weights
from forkpop.workers.abm import POLICIES, Controller, live
from forkpop.workers.budget import LabelLedger, Oracle, budget_labels, deal_classes, drift_order
from forkpop.workers.classification import ClassificationWorld
from forkpop.workers.data import DataBundle, load_data
from forkpop.workers.learner import ForkTask, LearnerSpec, LearnResult, fork_weights

POLICY_NAMES = ("evolved", "shuffled_m", *POLICIES)


@dataclass(frozen=True)
class BudgetLearnerSpec:
    """What every budget learner shares: the classification spec (data, model) and the budget."""

    base: LearnerSpec
    share: float = 0.05
    free: float = 0.01
    phases: int = 2
    deal: str = "world"
    policy: str = "evolved"
    replay: int = 16
    observe_weight: float = 0.5
    anchor: float = 0.0
    neighbour: float = math.inf
    probe: int = 64
    learner: str = "forkpop.workers.budget_world:BudgetLearner"  # resolvable in any worker
    import_roots: tuple[str, ...] = field(default=())

    @property
    def data(self) -> Any:
        return self.base.data

    # what the pool asks of a learner spec: a lifetime is one small model's pass, on the CPU
    device = "cpu"
    engine = "budget"


def world_deal(data: DataBundle, phases: int, seed: int) -> dict[int, int] | None:
    """The world's one deal of its classes into phases (``budget.deal: world``)."""
    return deal_classes(np.unique(data.y_pool), phases, np.random.default_rng([seed, 0xDEA1])) if phases > 1 else None


def stream_of(
    data: DataBundle, niche: int, phases: int, seed: int, deal: str = "world", jitter: float = 0.5
) -> np.ndarray:
    """Niche ``niche``'s drifting stream: fixed by the partition's seed, the same in every
    generation. ``deal``: ``world``, one deal of the classes into phases for every niche (the
    world drifts as a whole, each niche's phases at their own times, ``jitter``), or
    ``niche``, a deal per niche."""
    shared = world_deal(data, phases, seed) if deal == "world" else None
    rng = np.random.default_rng([seed, niche, 7])
    return drift_order(data.y_pool, data.niches[niche], phases, rng, deal=shared, jitter=jitter if shared else 0.0)


class BudgetLearner:
    """Hosts variants of the label-budget world: each lives one pass over its niche's stream."""

    def __init__(self, spec: BudgetLearnerSpec):
        torch.set_num_threads(spec.base.torch_threads)
        self.spec = spec
        self.data = load_data(spec.base.data, spec.base.plan)
        d = self.data
        self.model = spec.base.model.build(d.n_features, d.n_classes, input_shape=d.input_shape)
        self.x_pool = torch.from_numpy(d.x_pool)
        self.x_val, self.y_val = torch.from_numpy(d.x_val), torch.from_numpy(d.y_val)
        # learning progress is measured on inputs the variant cannot choose: the first
        # validation inputs, without their labels
        self.probe = self.x_val[: spec.probe]

    def describe(self) -> dict:
        return {"device": "cpu", "engine": "budget", "reason": "", "kernel": "torch", "kernel_reason": ""}

    def policy(self, genome: dict[str, float]) -> Any:
        if self.spec.policy in ("evolved", "shuffled_m"):
            return Controller.from_genome(genome)
        return POLICIES[self.spec.policy]()

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        out_w, results = [], []
        for task in tasks:
            t0 = time.perf_counter()
            seed, w = fork_weights(seed_weights, task)
            niche = task.niche % len(self.data.niches)
            stream = stream_of(self.data, niche, self.spec.phases, self.spec.base.data.seed, self.spec.deal)
            ledger = LabelLedger()
            rng = np.random.default_rng([task.seed, 11])
            oracle = Oracle(
                self.data.y_pool, stream, budget_labels(self.spec.share, len(stream)), self.spec.free, rng, ledger,
                task.variant_id,
            )  # fmt: skip
            lr = float(task.genome.get("lr", 0.05))
            fed, control = None, LabelLedger()
            if self.spec.policy == "shuffled_m":  # M sees its own lifetime's signals, in another order
                # a first lifetime makes them; the labels it reads are counted apart (budget.labels_control)
                dry_rng = np.random.default_rng([task.seed, 11])
                dry = Oracle(self.data.y_pool, stream, oracle.budget, self.spec.free, dry_rng, control,
                             f"{task.variant_id}:control")  # fmt: skip
                m = Controller.from_genome(task.genome)
                first = live(
                    self.model,
                    w,
                    self.x_pool,
                    dry,
                    m,
                    self.probe,
                    dry_rng,
                    lr=lr,
                    replay=self.spec.replay,
                    observe_weight=self.spec.observe_weight,
                    anchor=self.spec.anchor,
                    neighbour=self.spec.neighbour,
                )
                fed = first.signals[np.random.default_rng([task.seed, 13]).permutation(len(stream))]
            lt = live(
                self.model, w, self.x_pool, oracle, self.policy(task.genome), self.probe, rng,
                lr=lr, replay=self.spec.replay, fed_signals=fed, observe_weight=self.spec.observe_weight,
                anchor=self.spec.anchor, neighbour=self.spec.neighbour,
            )  # fmt: skip
            counts = ledger.counts()
            val = accuracy(load_flat_weights(self.model, lt.weights), self.x_val, self.y_val)
            results.append(
                LearnResult(
                    task.variant_id,
                    val_accuracy=float(val),
                    samples=len(stream),
                    seconds=time.perf_counter() - t0,
                    metrics={
                        "budget.labels_free": float(counts["free"]),
                        "budget.labels_bought": float(counts["query"]),
                        "budget.budget": float(oracle.budget),
                        "budget.late_share": lt.late_share(),
                        "budget.switches": float(lt.switches),
                        "budget.observe_share": lt.modes.count("A") / max(len(lt.modes), 1),
                        "budget.labels_control": float(sum(control.counts().values())),
                    },
                    # M's choice at each arrival (A observed, B bought, F free) and where it spent
                    trace={"modes": "".join(lt.modes), "spent_at": list(lt.spent_at), "budget": int(oracle.budget)},
                )
            )
            out_w.append(lt.weights)
        return torch.stack(out_w), results


class BudgetWorld(ClassificationWorld):
    """The classification world whose variants buy their labels (see the module)."""

    name = "budget"

    def __init__(self, bundle: DataBundle, spec: BudgetLearnerSpec):
        super().__init__(bundle, spec.base)
        self.budget_spec = spec
        # the niches' labels are the oracle's alone: nothing of the world itself may score on them
        self._y.pop("transfer")

    def learner_spec(self) -> BudgetLearnerSpec:
        return self.budget_spec

    def measure(self, result: Any) -> dict[str, Any]:
        """The lifetimes' figures (``budget.*``) and their traces (artifact ``modes/``)."""
        figures = measure_lifetimes(result.evals.results)
        if not figures:
            return {}
        traces = {r.variant_id: r.trace for r in result.evals.results if r.trace}
        return {"world": figures, "artifacts": {f"modes/gen-{result.generation:04d}.json": json.dumps(traces)}}

    def labels(self, split: str) -> torch.Tensor | None:
        """Only the validation split's labels (selection's evidence, counted); the niches' are
        the oracle's."""
        return super().labels(split) if split == "probe" else None

    def describe(self) -> dict:
        d = self.data
        accept = 0 if d.y_accept is None else len(d.y_accept)
        return {
            **super().describe(),
            "world": self.name,
            "budget": {"share": self.budget_spec.share, "free": self.budget_spec.free,
                       "phases": self.budget_spec.phases, "deal": self.budget_spec.deal,
                       "policy": self.budget_spec.policy},
            # what selection and elitism read (once, the whole run); variants' reads are in their metrics
            "labels": {"validation": len(d.y_val), "acceptance": accept, "test_read_for_selection": 0},
        }  # fmt: skip


def _median(values: list[float]) -> float:
    return float(np.median(values)) if values else float("nan")


def measure_lifetimes(results: list[Any]) -> dict[str, float]:
    """A generation's figures of its forks' lifetimes (``budget.*``): the median share of the
    budget spent after the stream's midpoint (of forks that spent any), the median switches,
    the labels bought and given free (and read by the shuffled-signal control's first lifetime),
    and the mean share of arrivals observed."""
    rs = [r for r in results if "budget.labels_bought" in getattr(r, "metrics", {})]
    if not rs:
        return {}
    m = [r.metrics for r in rs]
    return {
        "budget.late_share": _median([x["budget.late_share"] for x in m if x["budget.labels_bought"] > 0]),
        "budget.switches": _median([x["budget.switches"] for x in m]),
        "budget.labels_bought": float(sum(x["budget.labels_bought"] for x in m)),
        "budget.labels_free": float(sum(x["budget.labels_free"] for x in m)),
        "budget.labels_control": float(sum(x.get("budget.labels_control", 0.0) for x in m)),
        "budget.spent_share": float(np.mean([x["budget.labels_bought"] / max(x["budget.budget"], 1) for x in m])),
        "budget.observe_share": float(np.mean([x["budget.observe_share"] for x in m])),
    }


def budget_world(cfg: Any) -> BudgetWorld:
    """The label-budget world of ``cfg`` (``data.world: budget``)."""
    from forkpop.experiments.specs import classification_world

    base = classification_world(cfg)
    b = cfg.budget
    if b.policy not in POLICY_NAMES:
        raise ValueError(f"unknown budget.policy {b.policy!r}; use one of {POLICY_NAMES}")
    spec = BudgetLearnerSpec(
        base.spec, b.share, b.free, b.phases, b.deal, b.policy, b.replay, b.observe_weight, b.anchor,
        math.inf if b.neighbour is None else b.neighbour,
    )  # fmt: skip
    return BudgetWorld(base.data, spec)
