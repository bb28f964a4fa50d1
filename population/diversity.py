"""Diversity of a population: genotype, parameters, function, representations, lineage.

Every measure is a plain function of arrays (or of a :class:`Lineage`); shapes are given
in each docstring. ``n`` is the number of variants, ``m`` the number of probe inputs,
``C`` the number of classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from forkpop.population.genome import GenomeSpec
from forkpop.population.lineage import Lineage
from forkpop.population.variant import Origin, Variant

EPS = 1e-12


def _pairs_mean(mat: np.ndarray) -> float:
    """Mean of the off-diagonal entries of a square ``(n, n)`` matrix (0 for n < 2)."""
    n = mat.shape[0]
    if n < 2:
        return 0.0
    return float((mat.sum() - np.trace(mat)) / (n * (n - 1)))


# -- genotype -----------------------------------------------------------------------------------


def genome_matrix(genomes: Sequence[dict[str, float]], spec: GenomeSpec) -> np.ndarray:
    """Genomes as ``(n, n_genes)`` in [0, 1]: each gene scaled to its bounds (log genes in log space)."""
    out = np.zeros((len(genomes), len(spec.genes)))
    for j, gene in enumerate(spec.genes):
        lo, hi = gene.low, gene.high
        for i, g in enumerate(genomes):
            v = float(g.get(gene.name, gene.init))
            if gene.kind == "log":
                v, lo_, hi_ = np.log(v), np.log(lo), np.log(hi)
            else:
                lo_, hi_ = lo, hi
            out[i, j] = 0.0 if hi_ == lo_ else (v - lo_) / (hi_ - lo_)
    return out


def genotype_spread(genomes: Sequence[dict[str, float]], spec: GenomeSpec) -> dict[str, float]:
    """Per gene: the standard deviation across the population in the gene's [0, 1] scale
    (``gene_std.<name>``); whole genome: the mean pairwise Euclidean distance of the scaled
    genomes (``genome_distance``). Identical genomes give 0 everywhere; no genomes, no measures."""
    if len(genomes) == 0:
        return {}
    x = genome_matrix(genomes, spec)
    out = {f"gene_std.{g.name}": float(x[:, j].std()) for j, g in enumerate(spec.genes)}
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    out["genome_distance"] = _pairs_mean(d)
    return out


# -- parameters ---------------------------------------------------------------------------------


def weight_distances(weights: torch.Tensor, seed: torch.Tensor | None = None) -> dict[str, float]:
    """``weights`` ``(n, P)`` flattened variants, ``seed`` ``(P,)``.

    ``weight_l2``: mean pairwise L2 distance; ``weight_cosine``: mean pairwise cosine
    distance (1 - cosine similarity); ``weight_to_seed``: mean L2 distance to the seed.
    """
    w = weights.double()
    l2 = torch.cdist(w, w).numpy()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(EPS)
    cos = (1.0 - unit @ unit.T).numpy()
    out = {"weight_l2": _pairs_mean(l2), "weight_cosine": _pairs_mean(cos)}
    if seed is not None:
        out["weight_to_seed"] = float((w - seed.double()).norm(dim=1).mean())
    return out


# -- function -----------------------------------------------------------------------------------


def disagreement_matrix(probs: np.ndarray) -> np.ndarray:
    """``probs`` ``(n, m, C)`` -> ``(n, n)``: share of probe inputs where two variants' argmax differ."""
    pred = probs.argmax(-1)
    return (pred[:, None, :] != pred[None, :, :]).mean(-1)


def kl_matrix(probs: np.ndarray) -> np.ndarray:
    """``(n, n)``: mean over the probe of KL(p_i || p_j) (nats)."""
    p = np.clip(probs, EPS, 1.0)
    logp = np.log(p)
    # KL(i||j) = sum_c p_i (log p_i - log p_j), averaged over inputs.
    self_term = (p * logp).sum(-1).mean(-1)  # (n,)
    cross = np.einsum("imc,jmc->ij", p, logp) / p.shape[1]
    return self_term[:, None] - cross


def js_matrix(probs: np.ndarray) -> np.ndarray:
    """``(n, n)``: mean over the probe of the Jensen-Shannon divergence (nats, at most ln 2)."""
    p = np.clip(probs, EPS, 1.0)
    n = p.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        mix = 0.5 * (p[i][None] + p)  # (n, m, C)
        kl_i = (p[i][None] * (np.log(p[i][None]) - np.log(mix))).sum(-1)
        kl_j = (p * (np.log(p) - np.log(mix))).sum(-1)
        out[i] = (0.5 * (kl_i + kl_j)).mean(-1)
    return out


