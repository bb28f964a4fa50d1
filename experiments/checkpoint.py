"""Per-generation checkpoints of a run's state: weights (safetensors) and the rest (JSON), written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from forkpop.population.lineage import Lineage
from forkpop.population.state import RunState, Seed
from forkpop.population.variant import Variant
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    pass


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_checkpoint(run_dir: Path, generation: int, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write ``checkpoints/gen-NNNN`` through a temporary folder and one rename.

    ``state.json`` carries the sha256 of ``weights.safetensors`` so a load can verify it.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"gen-{generation:04d}"
    tmp = root / f".gen-{generation:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "weights.safetensors"))
    state = {**state, "generation": generation, "weights_sha256": _sha256(tmp / "weights.safetensors")}
    with open(tmp / "state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify one checkpoint folder; raises :class:`CheckpointError` in one line."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights_path = path / "weights.safetensors"
        if _sha256(weights_path) != state.get("weights_sha256"):
            raise CheckpointError(f"checkpoint {path} fails its sha256 check; it is truncated or was altered")
        return load_file(str(weights_path)), state
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is incomplete") from None


def write_seconds(run_dir: Path, generation: int, seconds: dict[str, float]) -> None:
    """The generation's timings beside its checkpoint (``seconds.json``, written atomically)."""
    folder = run_dir / "checkpoints" / f"gen-{generation:04d}"
    tmp = folder / ".seconds.json.tmp"
    tmp.write_text(json.dumps(seconds))
    os.replace(tmp, folder / "seconds.json")


def read_seconds(folder: Path) -> dict[str, float]:
    """The timings kept beside a checkpoint; empty when the run stopped before they were written."""
    try:
        raw = json.loads((folder / "seconds.json").read_text())
        return {str(k): float(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def state_to_checkpoint(state: RunState, teachers: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """A run's state as a checkpoint's tensors and JSON body (see :func:`state_from_checkpoint`):
    the best seed (``seed``), every species' seed (``seed_k``), the generated transfer pool and
    this generation's ``teachers``; the seeds' variants, lineage and fitness in JSON."""
    best = state.best_slot()
    tensors = {"seed": state.seeds[best].weights}
    for slot, (x, p, born) in state.generated.items():
        tensors.update({f"generated_x_{slot}": x, f"generated_p_{slot}": p, f"generated_born_{slot}": born})
    if state.n_species > 1:
        tensors.update({f"seed_{k}": s.weights.clone() for k, s in enumerate(state.seeds)})
    if teachers is not None:
        tensors["teachers"] = teachers.clone()
    body = {
        "seed": state.seeds[best].variant.to_dict(),
        "seed_val_accuracy": state.seeds[best].val,
        "species": [{"seed": s.variant.to_dict(), "val_accuracy": s.val} for s in state.seeds],
        "lineage": state.lineage.to_dict(),
    }
    return tensors, body


def state_from_checkpoint(tensors: dict[str, torch.Tensor], body: dict, run_seed: int) -> RunState:
    """The state a checkpoint of generation ``body["generation"]`` stored: the run goes on
    with the generation after it."""
    seeds = tuple(
        Seed(Variant.from_dict(sp["seed"]), tensors.get(f"seed_{k}", tensors["seed"]), float(sp["val_accuracy"]))
        for k, sp in enumerate(body["species"])
    )
    generated = {
        int(k.rsplit("_", 1)[1]): (tensors[k], tensors[k.replace("_x_", "_p_")], tensors[k.replace("_x_", "_born_")])
        for k in tensors
        if k.startswith("generated_x_")
    }
    return RunState(
        run_seed,
        seeds,
        Lineage.from_dict(body["lineage"]),
        generation=int(body["generation"]) + 1,
        generated=generated,
        teachers=tensors.get("teachers", torch.empty(0)),
    )
