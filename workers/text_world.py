"""The language-model world: populations of byte-level transformers on text niches.

Each niche is a body of real text (a package of the Python standard library, a group of the
Python docs' topics, or a user's files); a fork learns next-byte prediction on its niche as
one step of its group (:class:`forkpop.population.lm.PopulationLM`: a leading population
dimension on every parameter), fitness is held-out bits per byte, distillation is the
teachers' next-byte distributions (:mod:`forkpop.selection.lm_distiller`), and text the
population generates itself can join the training text (the model-collapse experiment).

Splits: each niche's held-out *files* (never its training files) are cut into windows of
``context + 1`` bytes; the first ``probe_windows`` of each niche are the probe (fitness,
early stopping), the next ``accept_windows`` the acceptance split (elitism only), the next
``test_windows`` the test split (reported only).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from forkpop.population.lm import ByteLM, PopulationLM
from forkpop.population.lm import LMConfig as ArchConfig
from forkpop.population.world import World
from forkpop.workers.learner import ForkTask, LearnResult, fork_weights
from forkpop.workers.text import TextCorpus, TextSpec, load_text, windows

from forkpop.plugins import register

LN2 = math.log(2.0)
SPLITS = ("probe", "accept", "test")
#: :meth:`TextWorld.predict` keeps every STRIDE-th position of a window (the later ones, with
#: more context): diversity, entropies and the ensemble's figure need distributions, not all of them
STRIDE = 16
#: how the text world keeps its generated text in ``RunState.generated[slot]``:
#: (bytes uint8 (L,), segments int64 (n, 3) = [niche, length, generation born], reference
#: weights float32 (n_params,): the generation-0 model that scores each generation's samples)
GeneratedText = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SelfTrain:
    """Learning from their own text (see ``lm.self_train`` in the config)."""

    mode: str = "none"  # none | replace | accumulate
    real_fraction: float = 1.0
    temperature: float = 1.0
    samples: int = 128
    length: int | None = None
    prompt: int = 8
    by: str = "teachers"
    into: str = "both"

    def niches(self) -> bool:
        return self.mode != "none" and self.into in ("both", "niches")

    def transfer(self) -> bool:
        return self.mode != "none" and self.into in ("both", "transfer")


@dataclass(frozen=True)
class TextLearnerSpec:
    """What every text learner of a run shares (shipped to the workers, which load the same
    corpus and splits from it)."""

    text: TextSpec
    arch: ArchConfig
    steps: int = 60
    batch_size: int = 16
    torch_threads: int = 1
    device: str = "auto"
    probe_windows: int = 12
    accept_windows: int = 24
    test_windows: int = 48
    self_train: SelfTrain = SelfTrain()
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3
    cache_dir: str = ""  # where pretrained roots are kept (run.run_dir/.pretrained)
    learner: str = "text"
    import_roots: tuple[str, ...] = field(default=())
    engine: str = "batched"  # a group's variants learn as one step (there is no other engine for LMs)
    # A language model fills a core with fewer variants than the digits MLP: with 16 variants,
    # two actors of 8 learn side by side on 2 cores.
    variants_per_worker: int = 8


def split_windows(corpus: TextCorpus, spec: TextLearnerSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The held-out windows of each split and the niche of each: ``{split: (windows (m, T+1), niche (m,))}``.

    Windows follow each other (stride ``context``: every held-out byte is predicted once);
    in each niche the probe takes the first, then the acceptance split, then the test split."""
    t = spec.arch.context
    want = {"probe": spec.probe_windows, "accept": spec.accept_windows, "test": spec.test_windows}
    out: dict[str, list] = {s: [[], []] for s in SPLITS}
    for j, held in enumerate(corpus.heldout):
        w = windows(held, t + 1, stride=t)
        if len(w) < 3:
            raise ValueError(
                f"niche {corpus.names[j]!r} holds {len(held)} held-out bytes: too few for three splits of "
                f"{t + 1}-byte windows; give it more files or raise lm.heldout_fraction"
            )
        # With fewer windows than asked for, the three splits share them out in proportion.
        total = sum(want.values())
        scale = min(1.0, len(w) / total)
        n = {s: max(1, int(want[s] * scale)) for s in SPLITS}
        at = 0
        for s in SPLITS:
            out[s][0].append(w[at : at + n[s]])
            out[s][1].append(np.full(len(w[at : at + n[s]]), j, dtype=np.int64))
            at += n[s]
    return {
        s: (torch.from_numpy(np.concatenate(out[s][0])).long(), torch.from_numpy(np.concatenate(out[s][1])))
        for s in SPLITS
    }


