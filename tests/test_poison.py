"""Poisoned niches as a data feature, and what the run records about them."""

import numpy as np
import pytest
from forkpop.experiments.runner import PopulationRun
from forkpop.workers.data import DataError, DataSpec, load_data, trigger

from tests.conftest import tiny_config

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


def _poisoned_run(tmp_path, audit="none", **selection):
    cfg = tiny_config(
        tmp_path,
        data={"poison": {"kind": "label_flip", "niches": 2}, "audit": {"mode": audit}},
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
    # The label audit's peer screen keeps them out at generation 0, before the seed can judge.
    _, audited = _poisoned_run(tmp_path / "c", audit="relabel")
    assert audited.history[0]["label_screened"] >= 1 and audited.history[0]["poisoned_teachers"] == 0
    assert audited.unaudited_poisoned_teachers < s.poisoned_teachers


# -- the label audit -------------------------------------------------------------------------


def _audit_case():
    """Three niches of 40 samples over 4 classes; the seed predicts the true class except where said."""
    from forkpop.workers.learner import AuditSpec, audit_labels

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 120)
    niches = (np.arange(0, 40), np.arange(40, 80), np.arange(80, 120))
    return truth, niches, AuditSpec, audit_labels


def test_the_audit_undoes_a_systematic_flip_and_leaves_clean_niches_alone():
    truth, niches, AuditSpec, audit_labels = _audit_case()
    given = truth.copy()
    given[niches[1]] = (truth[niches[1]] + 1) % 4  # niche 1 flipped
    pred = truth.copy()
    pred[[3, 50]] = (truth[[3, 50]] + 2) % 4  # the seed errs on one sample of niche 0 and one of niche 1
    read, rep = audit_labels(pred, given, niches, 0.9, np.ones(4), AuditSpec())
    assert [r.suspect for r in rep] == [False, True, False]
    assert rep[1].mapped == {(c + 1) % 4: c for c in range(4)}
    # The map, not the seed, decides in the flipped niche: sample 50 gets its true class back.
    assert (read[niches[1]] == truth[niches[1]]).all() and rep[1].relabelled == 40
    assert (read[niches[0]] == given[niches[0]]).all() and (read[niches[2]] == given[niches[2]]).all()
    assert "map" in rep[1].describe() and rep[0].describe() == ""


def test_the_audit_keeps_labels_of_a_class_the_seed_has_not_learned():
    truth, niches, AuditSpec, audit_labels = _audit_case()
    given = truth.copy()
    given[niches[2]] = 3  # niche 2 holds only class 3, and its labels are right
    pred = truth.copy()
    pred[niches[2]] = 0  # a seed that never learned class 3 calls them all 0
    recall = np.array([1.0, 1.0, 1.0, 0.0])
    read, rep = audit_labels(pred, given, niches, 0.75, recall, AuditSpec())
    assert rep[2].suspect and rep[2].mapped == {} and (read == given).all()


def test_the_audit_waits_for_a_competent_seed_and_can_be_off():
    truth, niches, AuditSpec, audit_labels = _audit_case()
    given = truth.copy()
    given[niches[1]] = (truth[niches[1]] + 1) % 4
    for seed_acc, spec in [(0.3, AuditSpec()), (0.9, AuditSpec(mode="none"))]:
        read, rep = audit_labels(truth, given, niches, seed_acc, np.ones(4), spec)
        assert (read == given).all() and not any(r.suspect for r in rep)


