"""DEAP behind one adapter: selection of teachers, genome mutation and crossover, all seeded.

DEAP's operators draw from the global ``random`` module; every call here runs under a
``random`` state seeded from the caller's seed and restores the previous state afterwards,
so nothing else in the process is disturbed and the same seed gives the same choice.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence

from deap import base, tools
from forkpop.population.genome import Genome, GenomeSpec

SELECTORS = ("best", "tournament", "nsga2")
INHERIT = ("crossover", "best", "choice")


class FitnessMax(base.Fitness):
    weights = (1.0,)


class FitnessNovelty(base.Fitness):
    weights = (1.0, 1.0)  # both maximised: validation accuracy and novelty


class Individual(list):
    """A DEAP individual: a list of gene values in the unit cube, plus its population index."""

    def __init__(self, values: Sequence[float], index: int = -1):
        super().__init__(values)
        self.index = index
        self.fitness = FitnessMax()


@contextlib.contextmanager
def seeded_random(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def select(
    fitnesses: Sequence[float],
    k: int,
    method: str,
    seed: int,
    tournament_size: int = 3,
    novelty: Sequence[float] | None = None,
) -> list[int]:
    """Indices of ``k`` distinct individuals chosen by ``method``, best first.

    Non-finite fitnesses (diverged variants) are never chosen. Tournament draws one winner at
    a time from those not yet chosen, so the result has no repeats. ``nsga2`` is DEAP's
    NSGA-II over (fitness, ``novelty``): the non-dominated fronts in turn, the last one cut
    by crowding distance.
    """
    if method not in SELECTORS:
        raise ValueError(f"unknown selection.method {method!r}; use one of {SELECTORS}")
    if method == "nsga2":
        if novelty is None or len(novelty) != len(fitnesses):
            raise ValueError("selection.method=nsga2 needs one novelty score per variant")
        return _select_nsga2(fitnesses, novelty, k, seed)
    pool = []
    for i, f in enumerate(fitnesses):
        if math.isfinite(f):
            ind = Individual([], i)
            ind.fitness.values = (f,)
            pool.append(ind)
    k = min(k, len(pool))
    with seeded_random(seed):
        if method == "best":
            chosen = tools.selBest(pool, k)
        else:
            chosen = []
            for _ in range(k):
                (win,) = tools.selTournament(pool, 1, tournsize=min(tournament_size, len(pool)))
                chosen.append(win)
                pool = [p for p in pool if p is not win]
    chosen.sort(key=lambda ind: (-ind.fitness.values[0], ind.index))
    return [ind.index for ind in chosen]


def _select_nsga2(fitnesses: Sequence[float], novelty: Sequence[float], k: int, seed: int) -> list[int]:
    pool = []
    for i, (f, n) in enumerate(zip(fitnesses, novelty, strict=True)):
        if math.isfinite(f):
            ind = Individual([], i)
            ind.fitness = FitnessNovelty()
            ind.fitness.values = (f, float(n) if math.isfinite(n) else 0.0)
            pool.append(ind)
    k = min(k, len(pool))
    with seeded_random(seed):
        chosen = tools.selNSGA2(pool, k)
    chosen.sort(key=lambda ind: (-ind.fitness.values[0], ind.index))
    return [ind.index for ind in chosen]


def mutate_genome(spec: GenomeSpec, genome: Genome, seed: int, eta: float = 20.0, indpb: float = 0.5) -> Genome:
    """Polynomial bounded mutation (``deap.tools.mutPolynomialBounded``) on each gene's scale."""
    before = spec.to_unit(genome)
    ind = Individual(before)
    with seeded_random(seed):
        (ind,) = tools.mutPolynomialBounded(ind, eta=eta, low=0.0, up=1.0, indpb=indpb)
    child = spec.from_unit(list(ind))
    # Genes the operator left alone keep their exact value (no unit-scale round trip).
    return Genome({n: genome[n] if u == b else child[n] for n, u, b in zip(spec.names, ind, before, strict=True)})


def crossover_genomes(spec: GenomeSpec, a: Genome, b: Genome, seed: int, eta: float = 15.0) -> Genome:
    """Simulated binary bounded crossover (``deap.tools.cxSimulatedBinaryBounded``); first child."""
    ia, ib = Individual(spec.to_unit(a)), Individual(spec.to_unit(b))
    with seeded_random(seed):
        child, _ = tools.cxSimulatedBinaryBounded(ia, ib, eta=eta, low=0.0, up=1.0)
    return spec.from_unit(list(child))


def inherit_genome(
    spec: GenomeSpec, teachers: Sequence[Genome], fitnesses: Sequence[float], method: str, seed: int
) -> Genome:
    """The genome a distilled seed inherits from its teachers (given best first)."""
    if method not in INHERIT:
        raise ValueError(f"unknown selection.inherit {method!r}; use one of {INHERIT}")
    if not teachers:
        raise ValueError("no teachers to inherit a genome from")
    if method == "best" or len(teachers) == 1:
        return teachers[0]
    if method == "crossover":
        return crossover_genomes(spec, teachers[0], teachers[1], seed)
    (pick,) = select(fitnesses, 1, "tournament", seed, tournament_size=2)
    return teachers[pick]
