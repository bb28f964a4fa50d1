"""Users' data as users have it: CSV with a header, string labels, image arrays, Parquet,
standardization with the training split's statistics, and bad files that say what to change."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from forkpop.population.models import SmallCNN
from forkpop.workers.data import DataError, DataSpec, load_data


def _write_csv(path, names, rows):
    lines = ([",".join(names)] if names is not None else []) + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _table(n=150, f=3, seed=0):
    """Features ``(n, f)`` on very different scales and labels 0..2 that depend on them."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f)) * np.array([1000.0, 0.01, 5.0][:f]) + np.array([5e4, 0.0, -3.0][:f])
    y = np.arange(n) % 3
    return x, y


def _spec(path, **kw):
    return DataSpec(source="file", path=path, n_niches=kw.pop("n_niches", 2), partition="iid", **kw)


def test_a_header_csv_with_a_named_string_label_column(tmp_path):
    x, y = _table()
    names = np.array(["cat", "dog", "eel"])[y]
    rows = [[f"{a:.6g}", s, f"{b:.6g}", f"{c:.6g}"] for (a, b, c), s in zip(x, names, strict=True)]
    path = _write_csv(tmp_path / "d.csv", ["w", "species", "mean radius", "z"], rows)
    b = load_data(_spec(path, label="species"))
    assert b.classes == ("cat", "dog", "eel") and b.n_classes == 3 and b.n_features == 3
    assert b.input_shape == (3,)
    # Class k stands for classes[k]: the mapping recovers the file's strings, row for row.
    for split, idx in (("y_pool", b.plan.pool), ("y_val", b.plan.val), ("y_test", b.plan.test)):
        assert np.array_equal(np.array(b.classes)[getattr(b, split)], names[idx])
    rec = b.record()
    assert json.loads(json.dumps(rec))["classes"] == ["cat", "dog", "eel"] and rec["standardize"] is True


@pytest.mark.parametrize(
    "names, label_at",
    [
        (["f0", "label", "f1", "f2"], 1),
        (["target", "f0", "f1", "f2"], 0),
        (["f0", "f1", "y", "f2"], 2),
        (["f0", "Class", "f1", "f2"], 1),
        (["f0", "f1", "f2", "kind"], 3),  # none of the names: the last column
    ],
)
def test_the_label_column_is_found_by_name_else_the_last(tmp_path, names, label_at):
    x, y = _table()
    cols = [list(c) for c in x.T]
    cols.insert(label_at, [str(v + 10) for v in y])  # classes 10, 11, 12
    rows = [list(r) for r in zip(*cols, strict=True)]
    b = load_data(_spec(_write_csv(tmp_path / "d.csv", names, rows), standardize=False))
    assert b.classes == ("10", "11", "12") and b.n_features == 3
    assert np.array_equal(b.y_pool, y[b.plan.pool]) and np.allclose(b.x_pool, x[b.plan.pool].astype(np.float32))


def test_a_headerless_numeric_csv_still_works_with_label_column(tmp_path):
    x, y = _table()
    path = str(tmp_path / "d.csv")
    np.savetxt(path, np.column_stack([y, x]), delimiter=",")
    b = load_data(_spec(path, label_column=0, standardize=False))
    assert b.n_features == 3 and b.classes == ("0", "1", "2")
    assert np.array_equal(b.y_test, y[b.plan.test]) and np.allclose(b.x_test, x[b.plan.test].astype(np.float32))
    np.savetxt(path, np.column_stack([x, y]), delimiter=",")  # the last column by default
    b = load_data(_spec(path, n_niches=3))
    assert b.n_features == 3 and b.n_classes == 3


