"""Checkpoints that grow linearly: each holds its generation's births and names the one before."""

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from forkpop.experiments.checkpoint import (
    CheckpointError,
    read_checkpoint,
    state_from_checkpoint,
    state_to_checkpoint,
    write_checkpoint,
)
from forkpop.experiments.observers import Checkpoints
from forkpop.population import Genome, Lineage, Origin, Variant
from forkpop.population.state import RunState, Seed

G = Genome({"lr": 0.1, "epochs": 2.0})


def _generation(lineage: Lineage, g: int, size: int, parent: str) -> Lineage:
    """A copy of ``lineage`` with generation ``g``'s forks and the seed distilled from two of them."""
    out = lineage.copy()
    forks = [Variant(f"g{g:02d}-v{i:03d}", G, g, Origin.FORK, (parent,), i) for i in range(size)]
    for v in forks:
        out.add(v)
    out.add(Variant(f"g{g + 1:02d}-seed", G, g + 1, Origin.DISTILL, (forks[0].id, forks[1].id)))
    return out


def _states(generations: int, size: int) -> list[RunState]:
    root = Variant("g00-seed", G, 0, Origin.SEED)
    lineage = Lineage()
    lineage.add(root)
    states = [RunState(0, (Seed(root, torch.zeros(4), 0.5),), lineage)]
    for g in range(generations):
        lineage = _generation(lineage, g, size, states[-1].seeds[0].variant.id)
        seed = Seed(lineage[f"g{g + 1:02d}-seed"], torch.full((4,), float(g)), 0.6)
        states.append(states[-1].evolve(seeds=(seed,), lineage=lineage, generation=g + 1))
    return states


def _write_chain(run_dir, states):
    for g in range(len(states) - 1):
        base = (g - 1, states[g].lineage) if g > 0 else None
        tensors, body = state_to_checkpoint(states[g + 1], base=base)
        write_checkpoint(run_dir, g, tensors, body)
    return sorted((run_dir / "checkpoints").glob("gen-*"))


def test_each_checkpoint_holds_its_generations_births_and_reads_as_the_whole_lineage(tmp_path):
    states = _states(4, 20)
    folders = _write_chain(tmp_path, states)
    bodies = [json.loads((f / "state.json").read_text()) for f in folders]
    assert "lineage" not in bodies[-1] and [b["lineage_base"] for b in bodies] == [None, 0, 1, 2]
    assert len(bodies[0]["births"]) == 1 + 20 + 1  # the root, the forks, the student
    assert [len(b["births"]) for b in bodies[1:]] == [21, 21, 21]
    assert [b["lineage_size"] for b in bodies] == [len(s.lineage) for s in states[1:]]
    sizes = [(f / "state.json").stat().st_size for f in folders]
    assert max(sizes[1:]) - min(sizes[1:]) < 0.02 * sizes[1]  # linear: each generation adds the same
    for g, f in enumerate(folders):
        tensors, body = read_checkpoint(f)
        assert Lineage.from_dict(body["lineage"]) == states[g + 1].lineage
        assert body.get("lineage")["variants"] and body["generation"] == g
        restored = state_from_checkpoint(tensors, body, run_seed=0)
        assert restored.lineage == states[g + 1].lineage and restored.generation == g + 1
        assert restored.seeds[0].variant == states[g + 1].seeds[0].variant


def test_a_broken_chain_is_a_checkpoint_error(tmp_path):
    folders = _write_chain(tmp_path, _states(3, 5))
    (folders[1] / "state.json").write_text('{"births": [')  # truncated
    _, body = read_checkpoint(folders[2])  # its own weights and JSON are fine
    with pytest.raises(CheckpointError, match="gen-0001"):
        body["lineage"]
    (folders[1] / "state.json").unlink()
    with pytest.raises(CheckpointError, match="gen-0001"):
        state_from_checkpoint(*read_checkpoint(folders[2]), run_seed=0)


def test_a_replaced_link_fails_the_size_check(tmp_path):
    states = _states(3, 5)
    folders = _write_chain(tmp_path, states)
    body = json.loads((folders[1] / "state.json").read_text())
    body["births"] = body["births"][:-1]
    (folders[1] / "state.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="not 19"):
        read_checkpoint(folders[2])[1]["lineage"]


def test_a_checkpoint_with_the_whole_lineage_still_reads_and_ends_a_chain(tmp_path):
    states = _states(3, 5)
    tensors, body = state_to_checkpoint(states[1])
    body = {k: v for k, v in body.items() if k not in ("births", "lineage_base", "lineage_size")}
    body["lineage"] = states[1].lineage.to_dict()  # as checkpoints were written before
    write_checkpoint(tmp_path, 0, tensors, body)
    tensors, body = state_to_checkpoint(states[2], base=(0, states[1].lineage))
    write_checkpoint(tmp_path, 1, tensors, body)
    for g in (0, 1):
        t, b = read_checkpoint(tmp_path / "checkpoints" / f"gen-{g:04d}")
        assert state_from_checkpoint(t, b, 0).lineage == states[g + 1].lineage


def test_a_plain_body_with_births_only_asks_for_read_checkpoint():
    states = _states(2, 3)
    tensors, body = state_to_checkpoint(states[2], base=(0, states[1].lineage))
    with pytest.raises(CheckpointError, match="read_checkpoint"):
        state_from_checkpoint(tensors, {**body, "generation": 1}, 0)
    tensors, body = state_to_checkpoint(states[1])  # no base: the births are the whole lineage
    assert state_from_checkpoint(tensors, {**body, "generation": 0}, 0).lineage == states[1].lineage


@dataclass
class _Record:
    generation: int


def test_the_checkpoint_observer_links_each_generation_to_the_one_before(tmp_path):
    states = _states(3, 4)
    obs = Checkpoints(tmp_path)
    for g in range(3):
        evals = SimpleNamespace(weights=torch.zeros(4, 4), variants=list(states[g + 1].lineage.generation(g))[:4])
        r = SimpleNamespace(
            generation=g, state=states[g + 1], before=states[g], evals=evals, teacher_ids=[0, 1], rng_state={}
        )
        obs.on_generation(r, _Record(g))
    bodies = [json.loads((tmp_path / "checkpoints" / f"gen-{g:04d}" / "state.json").read_text()) for g in range(3)]
    assert [b["lineage_base"] for b in bodies] == [None, 0, 1]
    assert {x["id"] for x in bodies[2]["births"]} == {v.id for v in states[3].lineage.since(states[2].lineage)}
    _, body = read_checkpoint(tmp_path / "checkpoints" / "gen-0002")
    assert Lineage.from_dict(body["lineage"]) == states[3].lineage


def test_lineage_copy_since_and_extend():
    states = _states(2, 3)
    a, b = states[1].lineage, states[2].lineage
    c = a.copy()
    assert c == a and c is not a and list(c) == list(a)
    new = b.since(a)
    assert [v.id for v in new] == [f"g01-v{i:03d}" for i in range(3)] + ["g02-seed"]
    c.extend([v.to_dict() for v in reversed(new)])  # children before parents: still added
    assert c == b and len(a) == len(states[1].lineage)
    with pytest.raises(ValueError, match="never appear"):
        Lineage().extend([new[0].to_dict()])
