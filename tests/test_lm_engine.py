"""The byte-level LM population engine: layout, same weights as training alone, sampler, divergence, nll."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from forkpop.population.lm import (
    ByteLM,
    LMConfig,
    PopulationLM,
    bits_per_byte,
    flatten,
    init_flat,
    n_params,
    param_shapes,
    unflatten,
)
from torch.nn.utils import parameters_to_vector

CFG = LMConfig(n_layer=1, n_head=2, d_model=32, context=16)
CFG2 = LMConfig(n_layer=2, n_head=2, d_model=16, context=8, mlp_ratio=2)
BETAS, EPS = (0.9, 0.95), 1e-8


def _windows(p: int, b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (p, b, t), generator=torch.Generator().manual_seed(seed))


def _reference_train(cfg, seed, lr, wd, clip, batches, soft=None, temperature=1.0) -> torch.Tensor:
    """One ByteLM trained alone with torch.optim.AdamW (decay on 2-D weights only) and clip_grad_norm_."""
    model = ByteLM(cfg, seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": wd}, {"params": other, "weight_decay": 0.0}], lr=lr, betas=BETAS, eps=EPS
    )
    for i, tokens in enumerate(batches):
        logits = model(tokens[:, :-1])
        if soft is None:
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        else:
            logq = F.log_softmax(logits / temperature, dim=-1)
            loss = (soft[i] * (soft[i].log() - logq)).sum(-1).mean() * temperature**2
        opt.zero_grad()
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return parameters_to_vector(model.parameters()).detach()


# -- 1. layout -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, CFG2])
def test_layout_matches_bytelm_parameters(cfg):
    model = ByteLM(cfg, 5)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == param_shapes(cfg)
    assert n_params(cfg) == sum(p.numel() for p in model.parameters())
    x = torch.randn(3, n_params(cfg))
    views = unflatten(x, cfg)
    assert torch.equal(flatten(views, cfg), x)
    views["tok_emb"][1, 0, 0] = 7.0  # views write through
    assert x[1, 0] == 7.0


def test_init_is_deterministic_in_seed():
    a, b, c = (parameters_to_vector(ByteLM(CFG, s).parameters()) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    params = dict(ByteLM(CFG2, 0).named_parameters())
    assert params["blocks.1.ln1.weight"].eq(1).all() and params["blocks.1.fc.bias"].eq(0).all()
    assert abs(params["tok_emb"].std().item() - 0.02) < 0.003
    assert params["blocks.0.out.weight"].std().item() < 0.015  # 0.02 / sqrt(2 * n_layer) = 0.01


@pytest.mark.parametrize("cfg", [CFG, CFG2])
def test_population_logits_equal_bytelm_and_rows_are_independent(cfg):
    flat = init_flat(cfg, [3, 4])
    pop = PopulationLM(cfg, flat, lr=1e-3)
    tokens = _windows(2, 3, cfg.context)
    out = pop.logits(tokens)
    assert out.shape == (2, 3, cfg.context, cfg.vocab)
    with torch.no_grad():
        for row, seed in enumerate((3, 4)):
            torch.testing.assert_close(out[row], ByteLM(cfg, seed)(tokens[row]), atol=1e-5, rtol=1e-5)
        one = PopulationLM(cfg, flat[:1], lr=1e-3).logits(tokens[:1])
        torch.testing.assert_close(one[0], out[0], atol=1e-5, rtol=1e-5)
    changed = flat.clone()
    changed[1] = torch.randn(n_params(cfg))
    out2 = PopulationLM(cfg, changed, lr=1e-3).logits(tokens)
    assert torch.equal(out2[0], out[0]) and not torch.allclose(out2[1], out[1])
    # (B, T) tokens are the same sequences for every variant
    torch.testing.assert_close(pop.logits(tokens[0])[1], pop.logits(tokens[[0, 0]])[1])


# -- 2. same weights as training each model alone --------------------------------------------------


@pytest.mark.parametrize("cfg", [CFG, CFG2])
def test_steps_equal_training_each_model_alone(cfg):
    seeds, lrs, wds, clips = [0, 1, 2], [1e-3, 3e-3, 1e-2], [0.0, 0.1, 0.01], [1.0, 0.0, 0.05]
    steps, batch = 5, 4
    data = _windows(steps, 3 * batch, cfg.context + 1).view(steps, 3, batch, -1)
    pop = PopulationLM(cfg, init_flat(cfg, seeds), lr=lrs, weight_decay=wds, clip=clips, betas=BETAS, eps=EPS)
    for s in range(steps):
        loss = pop.step(data[s])
        assert loss.shape == (3,) and torch.isfinite(loss).all()
    got = pop.flat()
    for p in range(3):
        ref = _reference_train(cfg, seeds[p], lrs[p], wds[p], clips[p], data[:, p])
        torch.testing.assert_close(got[p], ref, atol=1e-5, rtol=1e-4)
    assert not pop.diverged.any()


def test_soft_target_steps_equal_training_alone():
    seeds, lrs, temperature, steps = [0, 1, 2], [1e-3, 2e-3, 5e-3], 2.0, 5
    data = _windows(steps, 3 * 4, CFG.context + 1, seed=1).view(steps, 3, 4, -1)
    g = torch.Generator().manual_seed(9)
    soft = torch.softmax(torch.randn(steps, 3, 4, CFG.context, CFG.vocab, generator=g) * 3, dim=-1)
    pop = PopulationLM(CFG, init_flat(CFG, seeds), lr=lrs, weight_decay=0.05, clip=0.5, betas=BETAS, eps=EPS)
    first = None
    for s in range(steps):
        loss = pop.step(data[s], soft=soft[s], temperature=temperature)
        first = loss if first is None else first
    got = pop.flat()
    for p in range(3):
        ref = _reference_train(CFG, seeds[p], lrs[p], 0.05, 0.5, data[:, p], soft=soft[:, p], temperature=temperature)
        torch.testing.assert_close(got[p], ref, atol=1e-5, rtol=1e-4)
    # the returned loss is the one before the update, as the reference computes it
    with torch.no_grad():
        logq = F.log_softmax(ByteLM(CFG, 0)(data[0, 0, :, :-1]) / temperature, dim=-1)
        kl = (soft[0, 0] * (soft[0, 0].log() - logq)).sum(-1).mean() * temperature**2
    torch.testing.assert_close(first[0], kl, atol=1e-5, rtol=1e-5)


def test_mask_freezes_a_variant_for_one_step():
    data = _windows(3, 2 * 4, CFG.context + 1, seed=2).view(3, 2, 4, -1)
    pop = PopulationLM(CFG, init_flat(CFG, [0, 1]), lr=1e-2)
    pop.step(data[0])
    before, m1, t1 = pop.flat(), pop.m[1].clone(), pop.t.clone()
    pop.step(data[1], mask=torch.tensor([True, False]))
    after = pop.flat()
    assert torch.equal(after[1], before[1]) and torch.equal(pop.m[1], m1) and pop.t[1] == t1[1]
    assert not torch.equal(after[0], before[0]) and pop.t[0] == 2
    # variant 0 is exactly where it would be without the mask
    alone = PopulationLM(CFG, init_flat(CFG, [0]), lr=1e-2)
    alone.step(data[0, :1])
    alone.step(data[1, :1])
    torch.testing.assert_close(alone.flat()[0], after[0], atol=1e-6, rtol=1e-6)


# -- 3. the KV-cache sampler -----------------------------------------------------------------------


@pytest.mark.parametrize("t0,n_new", [(3, 6), (5, 20)])  # the second runs past the context (sliding window)
def test_cached_sampler_matches_plain_forward(t0, n_new):
    cfg = CFG2 if n_new > 10 else CFG
    pop = PopulationLM(cfg, init_flat(cfg, [0, 1]), lr=1e-3)
    prompts = _windows(2, 3, t0, seed=3)
    toks, logits = pop.generate(prompts, n_new, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert toks.shape == (2, 3, n_new) and logits.shape == (2, 3, n_new, cfg.vocab)
    seq = torch.cat([prompts, toks], dim=2)
    for p, seed in enumerate((0, 1)):
        model = ByteLM(cfg, seed)
        with torch.no_grad():
            for j in range(n_new):
                prefix = seq[p, :, : t0 + j][:, -cfg.context :]
                ref = torch.softmax(model(prefix)[:, -1], dim=-1)
                torch.testing.assert_close(torch.softmax(logits[p, :, j], dim=-1), ref, atol=1e-5, rtol=1e-4)
    again = pop.sample(prompts, n_new, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, toks)
    other = pop.sample(prompts, n_new, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other, toks)


def test_greedy_sampling_is_argmax_of_plain_forward():
    pop = PopulationLM(CFG, init_flat(CFG, [4, 5]), lr=1e-3)
    prompts = _windows(2, 2, 4, seed=4)
    toks = pop.sample(prompts, 14, temperature=0.0)
    seq = torch.cat([prompts, toks], dim=2)
    for p, seed in enumerate((4, 5)):
        with torch.no_grad():
            for j in range(14):
                prefix = seq[p, :, : 4 + j][:, -CFG.context :]
                assert torch.equal(ByteLM(CFG, seed)(prefix)[:, -1].argmax(-1), toks[p, :, j])


# -- 4. divergence ---------------------------------------------------------------------------------


def test_diverging_variants_are_frozen_without_touching_the_others():
    steps = 6
    data = _windows(steps, 3 * 4, CFG.context + 1, seed=5).view(steps, 3, 4, -1)
    flat = init_flat(CFG, [0, 1, 2])
    flat[2, 100] = float("nan")  # injected NaN weights
    pop = PopulationLM(CFG, flat, lr=[1e-3, 1e6, 1e-3], clip=0.0)
    healthy = PopulationLM(CFG, flat[:1], lr=1e-3, clip=0.0)
    for s in range(steps):
        loss = pop.step(data[s])
        healthy.step(data[s, :1])
    assert pop.diverged.tolist() == [False, True, True]
    assert torch.isfinite(loss[0])
    torch.testing.assert_close(pop.flat()[0], healthy.flat()[0], atol=1e-6, rtol=1e-6)
    frozen = pop.flat()
    pop.step(data[0])
    assert torch.equal(pop.flat()[1:].nan_to_num(7.0), frozen[1:].nan_to_num(7.0))
    assert torch.isfinite(pop.m[1:]).all() and torch.isfinite(pop.v[1:]).all()


# -- 5. nll on shared windows ----------------------------------------------------------------------


def test_nll_matches_cross_entropy_of_bytelm():
    pop = PopulationLM(CFG, init_flat(CFG, [0, 1]), lr=1e-3)
    windows = _windows(1, 11, CFG.context + 1, seed=6)[0]
    nll = pop.nll(windows, batch=4)
    assert nll.shape == (2, 11, CFG.context)
    for p, seed in enumerate((0, 1)):
        with torch.no_grad():
            logits = ByteLM(CFG, seed)(windows[:, :-1])
        ref = F.cross_entropy(logits.reshape(-1, CFG.vocab), windows[:, 1:].reshape(-1), reduction="none")
        torch.testing.assert_close(nll[p], ref.view(11, CFG.context), atol=1e-5, rtol=1e-5)
    bpb = bits_per_byte(nll)
    torch.testing.assert_close(bpb, nll.reshape(2, -1).mean(1) / math.log(2))
    assert 7.0 < bpb.min() and bpb.max() < 9.0  # near-uniform at initialisation: ~8 bits per byte


def test_flops_per_token_formula():
    pop = PopulationLM(LMConfig(), init_flat(LMConfig(), [0]), lr=1e-3)
    d, layers, t = 128, 2, 64
    assert pop.flops_per_token() == 6 * (layers * 12 * d * d + 256 * d) + 12 * layers * t * d
