"""The environment world (``data.world: env``): policies that live in gymnasium's classic control.

A variant is a policy network (``model.family`` mlp or linear: observation in, one logit per
action out). Its lifetime is ``env.lifetime_steps`` environment steps, spent an episode at a
time; before each episode its meta-controller, System M, chooses how:

- **act** (System B): run its own policy (actions drawn from it) and learn from the returns
  (REINFORCE: each action's log-probability weighted by its normalised discounted return to go);
- **observe** (System A): watch a demonstration, an episode of the seed it forked from acting
  greedily, and imitate it (cross-entropy to the seed's actions on the states it visited).
  The demonstration's steps are the variant's lifetime too: watching takes the world's time.

M is :class:`forkpop.workers.abm.Controller` over :data:`ENV_SIGNALS`, each about [0, 1],
computed by the variant itself: ``entropy`` (of its actions on its last own episode, over
log of the number of actions), ``own_return`` (its last own episode's return over the
episode limit), ``demo_gap`` (the last demonstration's return minus its own, over the limit,
in [-1, 1]), ``progress`` (how much its actions' probabilities on a fixed probe of states moved
over the last episode), ``surprise`` (its last own return's distance to the running mean of
its returns, over the limit) and ``time`` (the share of the lifetime spent). Its numbers are
the ``m_*`` genes; ``env.policy`` replaces it by a fixed one (``act``, ``observe``, ``random``).

Fitness is the mean greedy return over ``env.eval_episodes`` episodes whose seeds only
selection uses (split ``probe``); elitism compares a student with its seed episode by episode
on the ``accept`` seeds; ``test`` (``env.report_episodes`` more) is reported only. A niche is
its own stream of episode seeds. Distillation is policy distillation
(:mod:`forkpop.selection.policy_distiller`, ``distill.method: policy_kd``): the teachers'
action distributions on the states they visit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from forkpop.population.models import linear_chain
from forkpop.population.optim import AdamState, adam_step
from forkpop.population.world import World
from forkpop.workers.abm import Controller
from forkpop.workers.data import DataError
from forkpop.workers.learner import ForkTask, LearnResult, ModelSpec, fork_weights
from torch import nn

ENV_SIGNALS = ("entropy", "own_return", "demo_gap", "progress", "surprise", "time")
SPLIT_CODES = {"probe": 1, "accept": 2, "test": 3, "transfer": 4}


class EnvError(DataError):
    """An environment the world cannot host (said in one line, exit status 2)."""


def make_env(env_id: str) -> tuple[Any, int]:
    """The environment ``env_id`` without gymnasium's wrappers (the world keeps its own episode
    limit, the registered one) and that limit."""
    import gymnasium as gym

    try:
        env = gym.make(env_id)
    except Exception as e:  # gymnasium's errors name the id; one line is enough
        raise EnvError(f"env.id={env_id!r}: {str(e).splitlines()[0]}; use a gymnasium classic-control id") from None
    limit = env.spec.max_episode_steps or 500
    if not hasattr(env.action_space, "n") or len(env.observation_space.shape or ()) != 1:
        raise EnvError(f"env.id={env_id!r} needs discrete actions and flat observations; use e.g. CartPole-v1")
    return env.unwrapped, int(limit)


class NumpyPolicy:
    """A chain of Linear layers with ReLU or tanh between them, on flat weights in numpy (an
    environment step is one observation: numpy is ten times faster than a module call)."""

    def __init__(self, model: nn.Module):
        chain = linear_chain(model)
        if chain is None:
            raise EnvError(
                "the environment world's policies are Linear layers with ReLU or tanh between them; "
                "use model.family linear or mlp"
            )
        self.shapes: list[tuple[int, int]] = []
        self.acts: list[str] = []
        for m in chain:
            if isinstance(m, nn.Linear):
                self.shapes.append((m.out_features, m.in_features))
            elif isinstance(m, (nn.ReLU, nn.Tanh)):
                self.acts.append("relu" if isinstance(m, nn.ReLU) else "tanh")
            else:
                raise EnvError(
                    f"the environment world's policies take ReLU or tanh, not {type(m).__name__}; "
                    "use model.family linear or mlp"
                )
        self.n = sum(o * i + o for o, i in self.shapes)
        self.flat = np.zeros(self.n)

    def load(self, flat: np.ndarray | torch.Tensor) -> NumpyPolicy:
        f = flat.detach().double().numpy() if isinstance(flat, torch.Tensor) else np.asarray(flat, dtype=np.float64)
        self.flat = f.copy()
        self._views()
        return self

    def _views(self) -> None:
        self.layers, k = [], 0
        for o, i in self.shapes:
            w = self.flat[k : k + o * i].reshape(o, i)
            b = self.flat[k + o * i : k + o * i + o]
            self.layers.append((w, b))
            k += o * i + o

    def forward(self, s: np.ndarray, keep: bool = False) -> Any:
        """Logits of ``s`` ``(d,)`` or ``(T, d)``; with ``keep`` also each layer's input."""
        h, ins = s, []
        for j, (w, b) in enumerate(self.layers):
            ins.append(h)
            h = h @ w.T + b
            if j < len(self.acts):
                h = np.maximum(h, 0.0) if self.acts[j] == "relu" else np.tanh(h)
        return (h, ins) if keep else h

    def hidden(self, s: np.ndarray) -> np.ndarray:
        """The last layer's input (the representation diversity compares)."""
        return self.forward(s, keep=True)[1][-1]

    def grad(self, s: np.ndarray, dlogits: np.ndarray) -> np.ndarray:
        """d(sum(dlogits * logits)) / d(weights), flat, for states ``s`` ``(T, d)``."""
        _, ins = self.forward(s, keep=True)
        g = [None] * len(self.layers)
        d = dlogits
        for j in range(len(self.layers) - 1, -1, -1):
            w, _ = self.layers[j]
            g[j] = (d.T @ ins[j], d.sum(0))
            if j:
                d = d @ w
                h = ins[j]
                d = d * (h > 0) if self.acts[j - 1] == "relu" else d * (1 - h * h)
        return np.concatenate([np.concatenate([gw.ravel(), gb]) for gw, gb in g])


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def episode(
    env: Any, policy: NumpyPolicy, seed: int, limit: int, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One episode from ``env.reset(seed=seed)``: greedy without ``rng``, actions drawn with it.
    Returns the states ``(T, d)``, the actions ``(T,)`` and the rewards ``(T,)``."""
    s, _ = env.reset(seed=int(seed))
    states, actions, rewards = [], [], []
    for _ in range(limit):
        z = policy.forward(np.asarray(s, dtype=np.float64))
        if rng is None:
            a = int(z.argmax())
        else:
            p = softmax(z)
            a = int(min(np.searchsorted(np.cumsum(p), rng.random()), len(p) - 1))
        states.append(s)
        actions.append(a)
        s, r, term, trunc, _ = env.step(a)
        rewards.append(r)
        if term or trunc:
            break
    return np.asarray(states, dtype=np.float64), np.asarray(actions), np.asarray(rewards, dtype=np.float64)


def returns(env: Any, policy: NumpyPolicy, seeds: np.ndarray, limit: int) -> np.ndarray:
    """Greedy return of each episode seed ``(len(seeds),)``."""
    return np.array([episode(env, policy, int(s), limit)[2].sum() for s in seeds])


def episode_seeds(run_seed: int, split: str, n: int) -> np.ndarray:
    """The episode seeds of ``split`` (``probe``: selection's, ``accept``: elitism's, ``test``:
    reported only, ``transfer``: distillation's visits), disjoint ranges of the same stream."""
    code = SPLIT_CODES[split]
    return code * 10**7 + np.random.default_rng([run_seed, code, 0xE]).choice(10**7, size=n, replace=False)


@dataclass
class EnvLifetime:
    """What one lifetime did: its weights, the mode of each episode (``B`` acted, ``A``
    observed) with the lifetime step it started at and its length, its own episodes'
    returns, and the signals M saw before each episode."""

    weights: np.ndarray
    modes: list[str]
    starts: list[int]
    lengths: list[int]
    own_returns: list[float]
    signals: list[list[float]]

    @property
    def switches(self) -> int:
        return sum(a != b for a, b in zip(self.modes, self.modes[1:], strict=False))

    def observe_share(self) -> float:
        """Share of the lifetime's steps spent observing."""
        total = sum(self.lengths)
        return sum(n for m, n in zip(self.modes, self.lengths, strict=True) if m == "A") / max(total, 1)


def live_env(
    policy: NumpyPolicy,
    weights: np.ndarray,
    demo: NumpyPolicy,
    env: Any,
    steps: int,
    limit: int,
    m: Any,
    probe: np.ndarray,
    rng: np.random.Generator,
    *,
    lr: float = 0.05,
    gamma: float = 0.99,
) -> EnvLifetime:
    """One lifetime of ``steps`` environment steps from ``weights`` (see the module); ``demo``
    is the seed whose greedy episodes a variant that observes imitates; ``m(signals, rng)`` says
    act (True) or observe."""
    policy.load(weights)
    flat = torch.from_numpy(policy.flat)  # the policy's weights, shared: Adam steps them in place
    opt = AdamState([flat])
    n_act = policy.shapes[-1][0]
    out = EnvLifetime(policy.flat, [], [], [], [], [])
    used, own, demo_ret, mean_ret, n_own = 0, 0.0, 0.0, 0.0, 0
    entropy, progress, surprise = 1.0, 0.0, 0.0
    probe_p = softmax(policy.forward(probe))
    while used < steps:
        s = {
            "entropy": entropy,
            "own_return": own / limit,
            "demo_gap": max(-1.0, min(1.0, (demo_ret - own) / limit)),
            "progress": min(1.0, progress),
            "surprise": surprise,
            "time": used / steps,
        }
        out.signals.append([s[k] for k in ENV_SIGNALS])
        act = bool(m(s, rng))
        n = min(limit, steps - used)
        seed = int(rng.integers(2**31))
        if act:
            x, a, r = episode(env, policy, seed, n, rng)
            T = len(a)
            g = np.zeros(T)
            run = 0.0
            for t in range(T - 1, -1, -1):
                run = r[t] + gamma * run
                g[t] = run
            adv = (g - g.mean()) / (g.std() + 1e-8) if T > 1 else np.zeros(T)
            p = softmax(policy.forward(x))
            entropy = float(-(p * np.log(np.clip(p, 1e-12, 1))).sum(1).mean() / math.log(n_act))
            d = (np.eye(n_act)[a] - p) * adv[:, None] / T  # d log pi(a|s) / d logits, weighted
            own = float(r.sum())
            n_own += 1
            surprise = min(1.0, abs(own - mean_ret) / limit) if n_own > 1 else 0.0
            mean_ret += (own - mean_ret) / n_own
            out.own_returns.append(own)
        else:
            x, a, r = episode(env, demo, seed, n)
            T = len(a)
            demo_ret = float(r.sum())
            p = softmax(policy.forward(x))
            d = (np.eye(n_act)[a] - p) / T  # ascending the log-likelihood of the seed's actions
        adam_step([flat], [torch.from_numpy(-policy.grad(x, d))], opt, lr=lr)  # ascends the objective
        out.modes.append("B" if act else "A")
        out.starts.append(used)
        out.lengths.append(T)
        used += T
        new_p = softmax(policy.forward(probe))
        progress = float(np.abs(new_p - probe_p).sum(1).mean()) * 10.0
        probe_p = new_p
    out.weights = policy.flat.copy()
    return out


class FixedPolicy:
    """``act`` (System B only), ``observe`` (System A only) or ``random`` (a fair coin)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, s: dict, rng: np.random.Generator) -> bool:
        if self.name == "act":
            return True
        if self.name == "observe":
            return False
        return bool(rng.random() < 0.5)


def controller(policy: str, genome: dict[str, float]) -> Any:
    if policy == "evolved":
        c = Controller.from_genome(genome, ENV_SIGNALS)
        return lambda s, rng: c.score(s) > 0
    return FixedPolicy(policy)


@dataclass(frozen=True)
class EnvSpec:
    """What every environment learner shares (picklable: the pool ships it to its workers)."""

    env_id: str
    model: ModelSpec
    run_seed: int
    lifetime_steps: int = 5000
    eval_episodes: int = 5
    gamma: float = 0.99
    policy: str = "evolved"
    probe_states: int = 256
    torch_threads: int = 1
    learner: str = "forkpop.workers.env_world:EnvLearner"
    device: str = "cpu"  # numpy policies: the pool asks no GPU for them
    engine: str = "env"


def _dims(env: Any) -> tuple[int, int]:
    return int(env.observation_space.shape[0]), int(env.action_space.n)


def probe_states(env: Any, n: int, seed: int, limit: int) -> np.ndarray:
    """``n`` states no variant chooses: visited by uniformly random actions from fixed seeds."""
    rng = np.random.default_rng([seed, 0x5A])
    out: list[np.ndarray] = []
    k = 0
    while sum(len(x) for x in out) < n:
        s, _ = env.reset(seed=int(10**9 + k))
        k += 1
        for _ in range(limit):
            out.append(np.asarray(s, dtype=np.float64)[None])
            s, _, term, trunc, _ = env.step(int(rng.integers(env.action_space.n)))
            if term or trunc:
                break
    return np.concatenate(out)[:n]


class EnvLearner:
    """Hosts variants of the environment world: each lives ``lifetime_steps`` steps."""

    def __init__(self, spec: EnvSpec):
        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.env, self.limit = make_env(spec.env_id)
        d, a = _dims(self.env)
        self.policy, self.demo = NumpyPolicy(spec.model.build(d, a)), NumpyPolicy(spec.model.build(d, a))
        self.probe = probe_states(self.env, spec.probe_states, spec.run_seed, self.limit)
        self.eval_seeds = episode_seeds(spec.run_seed, "probe", spec.eval_episodes)

    def describe(self) -> dict:
        return {"device": "cpu", "engine": "env", "reason": "", "kernel": "numpy", "kernel_reason": ""}

    def learn(self, seed_weights: torch.Tensor, tasks: list[ForkTask]) -> tuple[torch.Tensor, list[LearnResult]]:
        out_w, results = [], []
        for task in tasks:
            t0 = time.perf_counter()
            seed, w = fork_weights(seed_weights, task)
            rng = np.random.default_rng([task.seed, task.niche, 0xE1])
            self.demo.load(seed)
            lt = live_env(
                self.policy, w.double().numpy(), self.demo, self.env, self.spec.lifetime_steps, self.limit,
                controller(self.spec.policy, task.genome), self.probe, rng,
                lr=float(task.genome.get("lr", 0.05)), gamma=self.spec.gamma,
            )  # fmt: skip
            weights = torch.from_numpy(lt.weights).to(seed.dtype)
            ok = bool(torch.isfinite(weights).all())
            fit = (
                float(returns(self.env, self.policy.load(lt.weights), self.eval_seeds, self.limit).mean()) if ok else 0
            )
            own = lt.own_returns
            results.append(
                LearnResult(
                    task.variant_id,
                    val_accuracy=fit if ok else float("nan"),
                    loss=[-x for x in own],  # one value per own episode: minus its return
                    samples=int(sum(lt.lengths)),
                    seconds=time.perf_counter() - t0,
                    status="ok" if ok else "diverged",
                    reason="" if ok else "non-finite weights",
                    metrics={
                        "env.switches": float(lt.switches),
                        "env.observe_share": lt.observe_share(),
                        "env.episodes": float(len(lt.modes)),
                        "env.last_own_return": float(own[-1]) if own else float("nan"),
                    },
                    trace={"modes": "".join(lt.modes), "starts": lt.starts, "lengths": lt.lengths, "returns": own},
                )
            )
            out_w.append(weights if ok else seed.clone())
        return torch.stack(out_w), results


class EnvWorld(World):
    """Policies in a gymnasium environment (see the module)."""

    name = "env"

    def __init__(self, spec: EnvSpec, n_niches: int, report_episodes: int = 10, accept_episodes: int = 20):
        self.spec = spec
        self.env, self.limit = make_env(spec.env_id)
        self.obs_dim, self.n_actions = _dims(self.env)
        self._n_niches = n_niches
        self.seeds = {
            "probe": episode_seeds(spec.run_seed, "probe", spec.eval_episodes),
            "accept": episode_seeds(spec.run_seed, "accept", accept_episodes),
            "test": episode_seeds(spec.run_seed, "test", report_episodes),
        }
        self.probe = probe_states(self.env, spec.probe_states, spec.run_seed, self.limit)
        self._policy = NumpyPolicy(self.build_model())
        self._cache: dict[tuple[int, str], np.ndarray] = {}

    @property
    def n_niches(self) -> int:
        return self._n_niches

    def niche_size(self, niche: int) -> int:
        return self.spec.lifetime_steps

    def describe(self) -> dict[str, Any]:
        return {
            "world": self.name,
            "env": self.spec.env_id,
            "episode_limit": self.limit,
            "observation_dim": self.obs_dim,
            "actions": self.n_actions,
            # the policy's input and outputs, as a classification world names them (forkpop.load rebuilds it)
            "input_shape": [self.obs_dim],
            "classes": [f"action {a}" for a in range(self.n_actions)],
            "lifetime_steps": self.spec.lifetime_steps,
            "policy": self.spec.policy,
            "signals": list(ENV_SIGNALS),
            "episodes": {k: len(v) for k, v in self.seeds.items()},
            "test_read_for_selection": 0,
        }

    def build_model(self, seed: int = 0) -> nn.Module:
        return self.spec.model.build(self.obs_dim, self.n_actions, seed=seed)

    def learner_spec(self) -> EnvSpec:
        return self.spec

    def inputs(self, split: str) -> torch.Tensor:
        """A fixed set of states (visited by random actions): the probe diversity and
        entropies are measured on, for every split."""
        return torch.from_numpy(self.probe).float()

    def predict(self, model: nn.Module, weights: torch.Tensor, x: torch.Tensor, with_hidden: bool = False) -> Any:
        xs = x.double().numpy()
        probs, hidden = [], []
        for w in weights.reshape(-1, weights.shape[-1]):
            pol = self._policy.load(w)
            probs.append(torch.from_numpy(softmax(pol.forward(xs))).float())
            if with_hidden:
                hidden.append(torch.from_numpy(pol.hidden(xs)).float())
        return torch.stack(probs), hidden

    def episode_returns(self, weights: torch.Tensor, split: str) -> np.ndarray:
        """Greedy return of ``weights`` on each of ``split``'s episode seeds."""
        return returns(self.env, self._policy.load(weights), self.seeds[split], self.limit)

    def fitness(self, model: nn.Module, weights: torch.Tensor, split: str = "probe") -> float:
        if not bool(torch.isfinite(weights).all()):
            return float("nan")
        return float(self.episode_returns(weights, split).mean())

    def fitness_of(self, probs: torch.Tensor, split: str = "probe") -> torch.Tensor:
        """A return needs a policy in the environment, not predictions: NaN (the teachers'
        ensemble has no return here)."""
        return torch.full((len(probs),), float("nan"))

    def acceptance_scores(self, model: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.episode_returns(weights, "accept"))

    def visit(self, weights: torch.Tensor, seeds: np.ndarray, max_states: int) -> np.ndarray:
        """States the greedy policy ``weights`` visits from ``seeds`` (at most ``max_states``)."""
        pol = self._policy.load(weights)
        xs: list[np.ndarray] = []
        for s in seeds:
            xs.append(episode(self.env, pol, int(s), self.limit)[0])
            if sum(len(x) for x in xs) >= max_states:
                break
        return np.concatenate(xs)[:max_states]

    def transfer_seeds(self, generation: int, n: int) -> np.ndarray:
        return episode_seeds(self.spec.run_seed * 1000 + generation, "transfer", n)

    def measure(self, result: Any) -> dict[str, Any]:
        """``env.median_return``: the learned variants' median greedy return on the test
        episodes at the end of their lifetimes, ``env.seed_return`` the seed's (after this
        generation's elitism; reported only, never read by a decision), the median switches
        and mean share of steps observed; the mode traces as an artifact (``modes/``)."""
        ev = result.evals
        alive = [i for i, r in enumerate(ev.results) if r.status == "ok"]
        rets = [float(self.episode_returns(ev.weights[i], "test").mean()) for i in alive]
        ms = [ev.results[i].metrics for i in alive]
        seed_return = result.figures.get("evaluate", {}).get("seed_test_accuracy")  # the held-out report's
        if seed_return is None:
            seed_return = self.fitness(result.model, result.state.seeds[result.state.best_slot()].weights, "test")
        figures = {
            "env.median_return": float(np.median(rets)) if rets else float("nan"),
            "env.seed_return": float(seed_return),
            "env.switches": float(np.median([m["env.switches"] for m in ms])) if ms else float("nan"),
            "env.observe_share": float(np.mean([m["env.observe_share"] for m in ms])) if ms else float("nan"),
        }
        traces = {ev.results[i].variant_id: ev.results[i].trace for i in alive}
        return {"world": figures, "artifacts": {f"modes/gen-{result.generation:04d}.json": json.dumps(traces)}}


def env_world(cfg: Any) -> EnvWorld:
    """The environment world of ``cfg`` (``data.world: env``)."""
    from forkpop.experiments.specs import model_spec

    e = cfg.env  # env.policy is one of the config's (EnvConfig.policy)
    spec = EnvSpec(
        e.id, model_spec(cfg), cfg.run.seed, e.lifetime_steps, e.eval_episodes, e.gamma, e.policy, e.probe_states,
        cfg.run.torch_threads,
    )  # fmt: skip
    return EnvWorld(spec, cfg.n_niches, e.report_episodes, e.accept_episodes)
