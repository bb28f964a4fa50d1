"""The unit of evolution as plain data: genomes, variants, lineages, model families, forking."""

from importlib import import_module
from typing import Any

from forkpop.population.genome import Gene, Genome, GenomeSpec, default_genome_spec
from forkpop.population.lineage import Lineage
from forkpop.population.variant import Origin, Variant

# The torch-backed names load on first use: the plain-data ones above are what MLflow's
# tracking process needs, and it should not pay torch's import (seconds) to write records.
_LAZY = {
    "perturb_weights": "forkpop.population.forking",
    "MODEL_FAMILIES": "forkpop.population.models",
    "build_model": "forkpop.population.models",
    "flat_weights": "forkpop.population.models",
    "load_flat_weights": "forkpop.population.models",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'forkpop.population' has no attribute {name!r}")


__all__ = [
    "Gene",
    "Genome",
    "GenomeSpec",
    "default_genome_spec",
    "Lineage",
    "MODEL_FAMILIES",
    "build_model",
    "flat_weights",
    "load_flat_weights",
    "Origin",
    "Variant",
    "perturb_weights",
]
