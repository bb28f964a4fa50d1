"""Fitness-based selection (DEAP behind one adapter) and distillation of teachers into a seed."""

from forkpop.selection.aggregate import AGGREGATORS
from forkpop.selection.distill import INITS, accuracy_of, distill, ensemble_accuracy, student_init
from forkpop.selection.operators import (
    INHERIT,
    SELECTORS,
    crossover_genomes,
    inherit_genome,
    mutate_genome,
    select,
)

__all__ = [
    "AGGREGATORS",
    "INHERIT",
    "INITS",
    "SELECTORS",
    "accuracy_of",
    "crossover_genomes",
    "distill",
    "ensemble_accuracy",
    "inherit_genome",
    "mutate_genome",
    "select",
    "student_init",
]
