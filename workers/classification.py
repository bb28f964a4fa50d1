"""The classification world: feature vectors (digits, users' files) and cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
from forkpop.population.models import accuracy, load_flat_weights, predict_many
from forkpop.population.world import World
from forkpop.workers.data import DataBundle, trigger
from forkpop.workers.learner import LearnerSpec
from torch import nn


class ClassificationWorld(World):
    """Labelled feature vectors cut into niches; variants learn with cross-entropy (the
    learner and batched engine of :mod:`forkpop.workers.learner`), fitness is accuracy on the
    validation split (``probe``), distillation uses every niche's inputs (``transfer``) and
    elitism the acceptance split (``accept``, where ``data.accept_fraction`` > 0).

    ``bundle`` is the loaded data (:func:`forkpop.workers.data.load_data`), ``spec`` what the
    workers rebuild it and the model from.
    """

    name = "classification"

    def __init__(self, bundle: DataBundle, spec: LearnerSpec):
        self.data = bundle
        self.spec = spec
        self._x = {
            "probe": torch.from_numpy(bundle.x_val),
            "transfer": torch.from_numpy(bundle.x_pool),
            "test": torch.from_numpy(bundle.x_test),
        }
        self._y = {
            "probe": torch.from_numpy(bundle.y_val),
            "transfer": torch.from_numpy(bundle.y_pool),
            "test": torch.from_numpy(bundle.y_test),
        }
        if bundle.x_accept is not None:
            self._x["accept"] = torch.from_numpy(bundle.x_accept)
            self._y["accept"] = torch.from_numpy(bundle.y_accept)

    # -- data -------------------------------------------------------------------------------
    @property
    def n_niches(self) -> int:
        return len(self.data.niches)

    @property
    def n_classes(self) -> int:
        return self.data.n_classes

    def niche_size(self, niche: int) -> int:
        return len(self.data.niches[niche])

    def niche_rows(self, niche: int) -> np.ndarray:
        return self.data.niches[niche]

    def describe(self) -> dict:
        """The world, the data's source, class names (index order), input shape and scaling."""
        return {"world": self.name, "source": self.spec.data.source, "n_niches": self.n_niches, **self.data.record()}

    def poisoned(self) -> tuple[int, ...]:
        return tuple(self.data.poisoned)

    # -- models -----------------------------------------------------------------------------
    def build_model(self, seed: int = 0) -> nn.Module:
        d = self.data
        return self.spec.model.build(d.n_features, d.n_classes, seed, input_shape=d.input_shape)

    def learner_spec(self) -> LearnerSpec:
        return self.spec

    # -- fitness and outputs ----------------------------------------------------------------
    def inputs(self, split: str) -> torch.Tensor:
        return self._x[split]

    def labels(self, split: str) -> torch.Tensor:
        return self._y[split]

    def predict(
        self, model: nn.Module, weights: torch.Tensor, x: torch.Tensor, with_hidden: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return predict_many(model, weights, x, with_hidden=with_hidden)

    def fitness(self, model: nn.Module, weights: torch.Tensor, split: str = "probe") -> float:
        """Accuracy on ``split``."""
        return accuracy(load_flat_weights(model, weights), self._x[split], self._y[split])

    def acceptance_scores(self, model: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        """The log-probability of the true label of each ``accept`` input (the probe split's when
        ``data.accept_fraction`` is 0), floored at log(1e-4): a proper score, so a paired test
        resolves gains that 0/1 accuracy on a hundred samples cannot."""
        split = "accept" if "accept" in self._x else "probe"
        probs, _ = self.predict(model, weights[None], self._x[split])
        p = probs[0].gather(1, self._y[split][:, None])[:, 0].double()
        return p.clamp_min(1e-4).log()

    def fitness_of(self, probs: torch.Tensor, split: str = "probe") -> torch.Tensor:
        """Accuracy of each row of ``probs`` ``(n, m, C)`` on ``split``: ``(n,)``."""
        return (probs.argmax(-1) == self._y[split]).float().mean(-1)

    def generate(self, kind: str, real: torch.Tensor, n: int, generator: torch.Generator, **options) -> torch.Tensor:  # noqa: ANN003
        """``mixup``: convex blends of two real inputs; ``noise``: real inputs plus Gaussian
        noise of ``noise_std``."""
        a = real[torch.randint(len(real), (n,), generator=generator)]
        if kind == "mixup":
            b = real[torch.randint(len(real), (n,), generator=generator)]
            lam = torch.rand(n, 1, generator=generator)
            return lam * a + (1 - lam) * b
        if kind == "noise":
            return a + float(options.get("noise_std", 0.1)) * torch.randn(a.shape, generator=generator)
        raise ValueError(f"unknown distill.generated.kind {kind!r}; use mixup or noise")

    # -- reports ----------------------------------------------------------------------------
    def backdoor_success(self, model: nn.Module, weights: torch.Tensor, target: int) -> float:
        """Share of test inputs of other classes that the backdoor trigger sends to ``target``."""
        x_test, y_test = self._x["test"], self._y["test"]
        keep = y_test != target
        x = torch.from_numpy(trigger(x_test[keep].numpy()))
        load_flat_weights(model, weights)
        model.eval()
        with torch.no_grad():
            return float((model(x).argmax(1) == target).float().mean())
