"""A variant: one member of the population, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from forkpop.population.genome import Genome


class Origin(str, Enum):
    """How a variant was born."""

    SEED = "seed"
    FORK = "fork"
    DISTILL = "distill"


@dataclass(frozen=True)
class Variant:
    """One member of the population.

    ``niche`` is the index of the data slice it learns from (``None`` for seeds, which learn
    from no niche of their own); ``parents`` holds one id for a fork and all teachers' ids for
    a distilled seed.
    """

    id: str
    genome: Genome
    generation: int
    origin: Origin
    parents: tuple[str, ...] = ()
    niche: int | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "genome": self.genome.as_dict(),
            "generation": self.generation,
            "origin": self.origin.value,
            "parents": list(self.parents),
            "niche": self.niche,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Variant:
        return cls(
            id=d["id"],
            genome=Genome({k: float(v) for k, v in d["genome"].items()}),
            generation=int(d["generation"]),
            origin=Origin(d["origin"]),
            parents=tuple(d["parents"]),
            niche=None if d["niche"] is None else int(d["niche"]),
        )
