"""Poisoned niches as a data feature, and what the run records about them."""

import numpy as np
import pytest

from experiments.runner import PopulationRun
from tests.conftest import tiny_config
from workers.data import DataError, DataSpec, load_data, trigger

pytestmark = pytest.mark.poison


def test_label_flips_touch_only_the_poisoned_niches_rows():
    clean = load_data(DataSpec())
    bad = load_data(DataSpec(poison_kind="label_flip", poison_niches=4))
    assert (
        len(bad.poisoned) == 4
        and bad.poisoned == load_data(DataSpec(poison_kind="label_flip", poison_niches=4)).poisoned
    )
    rows = np.concatenate([bad.niches[i] for i in bad.poisoned])
    changed = np.nonzero(bad.y_pool != clean.y_pool)[0]
    assert np.array_equal(np.sort(rows), changed)
    assert np.array_equal(bad.y_pool[rows], (clean.y_pool[rows] + 1) % 10)
    assert np.array_equal(bad.x_pool, clean.x_pool)
    for split in ("x_val", "y_val", "x_test", "y_test"):  # never altered
        assert np.array_equal(getattr(bad, split), getattr(clean, split))


def test_backdoor_stamps_the_trigger_and_the_target_on_a_share_of_samples():
    clean = load_data(DataSpec())
    bad = load_data(DataSpec(poison_kind="backdoor", poison_niches=2, poison_rate=0.5, backdoor_target=7))
    rows = np.nonzero((bad.x_pool != clean.x_pool).any(1))[0]
    niche_rows = np.concatenate([bad.niches[i] for i in bad.poisoned])
    assert set(rows) <= set(niche_rows) and abs(len(rows) - 0.5 * len(niche_rows)) <= 2
    assert (bad.y_pool[rows] == 7).all()
    assert np.array_equal(bad.x_pool[rows], trigger(clean.x_pool[rows]))
    img = trigger(clean.x_test[:1]).reshape(8, 8)
    assert (img[-3:-1, -3:-1] == 1.0).all() and np.array_equal(img[:5], clean.x_test[:1].reshape(8, 8)[:5])
    noisy = load_data(DataSpec(poison_kind="noise", poison_niches=1, noise_std=0.5))
    assert np.array_equal(noisy.y_pool, clean.y_pool) and not np.array_equal(noisy.x_pool, clean.x_pool)


@pytest.mark.parametrize(
    "spec, needle",
    [
        (DataSpec(poison_kind="bitflip", poison_niches=1), "unknown data.poison.kind"),
        (DataSpec(poison_kind="label_flip", poison_niches=40), "there are 16 niches"),
        (DataSpec(poison_kind="backdoor", poison_niches=1, backdoor_target=12), "is not a class"),
    ],
)
def test_bad_poison_settings_say_what_to_change(spec, needle):
    with pytest.raises(DataError, match=needle):
        load_data(spec)


def _poisoned_run(tmp_path, **selection):
    cfg = tiny_config(
        tmp_path,
        data={"poison": {"kind": "label_flip", "niches": 2}},
        selection={"k": None, **selection},
        run={"generations": 3},
    )
    run = PopulationRun(cfg, tracking_uri=f"sqlite:///{tmp_path}/m.db", progress=False)
    return run, run.run()


def test_the_run_knows_its_poisoned_variants_and_counts_poisoned_teachers(tmp_path):
    run, s = _poisoned_run(tmp_path / "a")
    assert len(s.poisoned_niches) == 2
    forks = {v.id: v for v in run.lineage}
    per_gen = [sum(forks[t].niche in s.poisoned_niches for t in h["teachers"]) for h in s.history]
    assert [h["poisoned_teachers"] for h in s.history] == per_gen and s.poisoned_teachers == sum(per_gen) > 0
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/a/m.db")
    kids = c.search_runs(["1"], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}' and tags.`forkpop.origin` = 'fork'")
    tagged = {r.data.tags["forkpop.variant_id"] for r in kids if r.data.tags.get("forkpop.poisoned") == "true"}
    assert tagged == {v for v, f in forks.items() if f.niche in s.poisoned_niches and f.origin.value == "fork"}
    # Screening by validation fitness keeps the flipped niches' variants out of the teachers.
    _, screened = _poisoned_run(tmp_path / "b", screen=2.0)
    assert screened.poisoned_teachers < s.poisoned_teachers
