"""The byte-level text corpus (stdlib, pydoc, a user's files) and the model-collapse measures."""

from __future__ import annotations

import hashlib
import json
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
from forkpop.population.text_measures import (
    RealNgrams,
    byte_entropy,
    code_to_bytes,
    distinct_ngram_ratio,
    gzip_ratio,
    ngram_counts,
)
from forkpop.workers.text import DEFAULT_STDLIB_PACKAGES, TextSpec, load_text, windows

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _file_bytes(niche: str, rel: str) -> bytes:
    return (STDLIB / niche / rel).read_bytes()


# --- stdlib ---------------------------------------------------------------------------------------------------


def test_stdlib_default_niches_and_caps():
    spec = TextSpec()
    corpus = load_text(spec)
    assert corpus.names == list(DEFAULT_STDLIB_PACKAGES[:8])
    assert corpus.source == "stdlib"
    for name, train, held in zip(corpus.names, corpus.train, corpus.heldout, strict=True):
        assert train.dtype == np.uint8 and held.dtype == np.uint8 and train.ndim == 1
        assert 0 < train.size <= spec.max_bytes_per_niche
        assert 0 < held.size <= spec.max_bytes_per_niche * spec.heldout_fraction
        assert corpus.files[name]["train"] and corpus.files[name]["heldout"]
    assert corpus.pooled_train().size == sum(t.size for t in corpus.train)
    assert corpus.pooled_heldout().size == sum(h.size for h in corpus.heldout)


def test_stdlib_small_cap_is_exact_and_bytes_match_files():
    spec = TextSpec(n_niches=3, max_bytes_per_niche=5000, heldout_fraction=0.25)
    corpus = load_text(spec)
    for name, train, held in zip(corpus.names, corpus.train, corpus.heldout, strict=True):
        assert train.size == 5000 and held.size <= 1250
        for split, arr, cap in (("train", train, 5000), ("heldout", held, 1250)):
            expected = b"\n\n".join(_file_bytes(name, rel) for rel in corpus.files[name][split])[:cap]
            assert arr.tobytes() == expected


def test_stdlib_heldout_never_trained_on_and_no_tests():
    corpus = load_text(TextSpec(n_niches=20))  # includes unittest and ctypes, which ship test folders
    pooled = corpus.pooled_train().tobytes()
    train_hashes = set()
    for name in corpus.names:
        for rel in corpus.files[name]["train"]:
            train_hashes.add(hashlib.sha256(_file_bytes(name, rel)).digest())
    for name in corpus.names:
        train, held = corpus.files[name]["train"], corpus.files[name]["heldout"]
        assert not set(train) & set(held)
        for rel in train + held:
            parts = rel.split("/")
            assert rel.endswith(".py")
            assert not {"test", "tests", "idle_test"} & set(parts[:-1]), rel
            assert not parts[-1].startswith("test_"), rel
        for rel in held:
            data = _file_bytes(name, rel)
            assert hashlib.sha256(data).digest() not in train_hashes
            if len(data) >= 200:  # shorter files may be a common snippet (a license header, an import line)
                assert data not in pooled, (name, rel)


def test_stdlib_hash_stable_and_split_follows_seed():
    a, b = load_text(TextSpec(n_niches=6)), load_text(TextSpec(n_niches=6))
    assert a.sha256 == b.sha256 and a.files == b.files
    assert all(np.array_equal(x, y) for x, y in zip(a.train, b.train, strict=True))
    c = load_text(TextSpec(n_niches=6, seed=1))
    assert c.sha256 != a.sha256
    assert any(a.files[n]["heldout"] != c.files[n]["heldout"] for n in a.names)


def test_stdlib_record_is_json():
    corpus = load_text(TextSpec(n_niches=4))
    record = json.loads(json.dumps(corpus.record()))
    assert record["source"] == "stdlib" and record["names"] == corpus.names
    assert record["sha256"] == corpus.sha256 and "python" in record
    assert record["bytes"]["email"]["train"] == corpus.train[0].size
    assert record["files"]["email"]["heldout"] == corpus.files["email"]["heldout"]


