"""A run's state and a generation's evidence, as plain values the core passes along."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from forkpop.population.lineage import Lineage
from forkpop.population.variant import Variant


@dataclass(frozen=True)
class Seed:
    """A species slot's current seed: whom the next forks of that slot descend from."""

    variant: Variant
    weights: torch.Tensor  # (n_params,)
    val: float  # its fitness on the probe split


def best_slot(seeds: tuple[Seed, ...] | list[Seed]) -> int:
    """The slot of ``seeds`` whose seed is best on the probe split (the lowest slot on ties)."""
    return max(range(len(seeds)), key=lambda s: (seeds[s].val, -s))


@dataclass(frozen=True)
class RunState:
    """Everything a run carries from one generation to the next; a checkpoint stores it and
    resume restores it.

    ``generation`` is the next generation to run. Generation ``g``'s random choices all come
    from :meth:`rng` (``numpy.random.default_rng([run_seed, g])``), so the state needs no
    generator object. ``generated[slot]`` holds generated transfer inputs, their soft targets
    and the generation that made each; ``teachers`` the last generation's teachers
    ``(k, n_params)`` (best first).
    """

    run_seed: int
    seeds: tuple[Seed, ...]
    lineage: Lineage
    generation: int = 0
    generated: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    teachers: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def rng(self, generation: int | None = None) -> np.random.Generator:
        g = self.generation if generation is None else generation
        return np.random.default_rng([self.run_seed, g])

    @property
    def n_species(self) -> int:
        return len(self.seeds)

    def best_slot(self) -> int:
        """The slot whose seed is best on the probe split (the lowest slot on ties)."""
        return best_slot(self.seeds)

    def seed_stack(self) -> torch.Tensor:
        """The seeds' weights ``(n_species, n_params)``."""
        return torch.stack([s.weights for s in self.seeds])

    def evolve(self, **changes: Any) -> RunState:
        return replace(self, **changes)


def seed_of(rng: np.random.Generator) -> int:
    """A child seed drawn from ``rng`` (one draw: the order of draws is the run's contract)."""
    return int(rng.integers(0, 2**62))


@dataclass(frozen=True)
class ForkPlan:
    """What a strategy asks for: the variants to fork, each with its seed slot and noise seed.

    ``variants[i]`` forks the seed of slot ``slots[i]`` with fork noise from ``noise_seeds[i]``
    and learns niche ``variants[i].niche``.
    """

    variants: tuple[Variant, ...]
    slots: tuple[int, ...]
    noise_seeds: tuple[int, ...]


class Evaluations:
    """A generation's learned variants and the evidence about them.

    ``weights`` ``(n, n_params)``, ``fitness[i]`` (NaN: diverged or failed), ``results`` the
    workers' per-variant records. Predictions of the live variants on a split are computed
    once, on first use, and shared by every screen, strategy, distiller and observer.
    """

    def __init__(
        self,
        plan: ForkPlan,
        weights: torch.Tensor,
        results: list[Any],
        fitness: list[float],
        fork_seeds: torch.Tensor,
        predict: Callable[[torch.Tensor, str], tuple[torch.Tensor, list[torch.Tensor]]],
    ):
        self.plan = plan
        self.variants = list(plan.variants)
        self.weights = weights
        self.results = results
        self.fitness = fitness
        self.fork_seeds = fork_seeds  # (n_species, n_params): the seeds they forked
        self._predict = predict
        self._cache: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._memo: dict[str, Any] = {}
        self.live = [i for i, f in enumerate(fitness) if math.isfinite(f)]
        self._row = {i: k for k, i in enumerate(self.live)}

    def __len__(self) -> int:
        return len(self.variants)

    def probs(self, split: str, which: list[int] | None = None) -> torch.Tensor:
        """Predicted distributions ``(len(which), m, C)`` of variants ``which`` (default: the
        live ones, in order) on ``split``; only live variants have predictions."""
        if split not in self._cache:
            self._cache[split] = self._predict(self.weights[self.live], split)
        p = self._cache[split][0]
        if which is None:
            return p
        return p[[self._row[i] for i in which]]

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per generation under ``key`` (e.g. the pairwise distances that
        both novelty and species need)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def hidden(self, split: str = "probe", which: list[int] | None = None) -> list[torch.Tensor]:
        """The last hidden representations of variants ``which`` (default: the live ones) on
        ``split``; empty where the world gives none."""
        self.probs(split)
        hid = self._cache[split][1]
        if which is None or not hid:
            return hid
        return [hid[self._row[i]] for i in which]