def test_a_run_reads_flipped_niches_through_the_audit_and_tags_them(tmp_path):
    cfg = tiny_config(
        tmp_path,
        data={"poison": {"kind": "label_flip", "niches": 2}},
        selection={"k": None},
        run={"generations": 4},
    )
    s = PopulationRun(cfg, tracking_uri=f"sqlite:///{tmp_path}/m.db", progress=False).run()
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    kids = c.search_runs(["1"], f"tags.mlflow.parentRunId = '{s.mlflow_run_id}' and tags.`forkpop.origin` = 'fork'")
    audited = [r for r in kids if r.data.tags.get("forkpop.label_audit")]
    assert audited and all(r.data.tags["forkpop.poisoned"] == "true" for r in audited)
    assert sum(h["audited_variants"] for h in s.history) == len(audited)
    off = tiny_config(
        tmp_path / "off",
        data={"poison": {"kind": "label_flip", "niches": 2}, "audit": {"mode": "none"}},
        selection={"k": None},
        run={"generations": 4},
    )
    s_off = PopulationRun(off, tracking_uri=f"sqlite:///{tmp_path}/off.db", progress=False).run()
    assert sum(h["audited_variants"] for h in s_off.history) == 0
    # Every poisoned teacher either was kept out or learned the labels as the audit read them.
    assert s.unaudited_poisoned_teachers == 0 < s_off.unaudited_poisoned_teachers


# -- generated transfer data and the model-collapse guard -------------------------------------


def _generated_run(tmp_path, min_real):
    cfg = tiny_config(
        tmp_path,
        run={"generations": 3},
        distill={"generated": {"kind": "noise", "per_generation": 1.0, "min_real_fraction": min_real}},
    )
    return PopulationRun(cfg, tracking_uri=f"sqlite:///{tmp_path}/m.db", progress=False).run()


def test_generated_transfer_data_never_outweighs_the_configured_real_share(tmp_path):
    guarded = _generated_run(tmp_path / "g", 0.6)
    fractions = [h["transfer_real_fraction"] for h in guarded.history]
    assert all(f >= 0.6 for f in fractions) and all(h["transfer_generated"] > 0 for h in guarded.history)
    # Without the guard the kept pseudo-labelled inputs pile up generation after generation.
    free = [h["transfer_real_fraction"] for h in _generated_run(tmp_path / "f", 0.0).history]
    assert free[0] == pytest.approx(0.5, abs=0.01) and free[-1] < 0.3 and free == sorted(free, reverse=True)


def test_peers_screen_a_variant_whose_niche_labels_they_contradict():
    from forkpop.selection.species import peer_label_screen

    rng = np.random.default_rng(1)
    y_true = rng.integers(0, 4, 100)
    y_val = np.repeat(np.arange(4), 5)
    niches = [np.arange(k * 20, (k + 1) * 20) for k in range(5)]
    onehot = np.eye(4)
    probs = np.stack([onehot[y_true]] * 5)  # every variant predicts the truth
    val_probs = np.stack([onehot[y_val]] * 5)
    given = y_true.copy()
    given[niches[2]] = (y_true[niches[2]] + 1) % 4  # niche 2's labels are flipped
    assert peer_label_screen(probs, given, niches, val_probs, y_val, 0.5, 0.5) == {2}
    assert peer_label_screen(probs, y_true, niches, val_probs, y_val, 0.5, 0.5) == set()
    # Niche 4 alone holds class 3 and only its own variant recognises it: the others cannot
    # judge those labels, so the niche is not held against it.
    only = y_true.copy()
    only[niches[4]] = 3
    only[:80][only[:80] == 3] = 0
    p = np.stack([onehot[only]] * 5)
    p[:4, niches[4]] = onehot[0]
    vp = np.stack([onehot[y_val]] * 5)
    vp[:4, y_val == 3] = onehot[0]
    assert peer_label_screen(p, only, niches, vp, y_val, 0.5, 0.5) == set()


def test_the_audit_reads_labels_one_to_one():
    truth, niches, AuditSpec, audit_labels = _audit_case()
    given = truth.copy()
    given[niches[1]] = (truth[niches[1]] + 1) % 4
    pred = truth.copy()
    # The seed confuses class 1 with class 0 in niche 1: labels 1 and 2 would both read as 0.
    pred[niches[1][truth[niches[1]] == 1]] = 0
    _, rep = audit_labels(pred, given, niches, 0.9, np.ones(4), AuditSpec())
    targets = list(rep[1].mapped.values())
    # Label 2 (11 samples, all called 0) outweighs label 1 (6 samples): it alone reads as 0.
    assert len(targets) == len(set(targets)) and rep[1].mapped.get(2) == 0 and 1 not in rep[1].mapped