def test_stdlib_chosen_packages_and_errors():
    corpus = load_text(TextSpec(niches=("json", ("etree", "xml.etree"))))
    assert corpus.names == ["json", "etree"]
    with pytest.raises(ValueError, match=r"data\.niches\.nope: 'nope' is not a package folder"):
        load_text(TextSpec(niches=("nope",)))
    with pytest.raises(ValueError, match=r"data\.n_niches: .* asked for 99"):
        load_text(TextSpec(n_niches=99))
    with pytest.raises(ValueError, match=r"data\.source: unknown text source 'web'"):
        load_text(TextSpec(source="web"))


# --- a user's files -------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_text_folder_glob_and_file(tmp_path):
    for i in range(5):
        _write(tmp_path / "poems" / f"p{i}.txt", f"poem number {i}\n" * (i + 1))
    _write(tmp_path / "poems" / "deep" / "q.txt", "a deep poem\n")
    _write(tmp_path / "poems" / ".hidden", "secret\n")
    for i in range(3):
        _write(tmp_path / "notes" / "a" / f"n{i}.md", f"# note {i}\n")
    _write(tmp_path / "notes" / "a" / "skip.txt", "not markdown\n")
    (tmp_path / "notes" / "bin.dat").write_bytes(bytes(range(256)))  # not UTF-8: fine, byte level
    spec = TextSpec(
        source="text",
        niches=(
            ("poems", str(tmp_path / "poems")),
            ("notes", str(tmp_path / "notes" / "**" / "*.md")),
            ("bin", str(tmp_path / "notes" / "*.dat")),
        ),
        heldout_fraction=0.0,
    )
    corpus = load_text(spec)
    assert corpus.names == ["poems", "notes", "bin"]
    poems = sorted(corpus.files["poems"]["train"])
    assert poems == ["deep/q.txt"] + [f"p{i}.txt" for i in range(5)]
    assert sorted(corpus.files["notes"]["train"]) == [f"a/n{i}.md" for i in range(3)]
    assert corpus.files["bin"]["train"] == ["bin.dat"] and corpus.train[2].tobytes() == bytes(range(256))
    assert all(h.size == 0 for h in corpus.heldout)
    json.dumps(corpus.record())

    held = load_text(TextSpec(source="text", niches=(("poems", str(tmp_path / "poems")),), heldout_fraction=0.3))
    train, heldout = held.files["poems"]["train"], held.files["poems"]["heldout"]
    assert len(heldout) == 2 and len(train) == 4 and not set(train) & set(heldout)

    single = TextSpec(source="text", niches=(("one", str(tmp_path / "poems" / "p3.txt")),), heldout_fraction=0.0)
    assert load_text(single).files["one"]["train"] == ["p3.txt"]
    with pytest.raises(ValueError, match=r"data\.niches\.one: has 1 usable file .* at least 2 files"):
        load_text(TextSpec(source="text", niches=single.niches))


def test_text_errors(tmp_path):
    pattern = str(tmp_path / "missing" / "*.txt")
    with pytest.raises(ValueError, match=r"data\.niches\.gone: no file matches .*give a folder, a file or a glob"):
        load_text(TextSpec(source="text", niches=(("gone", pattern),)))
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"e{i}.txt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data\.niches\.void: every file .* is empty"):
        load_text(TextSpec(source="text", niches=(("void", str(tmp_path / "empty")),)))
    with pytest.raises(ValueError, match=r"data\.niches: the text source needs"):
        load_text(TextSpec(source="text"))


# --- pydoc ----------------------------------------------------------------------------------------------------


