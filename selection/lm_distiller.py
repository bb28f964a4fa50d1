"""Distillation for language models (``distill.method: lm_kd``, the text world's distiller).

The student learns the teachers' next-byte distributions (forward KL at ``temperature``) on
windows of the transfer corpus: every niche's real training text, and, where the run learns
from its own text (``lm.self_train.into``: transfer or both), the samples generated so far.
A window of niche ``j`` takes ``own_niche`` of its target from the teacher that learned ``j``
and the rest from the whole group (fitness-weighted); ``hard`` of each position's target is the
true next byte (at temperature 1 the loss is then ``(1 - hard)`` KL to the teachers plus
``hard`` cross-entropy on the text: the student learns from the text beside its teachers, so it
is not bounded by them). The student starts from the seed
(``init: previous``), the best teacher (``best``) or the teachers' weight average (``average``;
``data_average`` weighs each by its niche's size), keeps its best probe score (``eval_every``)
and, once distilled, the group's text for the next generation is generated (by each niche's
teacher, or by the student: ``lm.self_train.by``).

It talks to the world only through the text world's methods (``engine``, ``transfer_source``,
``self_text``), so it imports nothing from ``workers``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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
        hard: float = 0.0,
        inherit: str = "crossover",
        **_: Any,  # the classification distiller's options (aggregate, screen, ...) do not apply
    ):
        self.spec = genome_spec
        self.init, self.temperature, self.steps, self.lr = init, temperature, steps, lr
        self.batch_size, self.eval_every, self.own_niche, self.inherit = batch_size, eval_every, own_niche, inherit
        self.hard = hard

    def __call__(
        self,
        world: Any,
        model: torch.nn.Module,
        state: RunState,
        group: TeacherGroup,
        evals: Evaluations,
        rng: np.random.Generator,
    ) -> Student:
        with _threads(getattr(world, "driver_threads", 1)):  # the workers wait: every core of the driver
            return self._distill(world, model, state, group, evals, rng)

    def _distill(self, world: Any, model: Any, state: RunState, group: TeacherGroup, evals: Any, rng: Any) -> Student:
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
        best_w, best_f = student.flat()[0].clone(), world.fitness(model, student.flat()[0])
        B, tau, o = self.batch_size, self.temperature, self.own_niche
        k = len(members)
        cum = torch.cumsum(share.double(), 0).numpy()
        for step in range(self.steps):
            # Niches in turn from a random start (every niche's text alike), each window drawn
            # from its niche's source (real text, and generated text where the run says so).
            which = (int(gen.integers(world.n_niches)) + np.arange(B)) % world.n_niches
            x = torch.from_numpy(np.stack([sources[j].draw(1, gen)[0] for j in which]))
            # The group's fitness-weighted mean target, estimated by one teacher per window drawn
            # by its share (the loss's gradient is linear in the target: unbiased), and the own
            # niche's teacher for the own-niche share: two teacher passes per window, not k.
            mean_t = np.minimum(np.searchsorted(cum, gen.random(B) * cum[-1], side="right"), k - 1)
            own_t = np.array([by_niche.get(int(j), int(m)) for j, m in zip(which, mean_t, strict=True)])
            with torch.no_grad():
                if o <= 0:
                    target = _teacher_probs(teachers, k, mean_t, x, tau)
                else:
                    both = _teacher_probs(teachers, k, np.concatenate([mean_t, own_t]), torch.cat([x, x]), tau)
                    target = (1 - o) * both[:B] + o * both[B:]
                if self.hard > 0:  # the true next byte's share: KL to this mixture = mixed soft and hard losses
                    target.mul_(1 - self.hard)
                    target.scatter_add_(-1, x[:, 1:, None], torch.full(x[:, 1:, None].shape, self.hard))
            student.step(x.unsqueeze(0), soft=target.unsqueeze(0), temperature=tau)
            if self.eval_every and ((step + 1) % self.eval_every == 0 or step + 1 == self.steps):
                f = world.fitness(model, student.flat()[0])
                if f > best_f:
                    best_w, best_f = student.flat()[0].clone(), f
        if not self.eval_every:
            best_w = student.flat()[0]
            best_f = world.fitness(model, best_w)
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


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """At least ``n`` torch threads inside the block, the number before it afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _teacher_probs(teachers: Any, k: int, who: np.ndarray, x: torch.Tensor, tau: float) -> torch.Tensor:
    """Teacher ``who[i]``'s next-byte distributions at temperature ``tau`` on window ``x[i]``:
    ``(B, T, V)``. The windows are grouped by teacher (padded to the largest group), so each
    teacher reads only its own windows, all teachers in one pass."""
    B = len(who)
    counts = np.bincount(who, minlength=k)
    width = int(counts.max())
    slot = np.zeros(B, dtype=np.int64)
    seen = np.zeros(k, dtype=np.int64)
    for i, t in enumerate(who):
        slot[i], seen[t] = seen[t], seen[t] + 1
    tokens = torch.zeros(k, width, x.shape[1] - 1, dtype=torch.long)
    tw, sw = torch.from_numpy(who), torch.from_numpy(slot)
    tokens[tw, sw] = x[:, :-1]
    probs = torch.softmax(teachers.logits(tokens) / tau, -1)  # (k, width, T, V)
    return probs[tw, sw]


register("distillers", "lm_kd", LMDistiller)
