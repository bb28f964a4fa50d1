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

# Above this many variants the pairwise measures (genome distance, weight distances,
# disagreement, KL, JS, CKA; the disagreement artifact) are taken over a subsample of this many
# variants, drawn without replacement by :func:`pairwise_sample`: their mean over all pairs of a
# random subset is an unbiased estimate of the mean over all pairs, at O(cap^2) cost instead of
# O(n^2) (4,096 variants: 8.4 million pairs; the (n, n, m) disagreement array alone 2.4 GB).
PAIRWISE_CAP = 256


def pairwise_sample(n: int, cap: int = PAIRWISE_CAP, seed: Sequence[int] | int = 0) -> np.ndarray:
    """The rows the pairwise measures use among ``n`` variants: all of them (``arange(n)``)
    when ``n <= cap``, else ``cap`` rows drawn without replacement by
    ``numpy.random.default_rng(seed)`` (sorted): deterministic for a given seed, so a run and
    its resume measure the same pairs. It draws from its own generator, never the run's."""
    if cap <= 0 or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


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
        v = np.array([float(g.get(gene.name, gene.init)) for g in genomes], dtype=float)
        lo, hi = gene.low, gene.high
        if gene.kind == "log":
            v, lo, hi = np.log(v), np.log(lo), np.log(hi)
        out[:, j] = 0.0 if hi == lo else (v - lo) / (hi - lo)
    return out


def genotype_spread(
    genomes: Sequence[dict[str, float]], spec: GenomeSpec, pairs: Sequence[int] | None = None
) -> dict[str, float]:
    """Per gene: the standard deviation across the population in the gene's [0, 1] scale
    (``gene_std.<name>``); whole genome: the mean pairwise Euclidean distance of the scaled
    genomes (``genome_distance``; over the pairs of rows ``pairs`` only, when given, e.g.
    :func:`pairwise_sample`). Identical genomes give 0 everywhere; no genomes, no measures."""
    if len(genomes) == 0:
        return {}
    x = genome_matrix(genomes, spec)
    out = {f"gene_std.{g.name}": float(x[:, j].std()) for j, g in enumerate(spec.genes)}
    xs = x if pairs is None else x[np.asarray(pairs)]
    d = np.sqrt(((xs[:, None, :] - xs[None, :, :]) ** 2).sum(-1))
    out["genome_distance"] = _pairs_mean(d)
    return out


# -- parameters ---------------------------------------------------------------------------------


def weight_distances(
    weights: torch.Tensor, seed: torch.Tensor | None = None, pairs: Sequence[int] | None = None
) -> dict[str, float]:
    """``weights`` ``(n, P)`` flattened variants, ``seed`` ``(P,)``.

    ``weight_l2``: mean pairwise L2 distance; ``weight_cosine``: mean pairwise cosine
    distance (1 - cosine similarity), both over the pairs of rows ``pairs`` when given;
    ``weight_to_seed``: mean L2 distance to the seed, over every row.
    """
    w = weights[torch.as_tensor(np.asarray(pairs), dtype=torch.long)] if pairs is not None else weights
    w = w.double()
    l2 = torch.cdist(w, w).numpy()
    unit = w / w.norm(dim=1, keepdim=True).clamp_min(EPS)
    cos = (1.0 - unit @ unit.T).numpy()
    out = {"weight_l2": _pairs_mean(l2), "weight_cosine": _pairs_mean(cos)}
    if seed is not None:
        out["weight_to_seed"] = distance_to_seeds(weights, seed[None], np.zeros(len(weights), dtype=np.int64))
    return out


def distance_to_seeds(weights: torch.Tensor, seeds: torch.Tensor, slots: Sequence[int], chunk: int = 256) -> float:
    """Mean L2 distance of each row of ``weights`` ``(n, P)`` to its own seed, row ``slots[i]``
    of ``seeds`` ``(S, P)``; in float64, ``chunk`` rows at a time (no ``(n, P)`` copy)."""
    n = len(weights)
    if n == 0:
        return float("nan")
    idx = torch.as_tensor(np.asarray(slots), dtype=torch.long)
    total = 0.0
    for a in range(0, n, chunk):
        own = seeds[idx[a : a + chunk]].double()
        total += float((weights[a : a + chunk].double() - own).norm(dim=1).sum())
    return total / n


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
    """``(n, n)``: mean over the probe of the Jensen-Shannon divergence (nats, at most ln 2).

    As ``H(mix) - (H(p_i) + H(p_j)) / 2`` (the same as the mean of the two KLs to the mixture),
    each pair once: one logarithm per pair, input and class.
    """
    p = np.clip(probs, EPS, 1.0)
    n = p.shape[0]
    out = np.zeros((n, n))
    neg_h = (p * np.log(p)).sum(-1)  # (n, m): -H(p_i) per input
    for i in range(n - 1):
        mix = 0.5 * (p[i][None] + p[i + 1 :])  # (n - i - 1, m, C)
        js = 0.5 * (neg_h[i][None] + neg_h[i + 1 :]) - (mix * np.log(mix)).sum(-1)
        out[i, i + 1 :] = js.mean(-1)
    out = out + out.T
    return np.clip(out, 0.0, None)


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


