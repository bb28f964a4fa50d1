"""A byte-level causal transformer, and a population engine that trains many variants of it as one step.

:class:`ByteLM` is a small pre-norm GPT over bytes (vocabulary 256) with tied input/output
embeddings: the reference single model, trained with ``torch.optim.AdamW`` like any module.

:class:`PopulationLM` holds ``P`` variants of one :class:`LMConfig` as a single ``(P, n)``
weight tensor (one row per variant, laid out exactly as
``parameters_to_vector(ByteLM(cfg).parameters())``) and trains all of them in one step:

- the forward runs every linear layer as one batched matrix product over the population
  (``baddbmm`` of ``(P, B*T, D)`` by ``(P, D, 3D)`` and so on), and attention as one call of
  ``F.scaled_dot_product_attention`` over the folded ``(P*B, H, T, d)`` tensors, so the cost of a
  step is a handful of large kernels whatever ``P`` is: no Python loop over variants;
- the backward is plain autograd; the gradients are gathered into one ``(P, n)`` tensor;
- AdamW (per-variant learning rate, weight decay and bias correction), per-variant global-norm
  clipping and freezing of diverged or masked variants are a handful of in-place ops on the
  ``(P, n)`` weight, gradient and moment tensors, with per-variant coefficients ``(P, 1)``.

Weight decay is decoupled (AdamW) and applies to the 2-D parameters only: both embeddings and
the four matrices of every block; biases and LayerNorm parameters are not decayed.

All tensors a :class:`PopulationLM` returns live on its device (no host synchronisation in
:meth:`PopulationLM.step`), except :meth:`PopulationLM.flat`, which is a CPU float32 copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN2 = math.log(2.0)

# A per-position loss above this many times max(first loss, ln vocab) means the variant has
# exploded, even while it is still finite (a learning rate far too large).
EXPLODED = 100.0


@dataclass(frozen=True)
class LMConfig:
    """Shape of a :class:`ByteLM`: layers, heads, width, context length, vocabulary, MLP width ratio."""

    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    context: int = 64
    vocab: int = 256
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_head={self.n_head}")
        if min(self.n_layer, self.n_head, self.d_model, self.context, self.vocab, self.mlp_ratio) < 1:
            raise ValueError(f"every LMConfig field must be >= 1: {self}")


# -- the single model ------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, h)
        self.out = nn.Linear(h, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class ByteLM(nn.Module):
    """Pre-norm GPT over bytes with tied embeddings.

    Parameters, in ``parameters()`` order: ``tok_emb (V, D)``, ``pos_emb (T, D)``; per block
    ``ln1`` (weight, bias), ``qkv`` ``Linear(D, 3D)``, ``proj`` ``Linear(D, D)``, ``ln2``,
    ``fc`` ``Linear(D, mlp_ratio*D)``, ``out`` ``Linear(mlp_ratio*D, D)`` (all with biases);
    ``ln_f``. GELU is the tanh approximation; ``logits = ln_f(h) @ tok_emb.T``.

    The initialisation is deterministic in ``seed`` (its own ``torch.Generator``): GPT-2 style,
    normal with std 0.02, the residual projections (``proj``, ``out``) with
    ``0.02 / sqrt(2 * n_layer)``, biases 0, LayerNorm weights 1.
    """

    def __init__(self, cfg: LMConfig = LMConfig(), seed: int = 0) -> None:  # noqa: B008 (frozen dataclass)
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Parameter(torch.empty(cfg.vocab, cfg.d_model))
        self.pos_emb = nn.Parameter(torch.empty(cfg.context, cfg.d_model))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init(seed)

    @torch.no_grad()
    def _init(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(int(seed))
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = resid_std if name.endswith(("proj.weight", "out.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, V)`` of the next byte at every position of ``tokens (B, T)``, ``T <= context``."""
        t = tokens.shape[1]
        if t > self.cfg.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({self.cfg.context})")
        x = F.embedding(tokens, self.tok_emb) + self.pos_emb[:t]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok_emb.T


# -- the flat layout -------------------------------------------------------------------------------


