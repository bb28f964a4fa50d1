"""The unit of evolution as plain data: genomes, variants, lineages, model families, forking."""

from forkpop.population.forking import perturb_weights
from forkpop.population.genome import Gene, Genome, GenomeSpec, default_genome_spec
from forkpop.population.lineage import Lineage
from forkpop.population.models import MODEL_FAMILIES, build_model, flat_weights, load_flat_weights
from forkpop.population.variant import Origin, Variant

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