def test_standardization_uses_the_pool_statistics_only(tmp_path):
    x, y = _table()
    x[:, 1] = 7.0  # a constant feature: std 0 -> 1
    path = _write_csv(tmp_path / "d.csv", ["a", "b", "c", "label"], [[*r, c] for r, c in zip(x, y, strict=True)])
    b = load_data(_spec(path))
    pool = x[b.plan.pool]
    mean, std = pool.mean(0), pool.std(0)
    std[1] = 1.0
    assert np.allclose(b.scaling.mean, mean) and np.allclose(b.scaling.std, std)
    for split, idx in (("x_pool", b.plan.pool), ("x_val", b.plan.val), ("x_test", b.plan.test)):
        got = getattr(b, split)
        assert got.dtype == np.float32 and got.shape == (len(idx), 3)
        assert np.allclose(got, (x[idx] - mean) / std, atol=1e-5)
    assert np.allclose(b.x_pool.mean(0), 0, atol=1e-5) and np.allclose(b.x_pool.std(0), [1, 0, 1], atol=1e-4)
    # The held-out splits are not standardized by their own statistics.
    assert not np.allclose(b.x_test.mean(0)[[0, 2]], 0, atol=1e-6)
    rec = b.record()
    assert rec["standardize"] and np.allclose(rec["mean"], mean) and np.allclose(rec["std"], std)
    raw = load_data(_spec(path, standardize=False))
    assert raw.scaling is None and np.allclose(raw.x_test, x[raw.plan.test].astype(np.float32))


def test_the_bundled_digits_are_not_standardized_unless_asked():
    d = load_data(DataSpec(n_niches=4))
    assert d.scaling is None and d.x_pool.min() == 0.0 and d.x_pool.max() == 1.0
    assert d.classes == tuple(str(k) for k in range(10)) and d.input_shape == (64,)
    s = load_data(DataSpec(n_niches=4, standardize=True))
    assert s.scaling is not None and np.allclose(s.x_pool.mean(0), 0, atol=1e-5)
    assert np.array_equal(s.y_test, d.y_test)


def _images(n=60, c=3, h=6, w=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, c, h, w)).astype(np.float32), np.arange(n) % 2


def test_npz_images_keep_their_shape_for_the_cnn(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "img.npz", x=x, y=np.array(["no", "yes"])[y])
    b = load_data(_spec(str(tmp_path / "img.npz"), standardize=False))
    assert b.input_shape == (3, 6, 5) and b.n_features == 90 and b.classes == ("no", "yes")
    assert np.array_equal(b.x_test, x[b.plan.test].reshape(-1, 90))
    model = SmallCNN(b.n_features, b.n_classes, (4, 8), input_shape=b.input_shape)
    flat = torch.from_numpy(b.x_test)
    assert model(flat).shape == (len(flat), 2)
    # The flat rows are viewed back as the file's (C, H, W) images, channel by channel.
    images = torch.from_numpy(x[b.plan.test])
    assert torch.allclose(model.embed(flat), model.features(images).mean(dim=(2, 3)))
    np.savez(tmp_path / "gray.npz", x=x[:, 0], y=y)  # (N, H, W): one channel
    assert load_data(_spec(str(tmp_path / "gray.npz"))).input_shape == (1, 6, 5)


def test_a_cnn_without_an_input_shape_guesses_square_single_channel_images():
    assert SmallCNN(64, 10).input_shape == (1, 8, 8)
    assert SmallCNN(64, 10, input_shape=(64,)).input_shape == (1, 8, 8)
    assert SmallCNN(30, 2, input_shape=(5, 6)).input_shape == (1, 5, 6)
    with pytest.raises(ValueError, match="not a square"):
        SmallCNN(30, 2)
    with pytest.raises(ValueError, match="holds 90 values"):
        SmallCNN(64, 2, input_shape=(3, 6, 5))


@pytest.mark.parametrize(
    "xname, yname",
    [("x.npy", "y.npy"), ("x_train.npy", "y_train.npy"), ("images.npy", "labels.npy"), ("a.npy", "a_labels.npy")],
)
def test_npy_inputs_find_their_labels_beside_them(tmp_path, xname, yname):
    x, y = _images()
    np.save(tmp_path / xname, x)
    np.save(tmp_path / yname, y)
    b = load_data(_spec(str(tmp_path / xname)))
    assert b.input_shape == (3, 6, 5) and b.n_classes == 2 and b.classes == ("0", "1")


def test_parquet_tables_load_like_csv(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    x, y = _table()
    table = pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "diagnosis": np.array(["m", "b", "x"])[y]})
    pq.write_table(table, tmp_path / "d.parquet")
    b = load_data(_spec(str(tmp_path / "d.parquet"), label="diagnosis"))
    assert b.classes == ("b", "m", "x") and b.n_features == 3 and b.scaling is not None
    assert np.array_equal(np.array(b.classes)[b.y_test], np.array(["m", "b", "x"])[y][b.plan.test])


