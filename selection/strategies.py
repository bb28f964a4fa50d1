"""Strategies: plan the forks (``ask``) and turn evaluations into teacher groups (``tell``).

A strategy only plans: it never moves weights or writes records. ``best``, ``tournament``
and ``nsga2`` choose teachers by fitness (NSGA-II also by novelty), ``niche`` the fittest of
each niche, ``random`` any (a control); ``species`` wraps any of
them and splits the chosen teachers into clusters of like-predicting variants, each of which
distills its own seed. Users' strategies plug in by name or import path (``selection.method``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from forkpop.population.diversity import PAIRWISE_CAP, js_matrix, novelty, pairwise_sample
from forkpop.population.genome import GenomeSpec
from forkpop.population.state import Evaluations, ForkPlan, RunState, seed_of
from forkpop.population.variant import Origin, Variant
from forkpop.selection.operators import mutate_genome, select
from forkpop.selection.species import assign_slots, cluster_by_function

from forkpop.plugins import register


@dataclass(frozen=True)
class TeacherGroup:
    """Teachers that distill one student.

    ``members`` index the generation's evaluations, best first; the student competes for
    species slot ``slot`` and is named ``name``. With ``merge`` it is one seed for every slot
    and competes with the best of them. ``teachers`` are all of the generation's teachers
    (a species' seed may take a share of the others' targets, ``distill.species_mix``).
    """

    members: tuple[int, ...]
    slot: int
    name: str
    merge: bool = False
    teachers: tuple[int, ...] = ()


class StrategyError(RuntimeError):
    """The ask/tell rhythm was broken."""


class Strategy(ABC):
    """Ask/tell over a run's state. Subclasses choose the teachers (:meth:`choose`).

    ``ask`` forks ``size`` variants: variant ``i`` descends from the seed of slot
    ``i mod n_species``, with its genome mutated (DEAP's polynomial bounded mutation) and its
    own fork-noise seed, and learns niche ``(i + generation * rotate_niches) mod n_niches``.
    """

    def __init__(
        self,
        genome_spec: GenomeSpec,
        size: int,
        n_niches: int,
        *,
        k: int | None = None,
        mutation_eta: float = 20.0,
        mutation_indpb: float = 0.3,
        rotate_niches: int = 0,
        tournament_size: int = 3,
    ):
        self.spec = genome_spec
        self.size = size
        self.n_niches = n_niches
        self.k = k if k is not None else size
        self.mutation_eta = mutation_eta
        self.mutation_indpb = mutation_indpb
        self.rotate_niches = rotate_niches
        self.tournament_size = tournament_size
        self._asked: int | None = None

    def ask(self, state: RunState, rng: np.random.Generator) -> ForkPlan:
        """The forks of generation ``state.generation``; two draws of ``rng`` per variant."""
        if self._asked is not None:
            raise StrategyError(f"ask() twice without tell() (generation {self._asked}); tell() the evaluations first")
        g = state.generation
        variants, slots, noise = [], [], []
        for i in range(self.size):
            slot = i % state.n_species
            parent = state.seeds[slot].variant
            genome = mutate_genome(self.spec, parent.genome, seed_of(rng), self.mutation_eta, self.mutation_indpb)
            niche = (i + g * self.rotate_niches) % self.n_niches
            variants.append(Variant(f"g{g:02d}-v{i:03d}", genome, g, Origin.FORK, (parent.id,), niche))
            slots.append(slot)
            noise.append(seed_of(rng))
        self._asked = g
        return ForkPlan(tuple(variants), tuple(slots), tuple(noise))

    def tell(
        self, state: RunState, evals: Evaluations, screened: set[int], rng: np.random.Generator
    ) -> list[TeacherGroup]:
        """Teacher groups from the evaluations; ``screened`` variants never teach."""
        if self._asked is None:
            raise StrategyError("tell() without ask(); ask() for the forks of a generation first")
        self._asked = None
        eligible = [float("nan") if i in screened else f for i, f in enumerate(evals.fitness)]
        chosen = self.choose(eligible, evals, rng)
        if not chosen:
            return []
        name = f"g{state.generation + 1:02d}-seed"
        return [TeacherGroup(tuple(chosen), 0, name, merge=state.n_species > 1, teachers=tuple(chosen))]

    @abstractmethod
    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        """Teachers, best first, among variants of finite ``eligible`` fitness; one draw of ``rng``."""


class Best(Strategy):
    """The ``k`` fittest variants teach (DEAP ``selBest``)."""

    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        return select(eligible, self.k, "best", seed_of(rng), self.tournament_size)


class Tournament(Strategy):
    """``k`` tournament winners teach (DEAP ``selTournament``, without repeats)."""

    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        return select(eligible, self.k, "tournament", seed_of(rng), self.tournament_size)


class NSGA2(Strategy):
    """DEAP's NSGA-II over (fitness, novelty): ``k`` variants (unset: half the population)."""

    def __init__(self, *args, k: int | None = None, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, k=k, **kw)
        if k is None:
            self.k = max(1, self.size // 2)

    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        return select(eligible, self.k, "nsga2", seed_of(rng), self.tournament_size, novelty=novelty_of(evals))


class PerNiche(Strategy):
    """Variants compete within their niche: the ``per_niche`` fittest of each niche teach
    (DEAP ``selBest`` inside each niche), so no niche's knowledge is lost while the worse
    learners of a niche, and their genes, are. With more variants than niches (say 32 over
    16) this is where selection acts; ``k``, when set, keeps only the ``k`` fittest of them."""

    def __init__(self, *args, k: int | None = None, per_niche: int = 1, **kw) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, k=k, **kw)
        self.per_niche, self.k_cap = per_niche, k

    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        seed = seed_of(rng)
        by_niche: dict[int, list[int]] = {}
        for i, v in enumerate(evals.variants):
            by_niche.setdefault(v.niche, []).append(i)
        chosen: list[int] = []
        for members in by_niche.values():
            picked = select([eligible[i] for i in members], self.per_niche, "best", seed)
            chosen += [members[j] for j in picked]
        chosen.sort(key=lambda i: (-eligible[i], i))  # best first
        return chosen[: self.k_cap] if self.k_cap else chosen


class Random(Strategy):
    """``k`` live variants drawn at random teach, fitness ignored: the control that shows what
    choosing by fitness is worth (``forkpop study selection``)."""

    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        live = [i for i, f in enumerate(eligible) if np.isfinite(f)]
        pick = np.random.default_rng(seed_of(rng)).permutation(live)[: self.k].tolist()
        return sorted(pick, key=lambda i: (-eligible[i], i))


class Species(Strategy):
    """Several seeds side by side: the teachers ``inner`` chooses are clustered by what they
    predict (Jensen-Shannon distance, average linkage) and each cluster distills the seed of
    the slot most of its members came from. Before generation ``species_from``, and in the
    last generation with ``merge_last``, all teachers distill one seed for every slot.
    """

    def __init__(
        self, inner: Strategy, n_species: int, *, species_from: int = 0, merge_last: bool = True, generations: int = 1
    ):
        self.inner = inner
        self.n_species = n_species
        self.species_from = species_from
        self.merge_last = merge_last
        self.generations = generations

    def merged(self, g: int) -> bool:
        return g < self.species_from or (self.merge_last and g == self.generations - 1)

    def ask(self, state: RunState, rng: np.random.Generator) -> ForkPlan:
        return self.inner.ask(state, rng)

    def choose(self, eligible: list[float], evals: Evaluations, rng: np.random.Generator) -> list[int]:
        return self.inner.choose(eligible, evals, rng)

    def tell(
        self, state: RunState, evals: Evaluations, screened: set[int], rng: np.random.Generator
    ) -> list[TeacherGroup]:
        groups = self.inner.tell(state, evals, screened, rng)
        g = state.generation
        if not groups or self.merged(g) or self.n_species == 1:
            return groups
        chosen = list(groups[0].members)
        js = teacher_distances(evals, chosen)
        clusters = [[chosen[j] for j in c] for c in cluster_by_function(js, self.n_species)]
        slots = assign_slots(clusters, list(evals.plan.slots), self.n_species)
        return [
            TeacherGroup(tuple(c), s, f"g{g + 1:02d}-seed{s}", teachers=tuple(chosen))
            for c, s in zip(clusters, slots, strict=False)
        ]


def distances(evals: Evaluations) -> tuple[np.ndarray, list[float]]:
    """Pairwise Jensen-Shannon distances of the variants on the probe split, and each one's
    novelty (mean distance to the other live ones); NaN for dead variants. Computed once per
    generation from the shared predictions."""
    return evals.memo("distances", lambda: _distances(evals))


def novelty_of(evals: Evaluations) -> list[float]:
    """Each variant's novelty: its mean Jensen-Shannon distance to the other live variants on
    the probe split (NaN for dead ones). Up to ``PAIRWISE_CAP`` live variants against all of
    them (:func:`distances`); above, against ``PAIRWISE_CAP`` reference variants drawn by
    :func:`pairwise_sample` (seeded by the generation and the count, so a resume draws the
    same), ``n x cap`` pairs instead of ``n^2``."""
    live = evals.live
    if len(live) <= PAIRWISE_CAP:
        return distances(evals)[1]

    def compute() -> list[float]:
        gen = evals.variants[live[0]].generation
        ref = pairwise_sample(len(live), PAIRWISE_CAP, [gen, len(live), 0x70E])
        nov = novelty(evals.probs("probe").double().numpy(), ref)
        out = [float("nan")] * len(evals)
        for k, i in enumerate(live):
            out[i] = float(nov[k])
        return out

    return evals.memo("novelty", compute)


def teacher_distances(evals: Evaluations, chosen: list[int]) -> np.ndarray:
    """Pairwise Jensen-Shannon distances ``(k, k)`` of the live variants ``chosen`` on the
    probe split (the same figures as ``distances(evals)[0][np.ix_(chosen, chosen)]``, at
    ``k^2`` pairs)."""
    return evals.memo(f"js:{chosen}", lambda: js_matrix(evals.probs("probe", chosen).double().numpy()))


def _distances(evals: Evaluations) -> tuple[np.ndarray, list[float]]:
    n = len(evals)
    live = evals.live
    js = np.full((n, n), np.nan)
    nov = [float("nan")] * n
    if live:
        sub = js_matrix(evals.probs("probe").double().numpy())
        js[np.ix_(live, live)] = sub
        for k, i in enumerate(live):
            nov[i] = float((sub[k].sum() - sub[k, k]) / max(len(live) - 1, 1))
    return js, nov


STRATEGIES: dict[str, type[Strategy]] = {
    "best": Best,
    "tournament": Tournament,
    "nsga2": NSGA2,
    "niche": PerNiche,
    "random": Random,
}
for _name, _cls in STRATEGIES.items():
    register("strategies", _name, _cls)