def bits_per_byte(nll: torch.Tensor) -> torch.Tensor:
    """Per-variant bits per byte from per-position negative log-likelihoods ``(P, m, T)`` (nats)."""
    return nll.double().mean(dim=(1, 2)) / LN2


def generated_rows(pool: GeneratedText | None, niche: int | None = None, born: int | None = None) -> np.ndarray:
    """The generated samples in ``pool`` (those of ``niche`` and/or made in generation ``born``,
    where given), as ``(n, length)`` uint8 rows cut to the shortest (empty: none)."""
    if pool is None or len(pool[1]) == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    data, seg = pool[0].numpy(), pool[1].numpy()
    starts = np.concatenate([[0], np.cumsum(seg[:, 1])[:-1]])
    rows = [
        data[s : s + n]
        for s, (nic, n, b) in zip(starts, seg, strict=True)
        if (niche is None or nic == niche) and (born is None or b == born)
    ]
    if not rows:
        return np.zeros((0, 0), dtype=np.uint8)
    width = min(len(r) for r in rows)
    return np.stack([r[:width] for r in rows])


def generated_for(pool: GeneratedText | None, niche: int) -> np.ndarray:
    """The generated samples of ``niche`` in ``pool``, as ``(n, length)`` uint8 rows (empty: none)."""
    return generated_rows(pool, niche=niche)


class WindowSource:
    """Training windows of one niche: real windows drawn from its text, and generated samples
    (each one window), mixed at ``real_fraction`` (per window, drawn with ``rng``)."""

    def __init__(self, real: np.ndarray, generated: np.ndarray, real_fraction: float, length: int):
        self.real, self.generated, self.length = real, generated, length
        self.real_fraction = 1.0 if len(generated) == 0 else real_fraction
        if len(generated) and generated.shape[1] < length:  # short samples: padded windows are not learned from
            self.generated = np.zeros((0, 0), dtype=np.uint8)
            self.real_fraction = 1.0
        if len(real) <= length and self.real_fraction > 0:
            raise ValueError(f"a niche holds {len(real)} training bytes; it needs more than {length}")

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((n, self.length), dtype=np.int64)
        real = rng.random(n) < self.real_fraction
        k = int(real.sum())
        if k:
            starts = rng.integers(0, len(self.real) - self.length + 1, size=k)
            out[real] = self.real[starts[:, None] + np.arange(self.length)]
        if n - k:
            rows = rng.integers(0, len(self.generated), size=n - k)
            out[~real] = self.generated[rows, : self.length]
        return out


