"""Screens: plain functions over a generation's evaluations that keep variants from teaching.

Each takes the :class:`~forkpop.population.state.Evaluations` (and what it needs of the
world) and returns the indices it flags; the core unites them before ``strategy.tell``.
``agreement`` works on one teacher group, inside distillation.
"""

from __future__ import annotations

from typing import Any

from forkpop.population.state import Evaluations
from forkpop.population.world import World
from forkpop.selection.species import fitness_outliers, peer_label_screen, screen_by_agreement


def fitness_screen(evals: Evaluations, z: float) -> set[int]:
    """Variants whose probe fitness is below ``median - z * MAD`` of the live ones (a
    poisoned niche's variants score low on the clean probe); ``z <= 0``: none."""
    return fitness_outliers(evals.fitness, z)


def peer_label_screen_of(
    evals: Evaluations, world: World, *, mode: str, suspect: float, min_class_recall: float
) -> set[int]:
    """Learned variants whose niche labels (as given) the ensemble of the others contradicts,
    among those the label audit did not read anew (see
    :func:`forkpop.selection.species.peer_label_screen`). Worlds without labels: none."""
    labels, probe_labels = world.labels("transfer"), world.labels("probe")
    alive = evals.live
    if mode == "none" or len(alive) < 3 or labels is None or probe_labels is None:
        return set()
    flagged = peer_label_screen(
        evals.probs("transfer").numpy(),
        labels.numpy(),
        [world.niche_rows(evals.variants[i].niche) for i in alive],
        evals.probs("probe").numpy(),
        probe_labels.numpy(),
        suspect,
        min_class_recall,
    )
    return {alive[j] for j in flagged if not getattr(evals.results[alive[j]], "audit", "")}


def agreement_screen(evals: Evaluations, members: list[int], z: float) -> list[int]:
    """The members of a teacher group to keep: those whose agreement with the others on the
    transfer set is not an outlier (``z <= 0`` or fewer than 3 members: all)."""
    if z <= 0 or len(members) < 3:
        return members
    preds = evals.probs("transfer", members).argmax(-1).numpy()
    return [members[j] for j in screen_by_agreement(preds, z)]


SCREENS: dict[str, Any] = {"fitness": fitness_screen, "peer_labels": peer_label_screen_of}
