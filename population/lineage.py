"""The lineage: the directed acyclic graph of every birth in a population run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from forkpop.population.variant import Variant


class Lineage:
    """Births in order; edges run from parent to child.

    A fork has one parent (its seed); a distilled seed has one parent per teacher.
    """

    def __init__(self) -> None:
        self._variants: dict[str, Variant] = {}

    def add(self, variant: Variant) -> None:
        if variant.id in self._variants:
            raise ValueError(f"variant {variant.id} is already in the lineage")
        missing = [p for p in variant.parents if p not in self._variants]
        if missing:
            raise ValueError(f"variant {variant.id} names unknown parents {missing}")
        self._variants[variant.id] = variant

    def __contains__(self, variant_id: object) -> bool:
        return variant_id in self._variants

    def __getitem__(self, variant_id: str) -> Variant:
        return self._variants[variant_id]

    def __iter__(self) -> Iterator[Variant]:
        return iter(self._variants.values())

    def __len__(self) -> int:
        return len(self._variants)

    def __eq__(self, other: object) -> bool:
        # Birth order is not part of identity: a lineage rebuilt from a store compares equal.
        return isinstance(other, Lineage) and self._by_id() == other._by_id()

    def _by_id(self) -> dict[str, Variant]:
        return dict(sorted(self._variants.items()))

    def parents(self, variant_id: str) -> list[Variant]:
        return [self._variants[p] for p in self._variants[variant_id].parents]

    def children(self, variant_id: str) -> list[Variant]:
        return [v for v in self._variants.values() if variant_id in v.parents]

    def generation(self, g: int) -> list[Variant]:
        return [v for v in self._variants.values() if v.generation == g]

    def edges(self) -> list[tuple[str, str]]:
        """``(parent_id, child_id)`` pairs."""
        return [(p, v.id) for v in self._variants.values() for p in v.parents]

    def ancestors(self, variant_id: str) -> set[str]:
        seen: set[str] = set()
        stack = list(self._variants[variant_id].parents)
        while stack:
            p = stack.pop()
            if p not in seen:
                seen.add(p)
                stack.extend(self._variants[p].parents)
        return seen

    def copy(self) -> Lineage:
        """A new lineage with the same births in the same order (variants are immutable, so
        they are shared): O(n) dictionary work, no records rebuilt."""
        out = Lineage()
        out._variants = dict(self._variants)
        return out

    def since(self, earlier: Lineage) -> list[Variant]:
        """The births of this lineage that ``earlier`` lacks, in birth order: what a
        generation added (a checkpoint stores only these; see :meth:`extend`)."""
        return [v for vid, v in self._variants.items() if vid not in earlier._variants]

    def extend(self, records: list[dict[str, Any]]) -> None:
        """Add births given as :meth:`Variant.to_dict` records, parents before children
        whatever order they come in (as :meth:`from_dict` does)."""
        pending = [Variant.from_dict(x) for x in records]
        # Insert parents before children whatever order the records came in.
        pending.sort(key=lambda v: (v.generation, v.origin != "seed", v.id))
        while pending:
            progressed = False
            rest = []
            for v in pending:
                if all(p in self for p in v.parents):
                    self.add(v)
                    progressed = True
                else:
                    rest.append(v)
            if not progressed:
                raise ValueError(f"lineage records name parents that never appear: {rest[0].id}")
            pending = rest

    def to_dict(self) -> dict[str, Any]:
        return {"variants": [v.to_dict() for v in self._variants.values()]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lineage:
        lineage = cls()
        lineage.extend(d["variants"])
        return lineage

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Lineage:
        return cls.from_dict(json.loads(text))
