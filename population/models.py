"""Model families built from a config, and flat-vector views of their weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from forkpop import plugins


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
    """Two conv layers for images given flat, ``(batch, C*H*W)``, viewed as ``input_shape``
    ``(C, H, W)`` (``(H, W)``: one channel). Without one (or given a flat ``(in_dim,)``), the
    images are taken as square and single-channel: ``(1, side, side)``."""

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden: Sequence[int] = (16, 32),
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in input_shape) if input_shape is not None else ()
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) == 3:
            if int(np.prod(shape)) != in_dim:
                raise ValueError(f"family cnn: input_shape {shape} holds {int(np.prod(shape))} values, not {in_dim}")
        elif len(shape) <= 1:
            side = int(round(in_dim**0.5))
            if side * side != in_dim:
                raise ValueError(
                    f"family cnn needs images: {in_dim} inputs is not a square; give inputs shaped (N, C, H, W)"
                )
            shape = (1, side, side)
        else:
            raise ValueError(f"family cnn needs input_shape (C, H, W) or (H, W), not {shape}")
        c1, c2 = (tuple(hidden) + (16, 32))[:2]
        self.input_shape = shape
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(c2, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled conv features of flat ``x``: ``(batch, c2)`` (the head's input)."""
        return self.features(x.reshape(-1, *self.input_shape)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


# The model registry of forkpop.plugins (a live dict: adding a name registers a family).
MODEL_FAMILIES: dict[str, Callable[..., nn.Module]] = plugins.registry("models")
MODEL_FAMILIES.update({"mlp": mlp, "linear": linear, "cnn": SmallCNN})


def build_model(
    family: str,
    in_dim: int,
    n_classes: int,
    hidden: Sequence[int] = (128,),
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    **kw: Any,
) -> nn.Module:
    """A freshly initialised model of ``family``; the same seed gives the same weights.

    ``family`` is a registered name (``mlp``, ``linear``, ``cnn``, or one added with
    ``forkpop.plugins.register("models", ...)``), an import path ``package.module:attr`` or an
    entry point of group ``forkpop.models``. Its factory is called as
    ``factory(in_dim, n_classes, hidden=hidden, **options)`` (``kw`` are more options); a
    factory that takes no ``hidden`` is not given it. Errors are one-line
    :class:`~forkpop.plugins.PluginError` naming ``model.family``.
    """
    factory = plugins.resolve("models", family, "model.family")
    opts = {**(options or {}), **kw}
    name = getattr(factory, "__qualname__", None) or type(factory).__name__
    refused = sorted(k for k in opts if not plugins.accepts(factory, k))
    if refused:
        raise plugins.PluginError(
            f"model.family={family!r}: {name} takes no keyword arguments {refused}; remove them from model.options"
        )
    if plugins.accepts(factory, "hidden") and "hidden" not in opts:
        opts["hidden"] = tuple(hidden)
    # Initialise under a private generator so the global torch RNG is never consumed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(in_dim, n_classes, **opts)  # every option is one it takes (checked above)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise plugins.PluginError(
                f"model.family={family!r}: {name}({in_dim}, {n_classes}, ...) raised {type(e).__name__}"
                + (f": {msg}" if msg else "")
            ) from None
    if not isinstance(model, nn.Module):
        raise plugins.PluginError(
            f"model.family={family!r}: {name} returned a {type(model).__name__}, not a torch.nn.Module; "
            "return the model"
        )
    if next(model.parameters(), None) is None:
        raise plugins.PluginError(f"model.family={family!r}: {name} returned a model without parameters")
    return model


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
    """Copy a vector from :func:`flat_weights` into ``model`` in place (copied: the model's
    parameters never share memory with ``flat``, which its training would otherwise change)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"weights have {flat.numel()} values but the model has {total}")
    with torch.no_grad():
        off = 0
        for p in params:
            p.copy_(flat[off : off + p.numel()].view_as(p))
            off += p.numel()
    return model


def hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's last hidden representation of ``x`` (the input to its output layer)."""
    if isinstance(model, nn.Sequential) and len(model) > 1:
        return model[:-1](x)
    if isinstance(model, SmallCNN):
        return model.embed(x)
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


_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Identity)


def linear_chain(model: nn.Module) -> list[nn.Module] | None:
    """The model as a list of Linear / activation layers, or None if it is not such a chain."""
    layers = list(model) if isinstance(model, nn.Sequential) else [model]
    out: list[nn.Module] = []
    for m in layers:
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1 and not out:
            continue  # the engine's inputs are already flat feature vectors
        if isinstance(m, nn.Dropout) and m.p == 0:
            continue
        if not isinstance(m, (nn.Linear, *_ACTIVATIONS)) or (not out and not isinstance(m, nn.Linear)):
            return None
        out.append(m)
    return out or None
