"""Policy distillation (``distill.method: policy_kd``, the environment world's distiller).

Each teacher of the group plays greedy episodes from the generation's transfer seeds (never
selection's, elitism's or the reported ones) and the states it visits make the transfer set.
A state's target is ``own_niche`` of the action distribution of the teacher that visited it
and the rest the group's fitness-weighted mean (at ``temperature``); the student (from the
seed: ``init: previous``, the best teacher: ``best``, or their average) learns it by KL with
Adam, ``steps`` mini-batches, and keeps the weights of its best probe return (``eval_every``).

It talks to the world only through its methods (``visit``, ``transfer_seeds``, ``predict``,
``fitness``), so it imports nothing from ``workers``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from forkpop.population.genome import GenomeSpec
from forkpop.population.models import load_flat_weights
from forkpop.population.state import Evaluations, RunState, seed_of
from forkpop.population.variant import Origin, Variant
from forkpop.selection.distill import student_init
from forkpop.selection.distiller import Student
from forkpop.selection.operators import inherit_genome
from forkpop.selection.strategies import TeacherGroup

from forkpop.plugins import register


class PolicyDistiller:
    """The teachers' action distributions on the states they visit, taught to one student."""

    def __init__(
        self,
        genome_spec: GenomeSpec,
        *,
        init: str = "best",
        temperature: float = 1.0,
        steps: int = 300,
        lr: float = 1e-2,
        batch_size: int = 128,
        eval_every: int = 50,
        own_niche: float = 0.5,
        inherit: str = "crossover",
        episodes: int = 4,
        states_per_teacher: int = 1000,
        **_: Any,  # the classification distiller's options (aggregate, screen, ...) do not apply
    ):
        self.spec = genome_spec
        self.init, self.temperature, self.steps, self.lr = init, temperature, steps, lr
        self.batch_size, self.eval_every, self.own_niche, self.inherit = batch_size, eval_every, own_niche, inherit
        self.episodes, self.states_per_teacher = episodes, states_per_teacher

    def __call__(
        self,
        world: Any,
        model: torch.nn.Module,
        state: RunState,
        group: TeacherGroup,
        evals: Evaluations,
        rng: np.random.Generator,
    ) -> Student:
        members = list(group.members)
        variants = evals.variants
        tw = evals.weights[members]
        fit = torch.tensor([max(evals.fitness[i], 0.0) for i in members], dtype=torch.float64) + 1e-6
        share = (fit / fit.sum()).float()
        seeds = world.transfer_seeds(state.generation, self.episodes)
        xs = [torch.from_numpy(world.visit(w, seeds, self.states_per_teacher)).float() for w in tw]
        x = torch.cat(xs)
        who = torch.cat([torch.full((len(v),), k) for k, v in enumerate(xs)])
        with torch.no_grad():
            probs, _ = world.predict(model, tw, x)  # (k, m, A)
            if self.temperature != 1.0:
                probs = F.softmax(torch.log(probs.clamp_min(1e-12)) / self.temperature, -1)
            mean = (share[:, None, None] * probs).sum(0)
            own = probs[who, torch.arange(len(x))]
            target = self.own_niche * own + (1 - self.own_niche) * mean
        w0 = student_init(self.init, state.seeds[group.slot].weights, tw, share.tolist(), [1.0] * len(members))
        gen = torch.Generator().manual_seed(seed_of(rng))
        load_flat_weights(model, w0)
        params = list(model.parameters())
        opt = torch.optim.Adam(params, lr=self.lr)
        best_w, best_f = w0.clone(), world.fitness(model, w0)
        tau = self.temperature
        for step in range(self.steps):
            idx = torch.randint(len(x), (min(self.batch_size, len(x)),), generator=gen)
            logp = F.log_softmax(model(x[idx]) / tau, -1)
            loss = F.kl_div(logp, target[idx], reduction="batchmean") * tau * tau
            opt.zero_grad()
            loss.backward()
            opt.step()
            if self.eval_every and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps):
                w = torch.nn.utils.parameters_to_vector(params).detach().clone()
                f = world.fitness(model, w)
                if f >= best_f:  # ties go to the later, more distilled one
                    best_w, best_f = w, f
        if not self.eval_every:
            best_w = torch.nn.utils.parameters_to_vector(params).detach().clone()
            best_f = world.fitness(model, best_w)
        genome = inherit_genome(
            self.spec, [variants[i].genome for i in members], share.tolist(), self.inherit, seed_of(rng)
        )
        variant = Variant(
            group.name, genome, state.generation + 1, Origin.DISTILL, tuple(variants[i].id for i in members)
        )
        return Student(variant, best_w, best_f, group.slot, group.merge)


register("distillers", "policy_kd", PolicyDistiller)