def _bad_files(tmp_path):
    x, y = _table()
    ok = [[f"{a:.6g}", f"{b:.6g}", f"{c:.6g}", k] for (a, b, c), k in zip(x, y, strict=True)]
    names = ["a", "b", "c", "label"]
    nan = [list(r) for r in ok]
    nan[4][1] = ""
    nan[9][1] = "nan"
    text = [list(r) for r in ok]
    text[2][0] = "red"
    (tmp_path / "empty.csv").write_text("")
    one_row = [[1, 2, 0], [3, 4, 1]]
    return {
        "nan.csv": (_write_csv(tmp_path / "nan.csv", names, nan), {}, r"column 'b' is empty or NaN on line 6"),
        "one.csv": (
            _write_csv(tmp_path / "one.csv", names, [[*r[:3], 1] for r in ok]),
            {},
            r"the label column 'label' holds a single class \('1'\)",
        ),
        "few.csv": (
            _write_csv(tmp_path / "few.csv", names, ok[:30]),
            {"n_niches": 40},
            "remain for training .* too few for 40 niches: use more rows or lower data.n_niches",
        ),
        "tiny.csv": (_write_csv(tmp_path / "tiny.csv", None, one_row), {}, "class '0' has only 1 of the 2 rows"),
        "nolabel.csv": (
            _write_csv(tmp_path / "nolabel.csv", names, ok),
            {"label": "diagnosis"},
            "data.label='diagnosis' is not a column .* its columns are: a, b, c, label",
        ),
        "empty.csv": (str(tmp_path / "empty.csv"), {}, "is empty"),
        "header.csv": (_write_csv(tmp_path / "header.csv", names, []), {}, "header row but no data rows"),
        "float.csv": (
            _write_csv(tmp_path / "float.csv", names, [[*r[:3], f"{v:.3f}"] for r, v in zip(ok, x[:, 0], strict=True)]),
            {},
            "non-integer labels",
        ),
        "text.csv": (
            _write_csv(tmp_path / "text.csv", names, text),
            {},
            "column 'a' holds 'red' on line 4, not a number",
        ),
        "ragged.csv": (
            _write_csv(tmp_path / "ragged.csv", names, [*ok[:5], ok[5][:2], *ok[6:]]),
            {},
            "line 7 has 2 fields",
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "nan.csv",
        "one.csv",
        "few.csv",
        "tiny.csv",
        "nolabel.csv",
        "empty.csv",
        "header.csv",
        "float.csv",
        "text.csv",
        "ragged.csv",
    ],
)
def test_bad_files_say_in_one_line_what_to_change(tmp_path, name):
    path, kw, needle = _bad_files(tmp_path)[name]
    with pytest.raises(DataError, match=needle) as e:
        load_data(_spec(path, **kw))
    assert "\n" not in str(e.value)


def test_bad_arrays_say_what_to_change(tmp_path):
    x, y = _images()
    x[3, 1, 2, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=y)
    np.save(tmp_path / "lonely.npy", x)
    np.savez(tmp_path / "one.npz", x=x[:, 0, 0], y=np.zeros(len(x)))
    for name, needle in [
        ("nan.npz", "NaN or infinite features .* the first at sample 3, flat feature 40"),
        ("lonely.npy", "lonely_labels.npy"),
        ("one.npz", "a single class"),
    ]:
        with pytest.raises(DataError, match=needle) as e:
            load_data(_spec(str(tmp_path / name)))
        assert "\n" not in str(e.value)


