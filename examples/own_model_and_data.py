"""Your own model and your own data through forkpop's Python API, then a look at the lineage.

    python examples/own_model_and_data.py            # a few seconds, in-process, no MLflow
    python examples/own_model_and_data.py --ray      # the same on Ray actors

The model is named by import path: this file's module name, ``:``, the factory. The
folder of this script is on ``sys.path`` when it runs, so ``own_model_and_data:small_net``
imports here, and forkpop sends that folder along to Ray actors (which run no ``__main__`` of
ours), so it imports there too. A name registered with ``forkpop.register("models", ...)``
works as well, but only in this process: fine with ``backend="local"``, unknown to Ray actors.
Hence the ``if __name__ == "__main__"`` guard: importing this module must only define things.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

MODEL = f"{Path(__file__).stem}:small_net"  # the import path of small_net below


def small_net(n_features: int, n_classes: int, width: int = 32) -> nn.Module:
    """A Linear/Tanh chain: forkpop trains a group of its variants as one stacked step."""
    return nn.Sequential(nn.Linear(n_features, width), nn.Tanh(), nn.Linear(width, n_classes))


def write_table(folder: Path) -> Path:
    """scikit-learn's breast-cancer table as a CSV with a header and a text label column."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    path = folder / "cancer.csv"
    names = [n.replace(" ", "_") for n in d.feature_names]
    rows = [",".join([*names, "diagnosis"])]
    rows += [",".join([*(f"{v:g}" for v in x), d.target_names[y]]) for x, y in zip(d.data, d.target, strict=True)]
    path.write_text("\n".join(rows) + "\n")
    return path


def seed_chain(result) -> list[str]:  # noqa: ANN001 - a forkpop.Result
    """The final seed's ancestry, one line per generation: seed <- its teachers <- their seed."""
    lines, current = [], result.lineage[result.seed_id]
    while current.parents:
        teachers = result.lineage.parents(current.id)
        shown = ", ".join(f"{t.id} (niche {t.niche}, lr {t.genome['lr']:.3g})" for t in teachers)
        lines.append(f"gen {current.generation}: {current.id} distilled from {shown}")
        current = result.lineage[teachers[0].parents[0]]  # the seed those teachers forked from
    lines.append(f"gen {current.generation}: {current.id} (the initial seed)")
    return lines


def main(backend: str = "local") -> None:
    import forkpop

    with tempfile.TemporaryDirectory() as tmp:
        table = write_table(Path(tmp))
        config = {  # laid over the defaults, as a YAML file would be
            "run": {"name": "cancer", "generations": 3, "run_dir": str(Path(tmp) / "runs")},
            "data": {"source": "file", "path": str(table), "label": "diagnosis", "n_niches": 6, "min_niche_size": 16},
            "model": {"family": MODEL, "options": {"width": 24}},  # options: small_net's keyword arguments
            "population": {"size": 6},
            "selection": {"k": 3},
        }
        result = forkpop.run(config, backend=backend, tracking=False)  # no MLflow: a quick look
        print(result)
        print(f"final seed test accuracy {result.summary['seed_test_accuracy']:.3f}")
        print(f"engine: {', '.join(w['engine'] for w in result.summary['workers'])}")
        # The seed model sees inputs as forkpop fed them: standardized, so 0 is the mean patient.
        with torch.no_grad():
            probs = result.seed_model(torch.zeros(1, result.seed_model[0].in_features)).softmax(-1)
        print(f"seed model {type(result.seed_model).__name__}; p(classes | mean input) = {probs.tolist()}")
        print("lineage of the final seed:")
        for line in seed_chain(result):
            print("  " + line)
        again = forkpop.load(result.run_dir)  # the same, rebuilt from the run directory
        assert again.seed_id == result.seed_id and len(again.lineage) == len(result.lineage)


if __name__ == "__main__":
    main("ray" if "--ray" in sys.argv[1:] else "local")
