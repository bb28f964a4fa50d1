"""The World interface: what a population learns, and everything the core asks of it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class World(ABC):
    """What a population learns: data and niches, the model, the learning step, fitness.

    Distillation is the distiller's (``distill.method``; the default ``kd`` distills output
    distributions over the ``transfer`` inputs), so a world with other outputs brings a
    distiller with it.

    The generation core (``forkpop.experiments.core``), the strategies, screens, distiller
    and observers only talk to a world through these methods, so a world other than
    classification (next-token language models, a label budget, an environment) plugs in
    beside it. Weights travel as flat vectors ``(n_params,)`` (stacks ``(n, n_params)``);
    ``model`` is a template module the world built, loaded with each row in turn.

    Splits a world names: ``"probe"`` (selection's evidence: fitness, screens, novelty,
    the distillation's early stopping), ``"transfer"`` (inputs distillation may use),
    optionally ``"accept"`` (elitism's evidence only, see :meth:`acceptance_scores`) and
    ``"test"`` (reported only).
    """

    #: the world's name (recorded as the run's ``forkpop.world`` tag)
    name: str = "world"

    # -- data -------------------------------------------------------------------------------
    @property
    @abstractmethod
    def n_niches(self) -> int:
        """How many niches (ordered streams) the population's forks learn from."""

    @abstractmethod
    def niche_size(self, niche: int) -> int:
        """Samples in niche ``niche`` (one pass over its stream): balances the workers."""

    def describe(self) -> dict[str, Any]:
        """What a run records of the world (JSON): e.g. class names, input shape, scaling."""
        return {"world": self.name}

    def poisoned(self) -> tuple[int, ...]:
        """Niches the world knows it poisoned (for records only; never for decisions)."""
        return ()

    # -- models and learning ---------------------------------------------------------------
    @abstractmethod
    def build_model(self, seed: int = 0) -> nn.Module:
        """A freshly initialised model; the same ``seed`` gives the same weights."""

    @abstractmethod
    def learner_spec(self) -> Any:
        """A picklable spec the pool ships to its workers; each builds its learner from it
        (:func:`forkpop.workers.learner.build_learner`: ``spec.learner`` names it), which forks
        and learns online — the learning step's objective lives there, next to the data it reads."""

    # -- fitness and outputs ---------------------------------------------------------------
    @abstractmethod
    def inputs(self, split: str) -> torch.Tensor:
        """The inputs of ``split`` (``probe``, ``transfer`` or ``test``): ``(m, ...)``."""

    @abstractmethod
    def predict(self, model: nn.Module, weights: torch.Tensor, x: torch.Tensor, with_hidden: bool = False) -> Any:
        """Each row of ``weights`` ``(n, n_params)``'s output distribution on ``x``:
        ``(n, m, C)`` probabilities, and with ``with_hidden`` each one's last hidden
        representation ``(m, d)`` (for representation diversity)."""

    @abstractmethod
    def fitness(self, model: nn.Module, weights: torch.Tensor, split: str = "probe") -> float:
        """One weight vector's fitness on ``split`` (higher is better)."""

    def fitness_of(self, probs: torch.Tensor, split: str = "probe") -> torch.Tensor:
        """Fitness of each variant ``(n,)`` from its predictions ``(n, m, C)`` on ``split``."""
        raise NotImplementedError

    def acceptance_scores(self, model: nn.Module, weights: torch.Tensor) -> torch.Tensor | None:
        """Per-sample scores ``(m,)`` (higher is better) of one weight vector on the split that
        decides whether a student replaces a seed: the ``accept`` split where the world holds
        one, never the split fitness and early stopping read. Elitism compares a student with
        its seed sample by sample (a paired test). None: the world has none, and elitism
        compares probe fitness."""
        return None

    # -- generated inputs (optional) --------------------------------------------------------
    def generate(
        self, kind: str, real: torch.Tensor, n: int, generator: torch.Generator, **options: Any
    ) -> torch.Tensor:
        """``n`` inputs the population makes itself from ``real`` ones (model-collapse study)."""
        raise NotImplementedError(f"world {self.name!r} generates no inputs (distill.generated.kind={kind!r})")

    def measure(self, result: Any) -> dict[str, Any]:
        """The world's own figures for a generation's result (``{"world": {name: value}}``),
        recorded with the generation (the text world: bits per byte, collapse measures)."""
        return {}

    # -- labels (optional: worlds with labelled niches) -------------------------------------
    def labels(self, split: str) -> torch.Tensor | None:
        """The labels of ``split`` where the world has them (``transfer``: the niches' labels as
        given, ``probe``: the validation labels); None where it has none (text, a budget)."""
        return None

    def niche_rows(self, niche: int) -> Any:
        """Rows of the ``transfer`` inputs that niche ``niche`` holds, in stream order."""
        raise NotImplementedError
