"""Per-generation checkpoints of a run's state: weights (safetensors) and the rest (JSON), written atomically.

A checkpoint's lineage is linear in the run's length: ``gen-NNNN/state.json`` holds the
births of its generation only (``births``: the generation's forks and students, as
:meth:`Variant.to_dict` records), with ``lineage_base``, the generation of the checkpoint that
holds the rest (None: the births are the whole lineage), and ``lineage_size``, the number of
births of the whole. :func:`read_checkpoint` gives ``body["lineage"]`` (``{"variants": [...]}``,
as a checkpoint that stored the whole lineage, which it also still reads) by following
``lineage_base`` back, on first use.
"""

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


class CheckpointBody(dict):
    """A checkpoint's JSON body. Of a checkpoint that stores its generation's births only,
    ``body["lineage"]`` (and ``body.get("lineage")``) is the whole lineage, assembled from the
    chain of earlier checkpoints when first asked for (so reading every checkpoint of a run,
    as a resume does for the records, costs one read each); a broken chain raises
    :class:`CheckpointError`."""

    def __init__(self, data: dict[str, Any], folder: Path):
        super().__init__(data)
        self.folder = folder

    def __missing__(self, key: str) -> Any:
        if key == "lineage" and "births" in self:
            value = {"variants": lineage_records(self.folder, self)}
            self[key] = value
            return value
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def _state_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}); it is incomplete") from None


def lineage_records(folder: Path, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The whole lineage of the checkpoint in ``folder`` (whose body is ``body``) as variant
    records, oldest checkpoint's first: its ``births`` and those of the checkpoints its
    ``lineage_base`` chain names. Raises :class:`CheckpointError` when a link is missing or
    unreadable, or the births do not add up to ``lineage_size``."""
    if "births" not in body:
        return list(body["lineage"]["variants"])
    chunks = [body["births"]]
    seen = {folder.name}
    base = body.get("lineage_base")
    while base is not None:
        link = folder.parent / f"gen-{int(base):04d}"
        if link.name in seen:
            raise CheckpointError(f"checkpoint {folder}'s lineage chain loops at {link.name}")
        seen.add(link.name)
        earlier = _state_json(link)
        if "births" not in earlier:  # a checkpoint that stored the whole lineage ends the chain
            chunks.append(earlier["lineage"]["variants"])
            break
        chunks.append(earlier["births"])
        base = earlier.get("lineage_base")
    records = [r for chunk in reversed(chunks) for r in chunk]
    size = body.get("lineage_size")
    if size is not None and len(records) != int(size):
        raise CheckpointError(
            f"checkpoint {folder}'s lineage has {len(records)} births over its chain, not {size}; "
            "an earlier checkpoint was replaced"
        )
    return records


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify one checkpoint folder; raises :class:`CheckpointError` in one line.

    The body is a :class:`CheckpointBody`: its ``lineage`` is the whole lineage even where the
    checkpoint stores only its generation's births."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights_path = path / "weights.safetensors"
        if _sha256(weights_path) != state.get("weights_sha256"):
            raise CheckpointError(f"checkpoint {path} fails its sha256 check; it is truncated or was altered")
        return load_file(str(weights_path)), CheckpointBody(state, path)
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


def state_to_checkpoint(
    state: RunState,
    teachers: torch.Tensor | None = None,
    *,
    base: tuple[int, Lineage] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """A run's state as a checkpoint's tensors and JSON body (see :func:`state_from_checkpoint`):
    the best seed (``seed``), every species' seed (``seed_k``), the generated transfer pool and
    this generation's ``teachers``; the seeds' variants, lineage and fitness in JSON.

    With ``base = (generation, lineage)``, the lineage the checkpoint of that generation holds,
    the body keeps only the births since (``births``, ``lineage_base``, ``lineage_size``): a
    run's checkpoints then grow linearly with its generations. Without it, ``births`` is the
    whole lineage (``lineage_base`` None)."""
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
    }
    births = list(state.lineage) if base is None else state.lineage.since(base[1])
    body["births"] = [v.to_dict() for v in births]
    body["lineage_base"] = None if base is None else int(base[0])
    body["lineage_size"] = len(state.lineage)
    return tensors, body


def state_from_checkpoint(tensors: dict[str, torch.Tensor], body: dict, run_seed: int) -> RunState:
    """The state a checkpoint of generation ``body["generation"]`` stored: the run goes on
    with the generation after it. ``body`` as :func:`read_checkpoint` gives it (its
    ``lineage`` assembled from the chain of checkpoints), or with a whole ``lineage``."""
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
        _lineage_of(body),
        generation=int(body["generation"]) + 1,
        generated=generated,
        teachers=tensors.get("teachers", torch.empty(0)),
    )


def _lineage_of(body: dict) -> Lineage:
    if isinstance(body, CheckpointBody) or "lineage" in body:
        return Lineage.from_dict(body["lineage"])
    if body.get("lineage_base") is None:  # the births are the whole lineage
        return Lineage.from_dict({"variants": body["births"]})
    raise CheckpointError(
        f"this checkpoint body holds generation {body.get('generation')}'s births only; "
        "read it with read_checkpoint(folder), which follows its chain"
    )