class TextLearner:
    """Hosts a group of language-model variants (in a process or a Ray actor): every fork of
    the group learns as one step of a :class:`PopulationLM`."""

    def __init__(self, spec: TextLearnerSpec):
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.corpus = load_text(spec.text)
        self.splits = split_windows(self.corpus, spec)
        dev = spec.device
        self.device = "cuda" if dev == "cuda" or (dev == "auto" and torch.cuda.is_available()) else "cpu"

    def describe(self) -> dict:
        return {"device": self.device, "engine": "lm-stacked", "reason": ""}

    def fork(self, seed_weights: torch.Tensor, task: ForkTask) -> torch.Tensor:
        return fork_weights(seed_weights, task)[1]

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        """Fork each task's seed and learn its niche (real text, and the task's generated
        samples in ``task.payload``) for ``steps x epochs`` steps, all variants as one step."""
        t0 = time.perf_counter()
        spec, arch = self.spec, self.spec.arch
        n = seed_weights.shape[-1]
        if not tasks:
            return torch.empty(0, n), []
        flats = torch.stack([self.fork(seed_weights, t) for t in tasks])
        steps = [max(1, int(round(spec.steps * float(t.genome.get("epochs", 1.0))))) for t in tasks]
        engine = PopulationLM(
            arch,
            flats,
            lr=[float(t.genome["lr"]) for t in tasks],
            weight_decay=[float(t.genome.get("weight_decay", 0.0)) for t in tasks],
            clip=[float(t.genome.get("clip", 1.0)) for t in tasks],
            device=self.device,
        )
        L = arch.context + 1
        sources = []
        for t in tasks:
            gen = t.payload if t.payload is not None else np.zeros((0, 0), dtype=np.uint8)
            real = self.corpus.train[t.niche % len(self.corpus.train)]
            sources.append(WindowSource(real, np.asarray(gen), self._real_fraction(gen), L))
        rngs = [np.random.default_rng([t.seed, 7]) for t in tasks]
        losses: list[list[float]] = [[] for _ in tasks]
        B = spec.batch_size
        for s in range(max(steps)):
            active = torch.tensor([s < k for k in steps]) & ~engine.diverged.cpu()
            if not bool(active.any()):
                break
            batch = np.stack([src.draw(B, r) for src, r in zip(sources, rngs, strict=True)])
            loss = engine.step(torch.from_numpy(batch).to(self.device), mask=active.to(self.device))
            for i in torch.nonzero(active).flatten().tolist():
                losses[i].append(float(loss[i]))
        weights = engine.flat()
        probe, niche_of = self.splits["probe"]
        nll = engine.nll(probe.to(self.device)).cpu()  # (P, m, T)
        seed_engine = PopulationLM(arch, seed_weights.reshape(-1, n), lr=[0.0] * seed_weights.reshape(-1, n).shape[0])
        seed_nll = seed_engine.nll(probe.to(self.device)).cpu()
        wall = time.perf_counter() - t0
        tokens_per_s = sum(len(x) for x in losses) * B * arch.context / max(wall, 1e-9)
        results = []
        for i, t in enumerate(tasks):
            own = niche_of == (t.niche % len(self.corpus.train))
            bpb = float(bits_per_byte(nll[i : i + 1])[0])
            r = LearnResult(t.variant_id, val_accuracy=-bpb, loss=losses[i], epoch_ends=[len(losses[i])])
            r.samples = len(losses[i]) * B
            r.seconds = wall / len(tasks)
            d = engine.diverged.cpu()
            if bool(d[i]) or not math.isfinite(bpb) or not torch.isfinite(weights[i]).all():
                r.status, r.reason = "diverged", f"non-finite loss or weights after {len(losses[i])} steps"
                r.val_accuracy = float("nan")
            s_row = seed_nll[min(t.seed_index, len(seed_nll) - 1)]
            r.metrics = {
                "bpb_probe": bpb,
                "bpb_own": float(nll[i][own].double().mean() / LN2),
                "seed_bpb_own": float(s_row[own].double().mean() / LN2),
                "tokens": float(len(losses[i]) * B * arch.context),
                "tokens_per_s": tokens_per_s,
                "real_fraction": sources[i].real_fraction,
            }
            results.append(r)
        return weights, results

    def _real_fraction(self, generated: Any) -> float:
        st = self.spec.self_train
        if generated is None or len(generated) == 0:
            return 1.0
        if st.mode == "accumulate":  # all the real text, and every generation's samples beside it
            real_bytes = sum(len(x) for x in self.corpus.train) / max(1, len(self.corpus.train))
            gen_bytes = float(np.asarray(generated).size)
            return real_bytes / (real_bytes + gen_bytes)
        return st.real_fraction