def ensemble_ambiguity(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How much better the ensemble (mean of ``probs`` ``(n, m, C)``) is than its average member.

    ``ambiguity``: mean member cross-entropy minus the ensemble's (>= 0; 0 when all members
    agree); ``ambiguity_accuracy``: ensemble accuracy minus mean member accuracy.
    """
    p = np.clip(probs, EPS, 1.0)
    idx = np.arange(p.shape[1])
    member_ce = -np.log(p[:, idx, labels]).mean()
    ens = p.mean(0)
    ens_ce = -np.log(ens[idx, labels]).mean()
    member_acc = (p.argmax(-1) == labels[None]).mean()
    ens_acc = (ens.argmax(-1) == labels).mean()
    return {"ambiguity": float(member_ce - ens_ce), "ambiguity_accuracy": float(ens_acc - member_acc)}


def functional_diversity(probs: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """Mean pairwise disagreement, KL and JS of ``probs`` ``(n, m, C)``; ambiguity with labels."""
    out = {
        "disagreement": _pairs_mean(disagreement_matrix(probs)),
        "kl": _pairs_mean(kl_matrix(probs)),
        "js": _pairs_mean(js_matrix(probs)),
    }
    if labels is not None:
        out.update(ensemble_ambiguity(probs, labels))
    return out


def novelty(probs: np.ndarray) -> np.ndarray:
    """Each variant's mean Jensen-Shannon distance to the others, ``(n,)`` (0 for n < 2)."""
    n = probs.shape[0]
    if n < 2:
        return np.zeros(n)
    js = js_matrix(probs)
    return (js.sum(1) - np.diag(js)) / (n - 1)


# -- representations ----------------------------------------------------------------------------


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two representations of the same ``m`` inputs.

    ``x`` ``(m, d1)``, ``y`` ``(m, d2)``; 1 for identical (or rotated, or scaled)
    representations, near 0 for unrelated ones.
    """
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    cross = np.linalg.norm(y.T @ x) ** 2
    norm = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(cross / norm) if norm > EPS else 0.0


def cka_matrix(reps: Sequence[np.ndarray]) -> np.ndarray:
    """``(n, n)`` linear CKA between every pair of ``reps`` (each ``(m, d)``).

    Through the centred Gram matrices: ``||Y^T X||_F^2 = <X X^T, Y Y^T>_F``, so each pair
    costs an ``m x m`` inner product whatever the widths.
    """
    n = len(reps)
    if n == 0:
        return np.zeros((0, 0))
    grams = []
    for x in reps:
        xc = x - x.mean(0, keepdims=True)
        grams.append((xc @ xc.T).ravel())
    g = np.stack(grams)
    hsic = g @ g.T
    norms = np.sqrt(np.clip(np.diag(hsic), 0, None))
    denom = np.outer(norms, norms)
    out = np.where(denom > EPS, hsic / np.where(denom > EPS, denom, 1.0), 0.0)
    np.fill_diagonal(out, 1.0)
    return out


def representation_similarity(reps: Sequence[np.ndarray]) -> dict[str, float]:
    """``cka``: the mean pairwise linear CKA of the variants' hidden activations (1: all alike)."""
    return {"cka": _pairs_mean(cka_matrix(reps)) if len(reps) > 1 else 1.0}


# -- lineage ------------------------------------------------------------------------------------


def _ancestors(lineage: Lineage, vid: str) -> set[str]:
    seen: set[str] = set()
    stack = [vid]
    while stack:
        for p in lineage[stack.pop()].parents:
            if p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _generation(lineage: Lineage, g: int) -> list[Variant]:
    return [v for v in lineage if v.generation == g and v.origin is Origin.FORK]


def lineage_stats(lineage: Lineage, generation: int) -> dict[str, float]:
    """Lineage measures of the forks of ``generation``.

    - ``founders_alive``: founders (the forks of the first generation) that are ancestors
      of some fork of this generation;
    - ``effective_parents``: inverse Simpson index of the parents' shares of this
      generation's forks (a distilled seed's share goes to its teachers equally, so one
      seed distilled from k equal teachers counts k);
    - ``depth``: the longest chain of births from the root to a fork of this generation;
    - ``tmrca``: generations back to the forks' most recent common ancestor.
    """
    forks = _generation(lineage, generation)
    if not forks:
        return {}
    first = min(v.generation for v in lineage if v.origin is Origin.FORK)
    founders = {v.id for v in _generation(lineage, first)}
    anc = {v.id: _ancestors(lineage, v.id) for v in forks}
    alive = {f for f in founders if any(f in a or f == v for v, a in anc.items())}

    # Each fork's unit of ancestry is spread over its parents; a distilled parent passes
    # its share on to its teachers (one level, the previous generation's forks).
    shares: dict[str, float] = {}
    for v in forks:
        for p in v.parents:
            pv = lineage[p]
            w = 1.0 / len(v.parents)
            if pv.origin is Origin.DISTILL and pv.parents:
                for t in pv.parents:
                    shares[t] = shares.get(t, 0.0) + w / len(pv.parents)
            else:
                shares[p] = shares.get(p, 0.0) + w
    tot = sum(shares.values())
    eff = 1.0 / sum((s / tot) ** 2 for s in shares.values()) if tot > 0 else 0.0

    depth_memo: dict[str, int] = {}

    def depth(vid: str) -> int:
        if vid not in depth_memo:
            ps = lineage[vid].parents
            depth_memo[vid] = 0 if not ps else 1 + max(depth(p) for p in ps)
        return depth_memo[vid]

    common = set.intersection(*[a for a in anc.values()]) if anc else set()
    tmrca = generation - max((lineage[c].generation for c in common), default=0) if common else float("nan")
    return {
        "founders_alive": float(len(alive)),
        "effective_parents": float(eff),
        "depth": float(max(depth(v.id) for v in forks)),
        "tmrca": float(tmrca),
    }