def param_shapes(cfg: LMConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, shape)`` of every parameter in ``ByteLM(cfg).parameters()`` order (the flat layout)."""
    d, h = cfg.d_model, cfg.mlp_ratio * cfg.d_model
    out: list[tuple[str, tuple[int, ...]]] = [("tok_emb", (cfg.vocab, d)), ("pos_emb", (cfg.context, d))]
    for i in range(cfg.n_layer):
        b = f"blocks.{i}."
        out += [
            (b + "ln1.weight", (d,)),
            (b + "ln1.bias", (d,)),
            (b + "qkv.weight", (3 * d, d)),
            (b + "qkv.bias", (3 * d,)),
            (b + "proj.weight", (d, d)),
            (b + "proj.bias", (d,)),
            (b + "ln2.weight", (d,)),
            (b + "ln2.bias", (d,)),
            (b + "fc.weight", (h, d)),
            (b + "fc.bias", (h,)),
            (b + "out.weight", (d, h)),
            (b + "out.bias", (d,)),
        ]
    return out + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def n_params(cfg: LMConfig) -> int:
    """Number of parameters of one variant (the length of a flat row)."""
    return sum(math.prod(s) for _, s in param_shapes(cfg))


def _offsets(cfg: LMConfig) -> list[tuple[str, tuple[int, ...], int, int]]:
    out, a = [], 0
    for name, shape in param_shapes(cfg):
        b = a + math.prod(shape)
        out.append((name, shape, a, b))
        a = b
    return out


def unflatten(flat: Tensor, cfg: LMConfig) -> dict[str, Tensor]:
    """Views ``(P, *shape)`` of every parameter into ``flat (P, n)`` (writing a view writes ``flat``)."""
    if flat.dim() != 2 or flat.shape[1] != n_params(cfg):
        raise ValueError(f"flat must be (P, {n_params(cfg)}), got {tuple(flat.shape)}")
    p = flat.shape[0]
    return {name: flat[:, a:b].view(p, *shape) for name, shape, a, b in _offsets(cfg)}


def flatten(params: dict[str, Tensor], cfg: LMConfig) -> Tensor:
    """The ``(P, n)`` flat tensor of a dict of ``(P, *shape)`` parameters (a new tensor)."""
    rows = [params[name].reshape(params[name].shape[0], -1) for name, _ in param_shapes(cfg)]
    return torch.cat(rows, dim=1)


def init_flat(cfg: LMConfig, seeds: Sequence[int]) -> Tensor:
    """``(len(seeds), n)``: the flat weights of ``ByteLM(cfg, seed)`` for every seed."""
    vec = nn.utils.parameters_to_vector
    return torch.stack([vec(ByteLM(cfg, int(s)).parameters()).detach() for s in seeds])


def bits_per_byte(nll: Tensor) -> Tensor:
    """Mean bits per byte ``(P,)`` of a per-position negative log-likelihood in nats ``(P, m, T)``."""
    return nll.mean(-1).mean(-1) / LN2


def _per_variant(x: Tensor | Sequence[float] | float, p: int, device: torch.device, what: str) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).to(device)
    if t.dim() == 0:
        t = t.expand(p)
    if t.shape != (p,):
        raise ValueError(f"{what} must be a float or have shape ({p},), got {tuple(t.shape)}")
    return t.clone()


# -- the population --------------------------------------------------------------------------------


class PopulationLM:
    """``P`` variants of one :class:`LMConfig` trained as one stacked step.

    The weights are one ``(P, n)`` tensor; every parameter is a view ``(P, *shape)`` into it.
    Linear layers run as batched matrix products over the population and attention as one
    ``scaled_dot_product_attention`` over the folded ``(P*B, H, T, d)`` tensors; no Python
    loop over variants anywhere. Every variant has its own AdamW state (moments, step count,
    learning rate, weight decay, clipping norm).

    ``lr``, ``weight_decay`` and ``clip`` are ``(P,)`` float64 tensors on the device, read at
    every step (change them in place for a schedule); ``clip = 0`` turns clipping off for that
    variant. ``diverged (P,)`` is sticky: a variant whose loss or gradient norm became
    non-finite, or whose loss exploded (above ``explode * max(first loss, ln vocab)``; pass
    ``explode=0`` to only catch non-finite values) is frozen from that step on.
    """

    def __init__(
        self,
        cfg: LMConfig,
        flat: Tensor,
        *,
        lr: Tensor | Sequence[float] | float,
        weight_decay: Tensor | Sequence[float] | float = 0.0,
        clip: Tensor | Sequence[float] | float = 1.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        explode: float = EXPLODED,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        n = n_params(cfg)
        if flat.dim() != 2 or flat.shape[1] != n:
            raise ValueError(f"flat must be (P, {n}), got {tuple(flat.shape)}")
        self.P = int(flat.shape[0])
        self.w = flat.detach().to(self.device, dtype, copy=True).contiguous()
        self.m = torch.zeros_like(self.w)
        self.v = torch.zeros_like(self.w)
        # Persistent (P, n) work buffers for the gradient and the Adam step: large temporaries
        # allocated afresh every step cost page faults on a CPU.
        self._g = torch.empty_like(self.w)
        self._denom = torch.empty_like(self.w)
        self.t = torch.zeros(self.P, dtype=torch.float64, device=self.device)  # Adam steps taken, per variant
        self.lr = _per_variant(lr, self.P, self.device, "lr")
        self.weight_decay = _per_variant(weight_decay, self.P, self.device, "weight_decay")
        self.clip = _per_variant(clip, self.P, self.device, "clip")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.explode = float(explode)
        self.diverged = torch.zeros(self.P, dtype=torch.bool, device=self.device)
        self._first_loss = torch.full((self.P,), float("nan"), dtype=torch.float64, device=self.device)
        self._offsets = _offsets(cfg)
        self._views = unflatten(self.w, cfg)
        # Column ranges of the weight-decayed (2-D) parameters, adjacent ones merged.
        ranges: list[list[int]] = []
        for _, shape, a, b in self._offsets:
            if len(shape) >= 2:
                if ranges and ranges[-1][1] == a:
                    ranges[-1][1] = b
                else:
                    ranges.append([a, b])
        self._decay_ranges = [(a, b) for a, b in ranges]

    # -- forward -----------------------------------------------------------------------------------

    def _forward(self, params: dict[str, Tensor], tokens: Tensor, caches: list | None = None) -> Tensor:
        """Logits ``(P, B, T, V)``; with ``caches`` (an empty list) the keys/values of every layer are appended."""
        cfg = self.cfg
        p, b, t = tokens.shape
        d = cfg.d_model
        if t > cfg.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context ({cfg.context})")
        tok_emb = params["tok_emb"]
        offs = torch.arange(p, device=tokens.device).view(p, 1, 1) * cfg.vocab
        x = F.embedding(tokens + offs, tok_emb.reshape(p * cfg.vocab, d)) + params["pos_emb"][:, None, :t]
        x = x.view(p, b * t, d)
        for i in range(cfg.n_layer):
            pre = f"blocks.{i}."
            x = x + self._attention(params, pre, x, b, t, caches)
            h = _layer_norm(x, params[pre + "ln2.weight"], params[pre + "ln2.bias"])
            h = F.gelu(_linear(h, params[pre + "fc.weight"], params[pre + "fc.bias"]), approximate="tanh")
            x = x + _linear(h, params[pre + "out.weight"], params[pre + "out.bias"])
        x = _layer_norm(x, params["ln_f.weight"], params["ln_f.bias"])
        return torch.bmm(x, tok_emb.transpose(1, 2)).view(p, b, t, cfg.vocab)

    def _attention(self, params: dict[str, Tensor], pre: str, x: Tensor, b: int, t: int, caches: list | None) -> Tensor:
        p, _, d = x.shape
        nh = self.cfg.n_head
        h = _layer_norm(x, params[pre + "ln1.weight"], params[pre + "ln1.bias"])
        qkv = _linear(h, params[pre + "qkv.weight"], params[pre + "qkv.bias"])
        q, k, v = qkv.view(p * b, t, 3, nh, d // nh).permute(2, 0, 3, 1, 4)  # each (P*B, H, T, d)
        if caches is not None:
            caches.append((k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(p, b * t, d)
        return _linear(y, params[pre + "proj.weight"], params[pre + "proj.bias"])

    def _tokens(self, tokens: Tensor) -> Tensor:
        tokens = tokens.to(self.device, torch.long)
        if tokens.dim() == 2:  # the same sequences for every variant
            tokens = tokens.unsqueeze(0).expand(self.P, *tokens.shape)
        if tokens.dim() != 3 or tokens.shape[0] != self.P:
            raise ValueError(f"tokens must be (P={self.P}, B, T), got {tuple(tokens.shape)}")
        return tokens

    def params(self) -> dict[str, Tensor]:
        """The current weights as views ``(P, *shape)`` into the engine's ``(P, n)`` tensor (no copy)."""
        return self._views

    def logits(self, tokens: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """Logits ``(P, B, T, V)`` of ``tokens (P, B, T)`` (or ``(B, T)``, the same for every variant).

        With ``params=None`` the current weights, without autograd; with a dict of ``(P, *shape)``
        tensors those, and gradients flow into them.
        """
        tokens = self._tokens(tokens)
        if params is not None:
            return self._forward(params, tokens)
        with torch.no_grad():
            return self._forward(self._views, tokens)

    # -- training ----------------------------------------------------------------------------------

    def _losses(self, params: dict[str, Tensor], tokens: Tensor, soft: Tensor | None, temperature: float) -> Tensor:
        x, y = tokens[:, :, :-1], tokens[:, :, 1:]
        logits = self._forward(params, x)
        p, b, t, v = logits.shape
        if soft is None:
            ce = F.cross_entropy(logits.reshape(-1, v), y.reshape(-1), reduction="none")
            return ce.view(p, b * t).mean(1)
        soft = soft.to(self.device, logits.dtype)
        if soft.shape != logits.shape:
            raise ValueError(f"soft must be {tuple(logits.shape)}, got {tuple(soft.shape)}")
        logq = F.log_softmax(logits / temperature, dim=-1)
        kl = F.kl_div(logq, soft, reduction="none").sum(-1)  # KL(soft || q) per position
        return kl.view(p, b * t).mean(1) * (temperature * temperature)

    def step(
        self, tokens: Tensor, soft: Tensor | None = None, temperature: float = 1.0, mask: Tensor | None = None
    ) -> Tensor:
        """One AdamW step of every variant on its own windows ``tokens (P, B, T+1)``.

        The loss of a variant is the mean next-byte cross entropy (nats) of ``tokens[:, :, 1:]``
        given ``tokens[:, :, :-1]``; with ``soft (P, B, T, V)`` (a teacher's probabilities of the
        ``T`` next bytes) it is ``KL(soft || softmax(logits / temperature)) * temperature**2``,
        mean over positions. Every variant's gradient is that of its own loss; it is clipped to
        the variant's global norm ``clip``, then AdamW updates the variant with its own learning
        rate, weight decay and bias correction. ``mask[p] = False`` skips variant ``p`` this
        step (weights and Adam state untouched), as does :attr:`diverged`.

        Returns the per-variant losses ``(P,)`` before the update (detached, float32, on the device).
        """
        tokens = self._tokens(tokens)
        if tokens.shape[2] < 2:
            raise ValueError("tokens must hold at least 2 bytes per window (T+1 >= 2)")
        leaves = [view.detach().requires_grad_() for view in self._views.values()]
        params = dict(zip(self._views, leaves, strict=True))
        with torch.enable_grad():
            losses = self._losses(params, tokens, soft, temperature)
            grads = torch.autograd.grad(losses.sum(), leaves)
        g = torch.cat([gr.reshape(self.P, -1) for gr in grads], dim=1, out=self._g)
        with torch.no_grad():
            self._update(losses.detach(), g, mask)
        return losses.detach().float()

    @torch.no_grad()
    def _update(self, losses: Tensor, g: Tensor, mask: Tensor | None) -> None:
        b1, b2 = self.betas
        lo = losses.double()
        gnorm = torch.linalg.vector_norm(g, dim=1).double()
        first = torch.where(torch.isnan(self._first_loss), lo, self._first_loss)
        self._first_loss = first
        bad = ~torch.isfinite(lo) | ~torch.isfinite(gnorm)
        if self.explode > 0:
            bad |= lo > self.explode * first.clamp(min=math.log(self.cfg.vocab))
        self.diverged |= bad
        active = ~self.diverged
        if mask is not None:
            active &= mask.to(self.device, torch.bool)
        act = active.double()

        # Per-variant clipping (as clip_grad_norm_: max_norm / (norm + 1e-6), at most 1), frozen rows zeroed.
        coef = torch.where(self.clip > 0, (self.clip / (gnorm + 1e-6)).clamp(max=1.0), torch.ones_like(gnorm))
        g.mul_(coef.to(g.dtype)[:, None])
        if self.device.type != "cpu" or not bool(active.all()):  # no host sync on a GPU
            g.masked_fill_(~active[:, None], 0.0)  # NaN * 0 is NaN: a frozen row's gradient must be exactly 0

        self.t += act
        t = self.t.clamp(min=1.0)
        col = lambda x: x.to(self.dtype)[:, None]  # noqa: E731 (per-variant coefficient (P, 1))

        if self.device.type != "cpu" or bool((self.weight_decay != 0).any()):  # no host sync on a GPU
            decay = col(1.0 - self.lr * self.weight_decay * act)
            for a, b in self._decay_ranges:
                self.w[:, a:b].mul_(decay)
        self.m.lerp_(g, col((1.0 - b1) * act))
        self.v.mul_(col(torch.where(active, b2, 1.0))).addcmul_(g, g, value=1.0 - b2)
        bc1 = 1.0 - torch.pow(b1, t)
        bc2 = 1.0 - torch.pow(b2, t)
        denom = torch.sqrt(self.v, out=self._denom).mul_(col(1.0 / bc2.sqrt())).add_(self.eps)
        torch.div(self.m, denom, out=denom)
        self.w.addcmul_(denom, col(-self.lr * act / bc1))

    # -- evaluation --------------------------------------------------------------------------------

    def flat(self) -> Tensor:
        """The current weights ``(P, n)``: a detached CPU float32 copy."""
        return self.w.detach().to("cpu", torch.float32, copy=True)

    @torch.no_grad()
    def nll(self, windows: Tensor, batch: int = 64) -> Tensor:
        """Every variant's next-byte negative log-likelihood (nats) ``(P, m, T)`` on the same ``windows (m, T+1)``.

        Bits per byte: :func:`bits_per_byte` of the result (``nll.mean() / ln 2`` per variant).
        """
        windows = windows.to(self.device, torch.long)
        m, t1 = windows.shape
        out = torch.empty(self.P, m, t1 - 1, dtype=torch.float32, device=self.device)
        for i in range(0, m, batch):
            w = windows[i : i + batch]
            x, y = w[:, :-1].expand(self.P, *w[:, :-1].shape), w[:, 1:].expand(self.P, *w[:, 1:].shape)
            logits = self._forward(self._views, x)
            ce = F.cross_entropy(logits.reshape(-1, self.cfg.vocab), y.reshape(-1), reduction="none")
            out[:, i : i + len(w)] = ce.view(self.P, len(w), t1 - 1).float()
        return out

    @torch.no_grad()
    def generate(
        self, prompts: Tensor, n_new: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`sample`, returning also the logits ``(P, B, n_new, V)`` each new byte was drawn from."""
        cfg, p = self.cfg, self.P
        prompts = self._tokens(prompts)
        _, b, t0 = prompts.shape
        if t0 < 1:
            raise ValueError("prompts must hold at least one byte")
        d, nh, ctx = cfg.d_model, cfg.n_head, cfg.context
        hd = d // nh
        params = self._views
        seq = prompts[:, :, -ctx:]
        kc = torch.empty(cfg.n_layer, p * b, nh, ctx, hd, dtype=self.dtype, device=self.device)
        vc = torch.empty_like(kc)
        toks = torch.empty(p, b, n_new, dtype=torch.long, device=self.device)
        all_logits = torch.empty(p, b, n_new, cfg.vocab, dtype=torch.float32, device=self.device)
        filled = 0  # cached positions
        last = None  # the newest token, not yet in the cache
        for j in range(n_new):
            if last is None or filled >= ctx:
                # (Re)fill the cache with the whole window: the last `ctx` tokens at positions 0..ctx-1.
                caches: list = []
                logits = self._forward(params, seq, caches)[:, :, -1]
                filled = seq.shape[2]
                for i, (k, v) in enumerate(caches):
                    kc[i, :, :, :filled] = k
                    vc[i, :, :, :filled] = v
            else:
                logits = self._decode_one(params, last, filled, kc, vc)
                filled += 1
            all_logits[:, :, j] = logits.float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float().reshape(p * b, -1) / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).view(p, b)
            toks[:, :, j] = nxt
            last = nxt
            seq = torch.cat([seq, nxt[:, :, None]], dim=2)[:, :, -ctx:]
        return toks, all_logits

    def _decode_one(self, params: dict[str, Tensor], tok: Tensor, pos: int, kc: Tensor, vc: Tensor) -> Tensor:
        """Logits ``(P, B, V)`` after one new token ``tok (P, B)`` at position ``pos``, appended to the cache."""
        cfg = self.cfg
        p, b = tok.shape
        d, nh = cfg.d_model, cfg.n_head
        offs = torch.arange(p, device=tok.device).view(p, 1) * cfg.vocab
        tok_emb = params["tok_emb"]
        x = F.embedding(tok + offs, tok_emb.reshape(p * cfg.vocab, d)) + params["pos_emb"][:, None, pos]
        x = x.view(p, b, d)
        for i in range(cfg.n_layer):
            pre = f"blocks.{i}."
            h = _layer_norm(x, params[pre + "ln1.weight"], params[pre + "ln1.bias"])
            qkv = _linear(h, params[pre + "qkv.weight"], params[pre + "qkv.bias"])
            q, k, v = qkv.view(p * b, 1, 3, nh, d // nh).permute(2, 0, 3, 1, 4)  # each (P*B, H, 1, d)
            kc[i, :, :, pos : pos + 1] = k
            vc[i, :, :, pos : pos + 1] = v
            y = F.scaled_dot_product_attention(q, kc[i, :, :, : pos + 1], vc[i, :, :, : pos + 1])
            x = x + _linear(y.reshape(p, b, d), params[pre + "proj.weight"], params[pre + "proj.bias"])
            h = _layer_norm(x, params[pre + "ln2.weight"], params[pre + "ln2.bias"])
            h = F.gelu(_linear(h, params[pre + "fc.weight"], params[pre + "fc.bias"]), approximate="tanh")
            x = x + _linear(h, params[pre + "out.weight"], params[pre + "out.bias"])
        x = _layer_norm(x, params["ln_f.weight"], params["ln_f.bias"])
        return torch.bmm(x, tok_emb.transpose(1, 2))

    def sample(
        self, prompts: Tensor, n_new: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n_new`` bytes ``(P, B, n_new)`` drawn after ``prompts (P, B, t0)`` (or ``(B, t0)``), with a KV cache.

        ``temperature = 0`` is greedy. The draws are ``torch.multinomial`` with ``generator``, so
        the same generator state gives the same bytes. Beyond the context the model sees the
        last ``context`` bytes (a sliding window; the cache is recomputed over it at every step).
        """
        return self.generate(prompts, n_new, temperature, generator)[0]

    def flops_per_token(self) -> float:
        """Training FLOPs per token of one variant, forward and backward.

        ``6 * N_matmul + 12 * n_layer * context * d_model``, where ``N_matmul`` counts the weights
        used in matrix products (per block ``(4 + 2 * mlp_ratio) * D**2``, plus the ``V * D`` tied
        output embedding; not the input embedding lookup, biases or LayerNorms) and the second term
        is the attention scores and weighted sum (``2 * 2 * T * D`` per layer forward, times 3 for
        the backward; the causal mask's skipped half is counted, as in the usual formula).
        """
        cfg = self.cfg
        d = cfg.d_model
        n_matmul = cfg.n_layer * (4 + 2 * cfg.mlp_ratio) * d * d + cfg.vocab * d
        return float(6 * n_matmul + 12 * cfg.n_layer * cfg.context * d)


def _linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``x (P, N, in) @ weight (P, out, in).T + bias (P, out)`` as one batched product."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim of ``x (P, N, D)`` with per-variant ``weight, bias (P, D)``."""
    return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), weight.unsqueeze(1))
