"""Distillation for language models (``distill.method: lm_kd``, the text world's distiller).

The student learns the teachers' next-byte distributions (forward KL at ``temperature``) on
windows of the transfer corpus: every niche's real training text, and, where the run learns
from its own text (``lm.self_train.into``: transfer or both), the samples generated so far.
A window of niche ``j`` takes ``own_niche`` of its target from the teacher that learned ``j``
and the rest from the whole group (fitness-weighted). The student starts from the seed
(``init: previous``), the best teacher (``best``) or the teachers' weight average (``average``;
``data_average`` weighs each by its niche's size), keeps its best probe score (``eval_every``)
and, once distilled, the group's text for the next generation is generated (by each niche's
teacher, or by the student: ``lm.self_train.by``).

It talks to the world only through the text world's methods (``engine``, ``transfer_source``,
``self_text``), so it imports nothing from ``workers``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from forkpop.population.genome import GenomeSpec
from forkpop.population.state import Evaluations, RunState, seed_of
from forkpop.population.variant import Origin, Variant
from forkpop.selection.distiller import Student
from forkpop.selection.operators import inherit_genome
from forkpop.selection.strategies import TeacherGroup

from forkpop.plugins import register


class LMDistiller:
    """Knowledge distillation of a group of language models into a student (see the module)."""

    def __init__(
        self,
        genome_spec: GenomeSpec,
        *,
        init: str = "average",
        temperature: float = 1.0,
        steps: int = 100,
        lr: float = 1e-3,
        batch_size: int = 32,
        eval_every: int = 25,
        own_niche: float = 0.5,
        inherit: str = "crossover",
        **_: Any,  # the classification distiller's options (aggregate, screen, ...) do not apply
    ):
        self.spec = genome_spec
        self.init, self.temperature, self.steps, self.lr = init, temperature, steps, lr
        self.batch_size, self.eval_every, self.own_niche, self.inherit = batch_size, eval_every, own_niche, inherit

    def __call__(
        self,
        world: Any,
        model: torch.nn.Module,
        state: RunState,
        group: TeacherGroup,
        evals: Evaluations,
        rng: np.random.Generator,
    ) -> Student:
        g = state.generation
        members = list(group.members)
        variants = evals.variants
        tw = evals.weights[members]
        fit = [evals.fitness[i] for i in members]
        share = torch.tensor([2.0**f for f in fit], dtype=torch.float64)  # 2^-bpb: positive, monotone
        share = (share / share.sum()).float()
        niches = [variants[i].niche for i in members]
        seed_w = state.seeds[group.slot].weights
        w0 = self._init(seed_w, tw, share, [world.niche_size(j) for j in niches])
        gen = np.random.default_rng(seed_of(rng))
        student = world.engine(w0, lr=[self.lr], clip=1.0)
        teachers = world.engine(tw)
        pool = state.generated.get(group.slot)
        sources = [world.transfer_source(j, pool) for j in range(world.n_niches)]
        by_niche = {}
        for k, j in enumerate(niches):  # members are best first: the fittest teacher of each niche
            by_niche.setdefault(j, k)
        probe = world.inputs("probe")
        best_w, best_f = student.flat()[0].clone(), world.fitness(model, student.flat()[0])
        B, tau, o = self.batch_size, self.temperature, self.own_niche
        real_windows = 0
        for step in range(self.steps):
            which = gen.integers(0, world.n_niches, size=B)
            rows = [sources[j].draw(1, gen)[0] for j in which]
            x = torch.from_numpy(np.stack(rows))
            real_windows += sum(int(sources[j].real_fraction >= 1.0) for j in which)
            with torch.no_grad():
                p = torch.softmax(teachers.logits(x[:, :-1].unsqueeze(0).expand(len(members), -1, -1)) / tau, -1)
                target = (share[:, None, None, None] * p).sum(0)  # (B, T, V)
                if o > 0:
                    own = torch.tensor([by_niche.get(int(j), -1) for j in which])
                    has = own >= 0
                    if bool(has.any()):
                        target[has] = (1 - o) * target[has] + o * p[own[has], torch.nonzero(has).flatten()]
            student.step(x.unsqueeze(0), soft=target.unsqueeze(0), temperature=tau)
            if self.eval_every and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps):
                f = world.fitness(model, student.flat()[0])
                if f > best_f:
                    best_w, best_f = student.flat()[0].clone(), f
        if not self.eval_every:
            best_w = student.flat()[0]
            best_f = world.fitness(model, best_w)
        del probe
        writers = torch.stack([tw[by_niche[j]] if j in by_niche else best_w for j in range(world.n_niches)])
        if world.spec.self_train.by == "seed":
            writers = best_w.expand(world.n_niches, -1)
        new_pool = world.self_text(pool, writers, g, best_w, seed_of(rng))
        genome = inherit_genome(
            self.spec, [variants[i].genome for i in members], share.tolist(), self.inherit, seed_of(rng)
        )
        variant = Variant(group.name, genome, g + 1, Origin.DISTILL, tuple(variants[i].id for i in members))
        n_gen = int(len(new_pool[1])) if world.spec.self_train.transfer() else 0
        student_out = Student(
            variant,
            best_w,
            best_f,
            group.slot,
            group.merge,
            real_fraction=min(s.real_fraction for s in sources),
            generated=n_gen,
            pool=new_pool,
            tokens=self.steps * B * world.arch.context,
        )
        return student_out

    def _init(self, seed: torch.Tensor, tw: torch.Tensor, share: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        if self.init == "previous":
            return seed.clone()
        if self.init == "best":
            return tw[0].clone()
        if self.init == "average":
            return tw.mean(0)
        if self.init == "data_average":
            w = torch.tensor(sizes, dtype=torch.float32)
            return (w[:, None] * tw).sum(0) / w.sum()
        raise ValueError(f"unknown distill.init {self.init!r}; use previous, best, average or data_average")


register("distillers", "lm_kd", LMDistiller)