def test_pydoc_loads():
    corpus = load_text(TextSpec(source="pydoc", n_niches=6))
    assert len(corpus.names) == 6 and all(".." in name for name in corpus.names)
    for name, train, held in zip(corpus.names, corpus.train, corpus.heldout, strict=True):
        assert train.size > 0 and held.size > 0
        assert not set(corpus.files[name]["train"]) & set(corpus.files[name]["heldout"])
    json.dumps(corpus.record())


# --- measures -------------------------------------------------------------------------------------------------


def test_ngram_counts_and_speed():
    codes, counts = ngram_counts(b"abcabc", n=3)
    assert [code_to_bytes(c, 3) for c in codes] == [b"abc", b"bca", b"cab"]
    assert counts.tolist() == [2, 1, 1]
    big = np.random.default_rng(0).integers(0, 256, 1_600_000).astype(np.uint8)
    start = time.perf_counter()
    codes, counts = ngram_counts(big)
    assert time.perf_counter() - start < 1.0
    assert counts.sum() == big.size - 3


def test_distinct_ratio_and_gzip():
    assert distinct_ngram_ratio(b"abababab") == pytest.approx(2 / 5)
    noise = np.random.default_rng(1).integers(0, 256, 20_000).astype(np.uint8)
    assert distinct_ngram_ratio(noise) > 0.99
    # n-grams never cross sample boundaries: two 3-byte samples have no 4-gram at all
    assert distinct_ngram_ratio([b"abc", b"abc"]) == 0.0
    assert distinct_ngram_ratio([b"abcd", b"abcd"]) == pytest.approx(0.5)
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_bytes()
    assert gzip_ratio(b"ab" * 5000) < gzip_ratio(text) < gzip_ratio(noise)
    assert gzip_ratio(b"") == 0.0


def test_rare_recall_and_mask():
    rng = np.random.default_rng(2)
    real = bytes(rng.integers(97, 101, 3000).astype(np.uint8)) + b"XYZW"  # "XYZW" and its neighbours: unique
    stats = RealNgrams(np.frombuffer(real, dtype=np.uint8))
    assert stats.n_rare > 0
    assert stats.rare_recall(real) == 1.0
    assert stats.rare_recall([]) == 0.0 and stats.rare_recall(b"") == 0.0
    assert 0.0 < stats.rare_recall(b"XYZW") < 1.0
    window = np.frombuffer(b"aaXYZW", dtype=np.uint8).astype(np.int64)[None, :]
    mask = stats.rare_mask(window)
    assert mask.shape == (1, 5)
    assert not mask[0, 0] and not mask[0, 1]  # fewer than 3 bytes of context
    assert mask[0, 4]  # predicting the last "W": the 4-gram "XYZW" occurs once
    common = max(zip(stats.counts, stats.codes, strict=True))[1]
    window = np.frombuffer(code_to_bytes(common) * 2, dtype=np.uint8)[None, :]
    assert not stats.rare_mask(window)[0, 2]  # the most common 4-gram is not rare


def test_byte_entropy():
    assert byte_entropy(np.full((2, 3, 256), 1 / 256)) == pytest.approx(8.0)
    assert byte_entropy(np.eye(256)) == pytest.approx(0.0)
    half = np.zeros(256)
    half[:2] = 0.5
    assert byte_entropy(half) == pytest.approx(1.0)


# --- windows --------------------------------------------------------------------------------------------------


def test_windows():
    data = np.arange(100, dtype=np.uint8)
    w = windows(data, 10)
    assert w.shape == (10, 10) and w.dtype == np.int64 and w[1, 0] == 10
    assert windows(data, 10, n=3).shape == (3, 10)
    assert windows(data, 10, stride=5).shape == (19, 10)
    a = windows(data, 16, n=7, generator=np.random.default_rng(3))
    b = windows(data, 16, n=7, generator=np.random.default_rng(3))
    assert a.shape == (7, 16) and np.array_equal(a, b)
    assert np.all(np.diff(a, axis=1) == 1)  # each window is a contiguous slice
    with pytest.raises(ValueError, match="cannot hold one window"):
        windows(data[:5], 10)