def _cli(tmp_path, *sets, extra=()):
    args = [sys.executable, "-m", "forkpop.experiments.cli", "run", "digits", "--backend", "local", "--quiet"]
    args += ["--set", "run.generations=1", "--set", "population.size=4", "--set", "data.n_niches=4"]
    args += ["--set", f"run.run_dir={tmp_path}/runs", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run([*args, *extra], capture_output=True, text=True, cwd=tmp_path, timeout=180)


def test_a_header_csv_runs_end_to_end(tmp_path):
    rng = np.random.default_rng(1)
    y = np.arange(240) % 2
    x = rng.normal(size=(240, 4)) + 3.0 * y[:, None] * np.array([1, -1, 0, 0])
    x = x * np.array([1e3, 1e-2, 1.0, 50.0]) + 1e4
    labels = np.array(["benign", "malignant"])[y]
    rows = [[f"{v:.6g}" for v in r] + [s] for r, s in zip(x, labels, strict=True)]
    _write_csv(tmp_path / "d.csv", ["f_0", "f_1", "f_2", "f_3", "diagnosis"], rows)
    sets = ("data.source=file", "data.path=d.csv", "data.label=diagnosis", "data.partition=iid")
    p = _cli(tmp_path, *sets, extra=("--summary", str(tmp_path / "out.json")))
    assert p.returncode == 0, p.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["generations"] == 1 and 0.5 < out["seed_test_accuracy"] <= 1.0


def test_a_bad_file_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,x\n3,,y\n" + "4,5,x\n" * 40)
    p = _cli(tmp_path, "data.source=file", "data.path=bad.csv")
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "column 'b' is empty or NaN on line 3" in lines[0], p.stderr
    assert "Traceback" not in p.stderr + p.stdout


def test_the_fast_and_the_careful_csv_readers_agree(tmp_path, monkeypatch):
    from forkpop.workers import data

    x, y = _table()
    names = np.array(["no", "yes", "maybe"])[y]
    rows = [[f"{a:.6g}", f"{b:.6g}", s, f"{c:.6g}"] for (a, b, c), s in zip(x, names, strict=True)]
    named = _write_csv(tmp_path / "named.csv", ["a", "b", "answer", "c"], rows)
    plain = str(tmp_path / "plain.csv")
    np.savetxt(plain, np.column_stack([x, y]), delimiter=",")
    cases = [(named, "answer", -1), (named, None, 2), (plain, None, -1)]
    fast = [data._load_file(path, label_column, label) for path, label, label_column in cases]
    monkeypatch.setattr(data, "_load_csv_fast", lambda *a: None)
    for (path, label, label_column), f in zip(cases, fast, strict=True):
        slow = data._load_file(path, label_column, label)
        assert np.array_equal(f.x, slow.x) and np.array_equal(f.y, slow.y)
        assert f.classes == slow.classes and f.input_shape == slow.input_shape == (3,)


def test_a_cnn_learns_image_files_of_any_shape_end_to_end(tmp_path):
    import forkpop

    rng = np.random.default_rng(3)
    y = np.arange(240) % 2
    x = rng.normal(size=(240, 3, 6, 5)).astype(np.float32)
    x[:, 1] += np.where(y == 1, 1.5, -1.5)[:, None, None]  # the class shows in the second channel
    np.savez(tmp_path / "img.npz", x=x, y=y)
    overrides = {
        "run.run_dir": str(tmp_path / "runs"),
        "run.generations": 2,
        "population.size": 4,
        "data.n_niches": 4,
        "data.source": "file",
        "data.path": str(tmp_path / "img.npz"),
        "model.family": "cnn",
        "model.hidden": [4, 8],
        "data.batch_size": 8,
    }
    r = forkpop.run("digits", overrides=overrides, backend="local", tracking=False)
    assert r.summary["workers"][0]["engine"] == "vmap"
    assert r.seed_model.input_shape == (3, 6, 5)
    assert tuple(r.seed_model(torch.zeros(2, 90)).shape) == (2, 2)
    assert r.summary["seed_test_accuracy"] > 0.8


@pytest.mark.parametrize("fraction,seed", [(0.08, 0), (0.25, 3), (100, 1)])
def test_the_stratified_split_is_scikit_learns(fraction, seed):
    """forkpop's own stratified split (no scikit-learn import at start-up) holds out the rows
    ``train_test_split(stratify=...)`` does, so partitions made before are made again."""
    from forkpop.workers.data import _stratified_split
    from sklearn.model_selection import train_test_split

    y = np.random.default_rng(seed).integers(0, 7, 400)
    rest, held = train_test_split(np.arange(400), test_size=fraction, random_state=seed, stratify=y)
    mine = _stratified_split(y, fraction, seed)
    assert np.array_equal(mine[0], rest) and np.array_equal(mine[1], held)
