"""Model families built from a config, and flat-vector views of their weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn


def mlp(in_dim: int, n_classes: int, hidden: Sequence[int] = (128,)) -> nn.Module:
    """Fully connected ReLU network: ``(batch, in_dim) -> (batch, n_classes)``."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, n_classes))
    return nn.Sequential(*layers)


def linear(in_dim: int, n_classes: int, hidden: Sequence[int] = ()) -> nn.Module:
    """Softmax regression: ``(batch, in_dim) -> (batch, n_classes)``."""
    return nn.Linear(in_dim, n_classes)


class SmallCNN(nn.Module):
    """Two conv layers for square single-channel images given flat: ``(batch, side*side)``."""

    def __init__(self, in_dim: int, n_classes: int, hidden: Sequence[int] = (16, 32)) -> None:
        super().__init__()
        side = int(round(in_dim**0.5))
        if side * side != in_dim:
            raise ValueError(f"family cnn needs square images; {in_dim} inputs is not a square")
        c1, c2 = (tuple(hidden) + (16, 32))[:2]
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(c2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x.view(-1, 1, self.side, self.side))
        return self.head(h.mean(dim=(2, 3)))


MODEL_FAMILIES: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "linear": linear, "cnn": SmallCNN}


def build_model(family: str, in_dim: int, n_classes: int, hidden: Sequence[int] = (128,), seed: int = 0) -> nn.Module:
    """A freshly initialised model of ``family``; the same seed gives the same weights."""
    if family not in MODEL_FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(MODEL_FAMILIES)}")
    # Initialise under a private generator so the global torch RNG is never consumed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODEL_FAMILIES[family](in_dim, n_classes, hidden)


def flat_weights(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached vector, shape ``(n_params,)``."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of rows of ``x`` ``(n, n_features)`` whose argmax prediction equals ``y`` ``(n,)``."""
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def class_rates(pred: np.ndarray, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the share of samples of that class predicted as it (recall) and of
    predictions of it that are right (precision); NaN where a class has none. ``(n_classes,)`` each."""
    hit = (pred == y).astype(np.float64)
    right = np.bincount(y, weights=hit, minlength=n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return right / np.bincount(y, minlength=n_classes), right / np.bincount(pred, minlength=n_classes)


def load_flat_weights(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    """Copy a vector from :func:`flat_weights` into ``model`` in place."""
    torch.nn.utils.vector_to_parameters(flat.to(next(model.parameters()).dtype), model.parameters())
    return model


def hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's last hidden representation of ``x`` (the input to its output layer)."""
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return model[:-1](x)
    if isinstance(model, SmallCNN):
        return model.features(x.view(-1, 1, model.side, model.side)).mean(dim=(2, 3))
    return x


@torch.no_grad()
def predict_many(
    model: nn.Module, weights: torch.Tensor, x: torch.Tensor, with_hidden: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Softmax predictions of every row of ``weights`` ``(n, n_params)`` on ``x`` ``(m, D)``.

    Returns probabilities ``(n, m, C)`` and, with ``with_hidden``, each variant's hidden
    representation ``(m, d)`` (see :func:`hidden`).
    """
    model.eval()
    probs, hid = [], []
    for w in weights:
        load_flat_weights(model, w)
        if with_hidden:
            h = hidden(model, x)
            hid.append(h)
            out = model[-1](h) if isinstance(model, nn.Sequential) and len(model) > 1 else model(x)
        else:
            out = model(x)
        probs.append(torch.softmax(out, -1))
    return (torch.stack(probs) if probs else torch.empty(0, len(x), 0)), hid