register("learners", "text", TextLearner)


class TextWorld(World):
    """Byte-level language models on text niches (see the module docstring). Fitness is minus
    the held-out bits per byte (higher is better), on the probe windows."""

    name = "text"

    def __init__(self, corpus: TextCorpus, spec: TextLearnerSpec, seed_generator: int = 0):
        self.corpus, self.spec, self.arch = corpus, spec, spec.arch
        # Distillation and the studies' baselines run in the driver while the workers wait: on
        # every core this process may use.
        self.driver_threads = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        self.splits = split_windows(corpus, spec)
        self.n_params = sum(p.numel() for p in ByteLM(self.arch, 0).parameters())
        g = np.random.default_rng([spec.text.seed, 11])
        L = self.arch.context + 1
        rows = [windows(tr, L, n=16, generator=g) for tr in corpus.train]
        self._transfer = torch.from_numpy(np.concatenate(rows)).long()
        self._transfer_niche = torch.from_numpy(np.repeat(np.arange(len(rows)), [len(r) for r in rows]))

    # -- data -------------------------------------------------------------------------------
    @property
    def n_niches(self) -> int:
        return len(self.corpus.names)

    def niche_size(self, niche: int) -> int:
        return len(self.corpus.train[niche])

    def niche_rows(self, niche: int) -> np.ndarray:
        return np.nonzero(self._transfer_niche.numpy() == niche)[0]

    def describe(self) -> dict[str, Any]:
        return {
            "world": self.name,
            "model": {"family": "byte_lm", **self.arch.__dict__, "n_params": self.n_params},
            "windows": {s: len(self.splits[s][0]) for s in SPLITS},
            **self.corpus.record(),
        }

    # -- models -----------------------------------------------------------------------------
    def build_model(self, seed: int = 0) -> torch.nn.Module:
        return ByteLM(self.arch, seed)

    def learner_spec(self) -> TextLearnerSpec:
        return self.spec

    # -- fitness and outputs ----------------------------------------------------------------
    def inputs(self, split: str) -> torch.Tensor:
        if split == "transfer":
            return self._transfer
        return self.splits[split][0]

    def niche_of(self, split: str) -> torch.Tensor:
        if split == "transfer":
            return self._transfer_niche
        return self.splits[split][1]

    def engine(self, weights: torch.Tensor, lr: list[float] | None = None, clip: float = 1.0) -> PopulationLM:
        """The rows of ``weights`` as a :class:`PopulationLM` (learning at ``lr``, else for inference)."""
        w = weights.reshape(-1, weights.shape[-1])
        return PopulationLM(self.arch, w, lr=lr if lr is not None else [0.0] * len(w), clip=clip)

    def transfer_source(self, niche: int, pool: GeneratedText | None) -> WindowSource:
        """Windows of niche ``niche`` for distillation: its real training text, and its generated
        samples where the run learns from its own text in the transfer corpus."""
        st = self.spec.self_train
        gen = generated_for(pool, niche) if st.transfer() else np.zeros((0, 0), dtype=np.uint8)
        real = self.corpus.train[niche]
        frac = st.real_fraction
        if st.mode == "accumulate" and len(gen):
            frac = len(real) / (len(real) + gen.size)
        return WindowSource(real, gen, frac, self.arch.context + 1)

    def self_text(
        self, pool: GeneratedText | None, writers: torch.Tensor, generation: int, student: torch.Tensor, seed: int
    ) -> GeneratedText:
        """This generation's text: ``lm.self_train.samples`` samples per niche, niche ``j``'s
        written by ``writers[j]`` after a ``prompt``-byte start from that niche's real training
        text; joined to ``pool``'s (``accumulate``) or replacing them (``replace``, ``none``).
        The generation-0 model (``student`` at generation 0) stays with the pool: it scores
        every later generation's samples."""
        st = self.spec.self_train
        length = st.length or self.arch.context + 1
        g = np.random.default_rng([seed, 3])
        prompts = []
        for j in range(self.n_niches):
            tr = self.corpus.train[j]
            starts = g.integers(0, len(tr) - st.prompt, size=st.samples)
            prompts.append(tr[starts[:, None] + np.arange(st.prompt)])
        x = torch.from_numpy(np.stack(prompts).astype(np.int64))  # (n_niches, S, prompt)
        gen = torch.Generator().manual_seed(int(g.integers(2**62)))
        with torch.no_grad():
            out = self.engine(writers).sample(x, length - st.prompt, temperature=st.temperature, generator=gen)
        text = torch.cat([x, out.long()], -1).to(torch.uint8)  # (n_niches, S, length)
        seg = torch.tensor([[j, length, generation] for j in range(self.n_niches) for _ in range(st.samples)])
        data = text.reshape(-1)
        ref = pool[2] if pool is not None and pool[2].numel() == self.n_params else student.detach().clone()
        if pool is not None and st.mode == "accumulate" and len(pool[1]):
            data, seg = torch.cat([pool[0], data]), torch.cat([pool[1], seg])
        return data, seg.long(), ref

    def nll(self, weights: torch.Tensor, split: str | torch.Tensor) -> torch.Tensor:
        """Per-position negative log-likelihoods ``(n, m, T)`` (nats) of each row of ``weights``."""
        x = self.inputs(split) if isinstance(split, str) else split
        return self.engine(weights).nll(x)

    def predict(self, model: torch.nn.Module, weights: torch.Tensor, x: torch.Tensor, with_hidden: bool = False) -> Any:
        """Next-byte distributions at every ``STRIDE``-th position of each window: ``(n, m * T/STRIDE, 256)``;
        with ``with_hidden``, each variant's mean next-byte distribution per window ``(m, 256)``
        (an output-space representation: the world's models share no hidden layer worth comparing)."""
        eng = self.engine(weights)
        probs = []
        for a in range(0, len(x), 64):
            lg = eng.logits(x[a : a + 64, :-1].unsqueeze(0).expand(eng.P, -1, -1))
            probs.append(torch.softmax(lg[:, :, STRIDE - 1 :: STRIDE].float(), -1))
        p = torch.cat(probs, 1)  # (n, m, T/STRIDE, V)
        flat = p.reshape(p.shape[0], -1, p.shape[-1])
        if not with_hidden:
            return flat, []
        return flat, [p[i].mean(1) for i in range(p.shape[0])]

    def fitness(self, model: torch.nn.Module, weights: torch.Tensor, split: str = "probe") -> float:
        """Minus bits per byte on ``split``."""
        return -float(bits_per_byte(self.nll(weights, split))[0])

    def bpb(self, weights: torch.Tensor, split: str = "test") -> float:
        return float(bits_per_byte(self.nll(weights, split))[0])

    def fitness_of(self, probs: torch.Tensor, split: str = "probe") -> torch.Tensor:
        """Minus bits per byte of each row of ``probs`` (as :meth:`predict` gives them) on ``split``."""
        y = self.inputs(split)[:, 1:][:, STRIDE - 1 :: STRIDE].reshape(-1)
        p = probs.gather(2, y.expand(probs.shape[0], -1).unsqueeze(-1))[..., 0]
        return (p.double().clamp_min(1e-12).log2()).mean(-1).float()

    def acceptance_scores(self, model: torch.nn.Module, weights: torch.Tensor) -> torch.Tensor:
        """Each acceptance window's mean log-likelihood per byte (nats): a paired test over windows."""
        return -self.nll(weights, "accept")[0].double().mean(-1)

    def prepare_root(self, weights: torch.Tensor, run_seed: int) -> torch.Tensor:
        """The root seed before generation 0: with ``lm.pretrain_steps``, its random
        initialisation trained on the pooled real training text (windows drawn with
        ``default_rng([run_seed, 303])``, ``4 x lm.batch_size`` per step), kept in
        ``cache_dir`` under a key of everything it depends on, so the arms of a study that share
        a run seed share one pretraining."""
        spec = self.spec
        if spec.pretrain_steps <= 0:
            return weights
        import hashlib

        from safetensors.torch import load_file, save_file

        batch = 4 * spec.batch_size
        key = hashlib.sha256(
            repr((self.corpus.sha256, self.arch, spec.pretrain_steps, spec.pretrain_lr, batch, run_seed)).encode()
            + weights.numpy().tobytes()
        ).hexdigest()[:24]
        path = Path(spec.cache_dir or ".") / f"root-{key}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))["weights"]
            except Exception:  # a half-written or corrupt cache file: learn it again
                path.unlink(missing_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.driver_threads)
        try:
            eng = self.engine(weights, lr=[spec.pretrain_lr], clip=1.0)
            data, L = self.corpus.pooled_train(), self.arch.context + 1
            rng = np.random.default_rng([run_seed, 303])
            for _ in range(spec.pretrain_steps):
                starts = rng.integers(0, len(data) - L + 1, size=batch)
                eng.step(torch.from_numpy(data[starts[:, None] + np.arange(L)].astype(np.int64))[None])
            out = eng.flat()[0].contiguous()
        finally:
            torch.set_num_threads(threads)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"weights": out}, str(tmp))
        tmp.replace(path)
        return out

    # -- generated text ---------------------------------------------------------------------
    def payload(self, state: Any, niche: int, slot: int = 0) -> np.ndarray | None:
        """The generated samples a fork of ``slot`` on ``niche`` learns from beside its real text."""
        if not self.spec.self_train.niches():
            return None
        rows = generated_for(state.generated.get(slot), niche)
        return rows if len(rows) else None

    @cached_property
    def real_ngrams(self) -> Any:
        from forkpop.population.text_measures import RealNgrams

        return RealNgrams(self.corpus.pooled_train())

    def measure(self, result: Any) -> dict[str, Any]:
        """Per-generation figures of the language-model world (the run's ``lm.*`` metrics):
        the seed's held-out bits per byte (test split: pooled, per niche, at positions whose
        4-gram is rare or frequent in the real corpus), the teachers' ensemble's, the
        median fork's gain on its own niche, tokens per second, and of the text generated this
        generation: next-byte entropy, distinct-4-gram ratio, gzip ratio, rare-4-gram recall and
        the generation-0 model's bits per byte on it."""
        from forkpop.population.text_measures import distinct_ngram_ratio, gzip_ratio

        st = result.state
        seed = st.seeds[st.best_slot()]
        x, niche = self.splits["test"]
        nll = self.nll(seed.weights, "test")[0]  # (m, T)
        out: dict[str, float] = {"test_bpb": float(nll.double().mean() / LN2)}
        for j, name in enumerate(self.corpus.names):
            keep = niche == j
            if bool(keep.any()):
                out[f"test_bpb.{name}"] = float(nll[keep].double().mean() / LN2)
        rare = torch.from_numpy(self.real_ngrams.rare_mask(x.numpy()))
        if bool(rare.any()):
            out["test_bpb_rare4"] = float(nll[rare].double().mean() / LN2)
        if bool((~rare).any()):
            out["test_bpb_frequent4"] = float(nll[~rare].double().mean() / LN2)
        ev = result.evals
        gains = [
            r.metrics["seed_bpb_own"] - r.metrics["bpb_own"]
            for r in ev.results
            if r.status == "ok" and getattr(r, "metrics", None)
        ]
        if gains:
            out["fork_own_gain_median"] = float(np.median(gains))
        tps = [r.metrics.get("tokens_per_s", float("nan")) for r in ev.results if getattr(r, "metrics", None)]
        if tps:
            out["tokens_per_s"] = float(np.nanmax(tps))
        out["tokens"] = float(sum(r.metrics.get("tokens", 0.0) for r in ev.results if getattr(r, "metrics", None)))
        out["tokens"] += float(sum(getattr(s, "tokens", 0) for s in result.students))
        pool = st.generated.get(st.best_slot())
        fresh = generated_rows(pool, born=result.generation)
        if len(fresh):
            prompt = self.spec.self_train.prompt
            gen_part = [r[prompt:] for r in fresh]
            out["gen_distinct4"] = distinct_ngram_ratio(gen_part)
            out["gen_gzip_ratio"] = gzip_ratio(gen_part)
            out["gen_rare4_recall"] = self.real_ngrams.rare_recall(gen_part)
            xs = torch.from_numpy(fresh.astype(np.int64))
            if xs.shape[1] > self.arch.context + 1:
                xs = xs[:, : self.arch.context + 1]
            eng = self.engine(seed.weights)
            lg = eng.logits(xs[:, :-1].unsqueeze(0))[0]
            lp = torch.log_softmax(lg.double(), -1)
            out["gen_entropy_bits"] = float(-(lp.exp() * lp).sum(-1)[:, prompt - 1 :].mean() / LN2)
            ref = pool[2]
            if ref.numel() == self.n_params:
                ref_nll = self.engine(ref).nll(xs)[0][:, prompt - 1 :]
                out["gen_bpb_by_gen0"] = float(ref_nll.double().mean() / LN2)
        return {"world": out}

    def samples(self, weights: torch.Tensor, n: int, length: int, temperature: float = 1.0, seed: int = 0) -> list[str]:
        """``n`` samples of ``length`` bytes from one weight vector, each after an 8-byte prompt of
        a held-out test window (decoded as UTF-8 with replacement)."""
        if n <= 0:
            return []
        x, _ = self.splits["test"]
        g = torch.Generator().manual_seed(seed)
        rows = x[torch.randperm(len(x), generator=g)[:n], :8]
        out = self.engine(weights).sample(rows.unsqueeze(0), length, temperature=temperature, generator=g)[0]
        return [bytes(rows[i].tolist() + out[i].tolist()).decode("utf-8", "replace") for i in range(len(rows))]


