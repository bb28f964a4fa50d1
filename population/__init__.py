"""The unit of evolution as plain data: genomes, variants, lineages, model families, forking."""

from population.forking import perturb_weights
from population.genome import Gene, Genome, GenomeSpec, default_genome_spec
from population.lineage import Lineage
from population.models import MODEL_FAMILIES, build_model, flat_weights, load_flat_weights
from population.variant import Origin, Variant

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