def functional_diversity(
    probs: np.ndarray, labels: np.ndarray | None = None, pairs: Sequence[int] | None = None
) -> dict[str, float]:
    """Mean pairwise disagreement, KL and JS of ``probs`` ``(n, m, C)`` (over the pairs of rows
    ``pairs`` when given); ambiguity, with labels, over every row."""
    sub = probs if pairs is None else probs[np.asarray(pairs)]
    out = {
        "disagreement": _pairs_mean(disagreement_matrix(sub)),
        "kl": _pairs_mean(kl_matrix(sub)),
        "js": _pairs_mean(js_matrix(sub)),
    }
    if labels is not None:
        out.update(ensemble_ambiguity(probs, labels))
    return out


def novelty(probs: np.ndarray, reference: Sequence[int] | None = None) -> np.ndarray:
    """Each variant's mean Jensen-Shannon distance to the others, ``(n,)`` (0 for n < 2).

    With ``reference`` (row indices, e.g. :func:`pairwise_sample`), the mean distance to the
    reference rows other than itself: an unbiased estimate of the same at ``n x len(reference)``
    pairs instead of ``n^2``.
    """
    n = probs.shape[0]
    if n < 2:
        return np.zeros(n)
    if reference is None:
        js = js_matrix(probs)
        return (js.sum(1) - np.diag(js)) / (n - 1)
    ref = np.asarray(reference)
    d = js_to(probs, ref)  # (n, len(ref))
    own = ref[None, :] == np.arange(n)[:, None]
    d[own] = 0.0
    return d.sum(1) / np.maximum(len(ref) - own.sum(1), 1)


def js_to(probs: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """``(n, len(rows))``: mean Jensen-Shannon divergence of every variant to each of ``rows``."""
    p = np.clip(probs, EPS, 1.0)
    neg_h = (p * np.log(p)).sum(-1)  # (n, m)
    out = np.zeros((p.shape[0], len(rows)))
    for k, r in enumerate(rows):
        mix = 0.5 * (p[r][None] + p)
        out[:, k] = (0.5 * (neg_h[r][None] + neg_h) - (mix * np.log(mix)).sum(-1)).mean(-1)
    return np.clip(out, 0.0, None)


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
    # One batched product in torch (under the run's torch threads), not n small BLAS calls.
    if len({x.shape for x in reps}) == 1:
        x = torch.from_numpy(np.stack([np.asarray(r, dtype=np.float64) for r in reps]))
        xc = x - x.mean(1, keepdim=True)
        g = torch.bmm(xc, xc.transpose(1, 2)).reshape(n, -1)
    else:  # widths differ: one Gram matrix at a time
        g = torch.stack([_gram(torch.from_numpy(np.asarray(r, dtype=np.float64))) for r in reps])
    hsic = (g @ g.T).numpy()
    norms = np.sqrt(np.clip(np.diag(hsic), 0, None))
    denom = np.outer(norms, norms)
    out = np.where(denom > EPS, hsic / np.where(denom > EPS, denom, 1.0), 0.0)
    np.fill_diagonal(out, 1.0)
    return out


def _gram(x: torch.Tensor) -> torch.Tensor:
    xc = x - x.mean(0, keepdim=True)
    return (xc @ xc.T).reshape(-1)


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
    # A fork's ancestors are its parents' and theirs: once per distinct parent tuple (all the
    # forks of a species slot share one), not once per fork.
    by_parents: dict[tuple[str, ...], set[str]] = {}
    for v in forks:
        if v.parents not in by_parents:
            by_parents[v.parents] = _ancestors(lineage, v.id)
    anc = list(by_parents.values())
    alive = founders & set().union(*anc, (v.id for v in forks))

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

    common = set.intersection(*anc) if anc else set()
    tmrca = generation - max((lineage[c].generation for c in common), default=0) if common else float("nan")
    return {
        "founders_alive": float(len(alive)),
        "effective_parents": float(eff),
        "depth": float(max(depth(v.id) for v in forks)),
        "tmrca": float(tmrca),
    }