def text_spec(cfg: Any) -> TextSpec:
    d, lm = cfg.data, cfg.lm
    niches: tuple[tuple[str, str], ...] = tuple((k, str(v)) for k, v in d.niches.items())
    return TextSpec(
        source=d.source,
        niches=niches,
        heldout_fraction=lm.heldout_fraction,
        max_bytes_per_niche=lm.max_bytes_per_niche,
        seed=d.seed,
        n_niches=cfg.n_niches if d.source != "text" else len(niches),
    )


def text_learner_spec(cfg: Any) -> TextLearnerSpec:
    lm = cfg.lm
    arch = ArchConfig(n_layer=lm.n_layer, n_head=lm.n_head, d_model=lm.d_model, context=lm.context)
    return TextLearnerSpec(
        text_spec(cfg),
        arch,
        steps=lm.steps,
        batch_size=lm.batch_size,
        torch_threads=cfg.run.torch_threads,
        device=cfg.run.device,
        probe_windows=lm.probe_windows,
        accept_windows=lm.accept_windows,
        test_windows=lm.test_windows,
        self_train=SelfTrain(**lm.self_train.model_dump()),
        pretrain_steps=lm.pretrain_steps,
        pretrain_lr=lm.pretrain_lr,
        cache_dir=str(Path(cfg.run.run_dir).resolve() / ".pretrained"),
    )


def text_world(cfg: Any) -> TextWorld:
    """The language-model world of ``cfg`` (``data.world: text``), its corpus loaded and checked
    here, in the driver, before Ray or MLflow start."""
    from forkpop.workers.data import DataError

    spec = text_learner_spec(cfg)
    try:
        corpus = load_text(spec.text)
        return TextWorld(corpus, spec)
    except ValueError as e:
        raise DataError(str(e)) from None
