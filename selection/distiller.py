"""The distiller: a teacher group becomes a student seed (knowledge distillation).

It does not decide whether the student replaces a seed: that is the core's elitism, on the
student's own probe fitness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from forkpop.population.genome import GenomeSpec
from forkpop.population.state import Evaluations, RunState, seed_of
from forkpop.population.variant import Origin, Variant
from forkpop.population.world import World
from forkpop.selection.distill import distill, own_niche_targets, soft_targets, student_init, teacher_targets
from forkpop.selection.operators import inherit_genome
from forkpop.selection.screens import agreement_screen
from forkpop.selection.strategies import TeacherGroup

from forkpop.plugins import register

Generated = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, soft targets, generation born


@dataclass(frozen=True)
class Student:
    """A seed distilled from a group of teachers, not yet accepted or refused."""

    variant: Variant
    weights: torch.Tensor  # (n_params,)
    val: float  # probe fitness
    slot: int = 0
    merge: bool = False
    real_fraction: float = 1.0  # share of real inputs in its transfer set
    generated: int = 0  # generated inputs in its transfer set
    pool: Generated | None = None  # the slot's generated inputs after this distillation
    tokens: int = 0  # tokens the student learned from (language models)


@dataclass(frozen=True)
class GeneratedSpec:
    """Inputs the population makes for its own transfer set (see ``distill.generated``)."""

    kind: str = "none"  # none | mixup | noise
    per_generation: float = 0.5
    keep: bool = True
    noise_std: float = 0.1
    min_real_fraction: float = 0.5


class Distiller:
    """Knowledge distillation of a teacher group into a student (the ``kd`` distiller).

    The group's members may be screened by agreement (``screen``); a species' seed takes
    ``species_mix`` of its soft targets from the generation's other teachers; teachers weigh
    in by fitness. The student starts from ``init`` (``previous``, ``best``, ``average``,
    ``data_average``) and learns the aggregated soft targets on the transfer set (all niches'
    inputs, or the teachers' niches') plus generated inputs; its genome is inherited from its
    teachers (``inherit``). Two draws of the generation's ``rng`` per student.
    """

    def __init__(
        self,
        genome_spec: GenomeSpec,
        *,
        init: str = "data_average",
        transfer: str = "all",
        temperature: float = 4.0,
        steps: int = 100,
        lr: float = 1e-3,
        batch_size: int = 128,
        aggregate: str = "mean",
        eval_every: int = 25,
        screen: float = 0.0,
        species_mix: float = 0.0,
        own_niche: float = 0.0,
        inherit: str = "crossover",
        generated: GeneratedSpec = GeneratedSpec(),
        kernel: str = "auto",
    ):
        self.spec = genome_spec
        self.init, self.transfer, self.temperature = init, transfer, temperature
        self.steps, self.lr, self.batch_size = steps, lr, batch_size
        self.aggregate, self.eval_every, self.screen = aggregate, eval_every, screen
        self.species_mix, self.inherit, self.generated = species_mix, inherit, generated
        self.own_niche, self.kernel = own_niche, kernel

    def __call__(
        self,
        world: World,
        model: torch.nn.Module,
        state: RunState,
        group: TeacherGroup,
        evals: Evaluations,
        rng: np.random.Generator,
    ) -> Student:
        g = state.generation
        fitness, variants = evals.fitness, evals.variants
        members = agreement_screen(evals, list(group.members), self.screen)
        mix = self.species_mix if state.n_species > 1 else 0.0
        others = [i for i in group.teachers if i not in members] if mix > 0 else []
        sources = members + others
        tw = evals.weights[sources]
        own_f = sum(fitness[i] for i in members)
        tf = [fitness[i] * (1 - mix) / own_f for i in members]
        if others:
            other_f = sum(fitness[i] for i in others)
            tf += [fitness[i] * mix / other_f for i in others]
        x_all = world.inputs("transfer")
        if self.transfer == "all":
            rows, transfer = np.arange(len(x_all)), x_all
        else:
            rows = np.sort(np.concatenate([world.niche_rows(variants[i].niche) for i in sources]))
            transfer = x_all[torch.from_numpy(rows)]
        probe = (world.inputs("probe"), world.labels("probe"))
        pool = self._generate(world, model, state, group.slot, transfer, tw, tf, probe)
        extra, real_fraction = None, 1.0
        if pool is not None and len(pool[0]):
            extra, real_fraction = (pool[0], pool[1]), len(transfer) / (len(transfer) + len(pool[0]))
        k = len(members)
        init = student_init(
            self.init,
            state.seeds[group.slot].weights,
            tw[:k],
            tf[:k],
            [world.niche_size(variants[i].niche) for i in members],
        )
        target = None
        if self.own_niche > 0:
            row_niche = np.full(len(x_all), -1, dtype=np.int64)
            for j in range(world.n_niches):
                row_niche[world.niche_rows(j)] = j
            probs = soft_targets(model, tw, transfer, self.temperature)
            base = teacher_targets(model, tw, tf, transfer, self.temperature, self.aggregate, probe, probs)
            target = own_niche_targets(
                base, probs, [variants[i].niche for i in sources], torch.from_numpy(row_niche[rows]), self.own_niche
            )
        weights, _ = distill(
            model,
            init,
            tw,
            tf,
            transfer,
            temperature=self.temperature,
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            aggregate=self.aggregate,
            generator=torch.Generator().manual_seed(seed_of(rng)),
            probe=probe,
            eval_every=self.eval_every,
            extra=extra,
            target=target,
            kernel=self.kernel,
        )
        val = world.fitness(model, weights)
        genome = inherit_genome(self.spec, [variants[i].genome for i in members], tf[:k], self.inherit, seed_of(rng))
        variant = Variant(group.name, genome, g + 1, Origin.DISTILL, tuple(variants[i].id for i in sources))
        n_gen = 0 if extra is None else len(extra[0])
        return Student(variant, weights, val, group.slot, group.merge, real_fraction, n_gen, pool)

    def _generate(
        self,
        world: World,
        model: torch.nn.Module,
        state: RunState,
        slot: int,
        real: torch.Tensor,
        teachers: torch.Tensor,
        fitness: list[float],
        probe: tuple[torch.Tensor, torch.Tensor | None],
    ) -> Generated | None:
        """Generation ``g``'s generated transfer inputs for ``slot`` with the teachers'
        soft targets, joined to those kept from earlier generations (newest first) and cut so
        that real inputs stay at least ``min_real_fraction`` of the set. None: generates none."""
        gc = self.generated
        if gc.kind == "none":
            return None
        g = state.generation
        gen = torch.Generator().manual_seed(int(np.random.default_rng([state.run_seed, g, slot, 5]).integers(2**62)))
        n_new = max(1, int(round(gc.per_generation * len(real))))
        x_new = world.generate(gc.kind, real, n_new, gen, noise_std=gc.noise_std)
        p_new = teacher_targets(model, teachers, fitness, x_new, self.temperature, self.aggregate, probe)
        born = torch.full((n_new,), g, dtype=torch.int64)
        if gc.keep and slot in state.generated:
            ox, op, ob = state.generated[slot]
            x_new, p_new, born = torch.cat([x_new, ox]), torch.cat([p_new, op]), torch.cat([born, ob])
        f = gc.min_real_fraction
        cap = len(x_new) if f == 0 else int(len(real) * (1 - f) / f)
        return x_new[:cap], p_new[:cap], born[:cap]


DISTILLERS: dict[str, type[Distiller]] = {"kd": Distiller}
register("distillers", "kd", Distiller)

# The text world's distiller (``lm_kd``) registers itself beside ``kd``.
# The environment world's (``policy_kd``) too.
from forkpop.selection import lm_distiller, policy_distiller  # noqa: E402, F401
