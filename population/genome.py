"""Heritable hyper-parameters: typed, bounded genes and the genome that groups them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GeneKind = Literal["float", "log", "int"]


@dataclass(frozen=True)
class Gene:
    """One heritable hyper-parameter with its bounds.

    ``kind`` says how the gene is mutated: ``float`` on a linear scale, ``log`` on a log scale
    (learning rates, decays), ``int`` rounded to the nearest integer.
    """

    name: str
    low: float
    high: float
    init: float
    kind: GeneKind = "float"

    def __post_init__(self) -> None:
        if not self.low <= self.high:
            raise ValueError(f"gene {self.name}: low {self.low} > high {self.high}; set low <= high")
        if self.kind == "log" and self.low <= 0:
            raise ValueError(f"gene {self.name}: a log-scale gene needs low > 0 (got {self.low})")
        if not self.low <= self.init <= self.high:
            raise ValueError(
                f"gene {self.name}: init {self.init} outside [{self.low}, {self.high}]; move init inside the bounds"
            )

    def to_unit(self, value: float) -> float:
        """Map a value to [0, 1] on the gene's own scale (log for ``log`` genes)."""
        if self.high == self.low:
            return 0.0
        if self.kind == "log":
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)

    def from_unit(self, u: float) -> float:
        """Inverse of :meth:`to_unit`, clipped into bounds and rounded for ``int`` genes."""
        u = min(1.0, max(0.0, float(u)))
        if u in (0.0, 1.0):  # exact bounds, free of log/exp rounding
            v = self.low if u == 0.0 else self.high
        elif self.kind == "log":
            v = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            v = self.low + u * (self.high - self.low)
        v = min(self.high, max(self.low, v))
        return float(round(v)) if self.kind == "int" else v


@dataclass(frozen=True)
class GenomeSpec:
    """The ordered set of genes every genome of a population carries."""

    genes: tuple[Gene, ...]

    def __post_init__(self) -> None:
        names = [g.name for g in self.genes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate gene names in {names}")

    @property
    def names(self) -> list[str]:
        return [g.name for g in self.genes]

    def initial(self) -> Genome:
        return Genome({g.name: float(round(g.init)) if g.kind == "int" else float(g.init) for g in self.genes})

    def to_unit(self, genome: Genome) -> list[float]:
        """The genome as a vector in the unit cube, shape ``(n_genes,)``."""
        return [g.to_unit(genome[g.name]) for g in self.genes]

    def from_unit(self, u: list[float] | np.ndarray) -> Genome:
        return Genome({g.name: g.from_unit(x) for g, x in zip(self.genes, u, strict=True)})

    def sample(self, rng: np.random.Generator) -> Genome:
        """A genome drawn uniformly on each gene's own scale."""
        return self.from_unit(rng.random(len(self.genes)))


@dataclass(frozen=True)
class Genome:
    """Gene values by name. Immutable; mutation returns a new genome."""

    values: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def get(self, name: str, default: float) -> float:
        return self.values.get(name, default)

    def as_dict(self) -> dict[str, float]:
        return dict(self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Genome) and self.values == other.values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.values.items())))


def default_genome_spec() -> GenomeSpec:
    """Genes of the online learner: SGD recipe, local epochs and the weight noise at fork."""
    return GenomeSpec(
        (
            Gene("lr", 1e-3, 0.5, 0.1, "log"),
            Gene("momentum", 0.0, 0.99, 0.8),
            Gene("weight_decay", 1e-7, 1e-2, 1e-5, "log"),
            Gene("epochs", 1, 30, 20, "int"),
            Gene("fork_noise", 0.0, 0.05, 0.01),
        )
    )
