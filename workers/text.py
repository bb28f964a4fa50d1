"""Text data for a byte-level language-model world: niches of files, split by file into train and held out.

Three sources, all read as raw bytes (the models are byte level, so any file is acceptable):

* ``stdlib``: the Python standard library of the running interpreter, one niche per package directory
  (``*.py`` files only, tests excluded);
* ``pydoc``: the reference topics that ship with Python (``pydoc_data.topics``), grouped into niches of
  contiguous topic names, each topic one "file";
* ``text``: a user's own files, one niche per (name, glob / folder / file) pair.

Every niche's files are sorted by relative path, empty files and files whose bytes already appeared earlier
(in this niche or an earlier one) are dropped, and the rest are split BY FILE with a generator seeded by
``(seed, crc32(niche name))``: a permutation whose first ``round(n_files * heldout_fraction)`` files (at least one,
at most ``n_files - 1``) are held out. Training files are then concatenated in that permuted order (``b"\\n\\n"``
between files) up to ``max_bytes_per_niche``, the last one truncated; held-out files the same way up to
``max_bytes_per_niche * heldout_fraction``. ``files`` lists only the files that contributed bytes, and ``sha256``
hashes exactly the bytes used, so two runs that record the same hash trained and evaluated on the same bytes.
"""

from __future__ import annotations

import glob
import hashlib
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCES = ("stdlib", "pydoc", "text")

# The stdlib packages used as niches, in order: the first ``n_niches`` that exist on this interpreter.
DEFAULT_STDLIB_PACKAGES = (
    "email",
    "asyncio",
    "http",
    "xml",
    "logging",
    "json",
    "concurrent",
    "importlib",
    "multiprocessing",
    "unittest",
    "urllib",
    "sqlite3",
    "tomllib",
    "ctypes",
    "curses",
    "dbm",
    "html",
    "wsgiref",
    "xmlrpc",
    "zoneinfo",
)

_TEST_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__"})
_SEPARATOR = b"\n\n"
_GLOB_MAGIC = frozenset("*?[")


@dataclass(frozen=True)
class TextSpec:
    """Everything needed to rebuild the same text corpus anywhere (workers load it where they run).

    ``niches``: for ``text``, ``(name, pattern)`` pairs where the pattern is a glob (``**`` recursive), a folder
    (every file under it) or a file; for ``stdlib``, optional packages to use instead of the default list, each a
    package name (``"email"``, ``"xml.etree"``) or a ``(niche name, package)`` pair, and then ``n_niches`` is
    ignored; for ``pydoc``, empty. A mapping ``{name: pattern}`` is accepted too.
    """

    source: str = "stdlib"  # stdlib | pydoc | text
    niches: tuple[tuple[str, str], ...] = ()
    heldout_fraction: float = 0.2  # share of each niche's FILES held out (split by file, never by byte)
    max_bytes_per_niche: int = 200_000  # cap on each niche's training bytes; held out: cap * heldout_fraction
    seed: int = 0  # the split's seed
    n_niches: int = 8  # stdlib: how many default packages; pydoc: how many groups of topics


@dataclass
class TextCorpus:
    """Per-niche byte streams: ``train[i]`` / ``heldout[i]`` are uint8 1-D arrays for niche ``names[i]``.

    ``files[name]`` maps ``"train"`` / ``"heldout"`` to the relative paths that contributed bytes, in the order
    they were concatenated (the last one of each split may be truncated by the cap).
    """

    names: list[str]
    train: list[np.ndarray]
    heldout: list[np.ndarray]
    files: dict[str, dict[str, list[str]]]
    sha256: str
    source: str

    def record(self) -> dict:
        """What a run records about its text: JSON-able."""
        return {
            "source": self.source,
            "names": list(self.names),
            "sha256": self.sha256,
            "python": sys.version,
            "bytes": {
                name: {"train": int(tr.size), "heldout": int(ho.size)}
                for name, tr, ho in zip(self.names, self.train, self.heldout, strict=True)
            },
            "n_files": {name: {split: len(paths) for split, paths in self.files[name].items()} for name in self.names},
            "files": {name: {split: list(paths) for split, paths in self.files[name].items()} for name in self.names},
        }

    def pooled_train(self) -> np.ndarray:
        """All niches' training bytes, concatenated in niche order."""
        return _concat(self.train)

    def pooled_heldout(self) -> np.ndarray:
        """All niches' held-out bytes, concatenated in niche order."""
        return _concat(self.heldout)


def _concat(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(list(parts)) if parts else np.zeros(0, dtype=np.uint8)


# --- one niche's candidate files: (relative path, reader) --------------------------------------------------


@dataclass(frozen=True)
class _Item:
    """One "file" of a niche: its relative path and where its bytes come from (a path on disk or the text)."""

    rel: str
    path: Path | None = None
    text: bytes | None = None

    def size(self) -> int:
        return len(self.text) if self.text is not None else self.path.stat().st_size

    def read(self, limit: int | None = None) -> bytes:
        if self.text is not None:
            return self.text if limit is None else self.text[:limit]
        with open(self.path, "rb") as handle:
            return handle.read() if limit is None else handle.read(limit)

    def digest(self) -> bytes:
        if self.text is not None:
            return hashlib.sha256(self.text).digest()
        h = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        return h.digest()


def _niche_pairs(niches) -> list[tuple[str, str | None]]:
    """``spec.niches`` as ``(name, value)`` pairs; a bare string gives ``(string, None)`` (stdlib packages)."""
    if isinstance(niches, dict):
        return [(str(k), str(v)) for k, v in niches.items()]
    pairs: list[tuple[str, str | None]] = []
    for entry in niches or ():
        if isinstance(entry, str):
            pairs.append((entry, None))
        elif isinstance(entry, Sequence) and len(entry) == 2:
            pairs.append((str(entry[0]), str(entry[1])))
        else:
            raise ValueError(f"data.niches: each niche is a (name, pattern) pair, got {entry!r}")
    names = [name for name, _ in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"data.niches: niche names must be unique, {dupes} appear more than once")
    return pairs


def _stdlib_items(package_dir: Path) -> list[_Item]:
    """The package's ``*.py`` files, recursively, without tests: sorted by relative (posix) path."""
    items = []
    for root, dirs, filenames in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d not in _TEST_DIRS and not d.startswith("."))
        for filename in filenames:
            if not filename.endswith(".py") or filename.startswith("test_"):
                continue
            path = Path(root) / filename
            items.append(_Item(path.relative_to(package_dir).as_posix(), path=path))
    return sorted(items, key=lambda item: item.rel)


def _stdlib_niches(spec: TextSpec) -> list[tuple[str, list[_Item]]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    pairs = _niche_pairs(spec.niches)
    if pairs:
        chosen = []
        for name, package in pairs:
            package = package or name
            folder = stdlib / package.replace(".", "/")
            if not folder.is_dir():
                raise ValueError(
                    f"data.niches.{name}: {package!r} is not a package folder of the standard library at {stdlib}"
                )
            chosen.append((name, folder))
    else:
        available = [p for p in DEFAULT_STDLIB_PACKAGES if (stdlib / p).is_dir()]
        if spec.n_niches > len(available):
            raise ValueError(
                f"data.n_niches: the stdlib source has {len(available)} default packages on this Python, "
                f"asked for {spec.n_niches}; lower n_niches or list packages in data.niches"
            )
        chosen = [(p, stdlib / p) for p in available[: spec.n_niches]]
    return [(name, _stdlib_items(folder)) for name, folder in chosen]


def _pydoc_niches(spec: TextSpec) -> list[tuple[str, list[_Item]]]:
    if _niche_pairs(spec.niches):
        raise ValueError("data.niches: the pydoc source makes its own niches; leave niches empty and set n_niches")
    from pydoc_data.topics import topics

    names = sorted(topics)
    if spec.n_niches > len(names) // 2:
        raise ValueError(
            f"data.n_niches: the pydoc source has {len(names)} topics (at least 2 per niche), "
            f"asked for {spec.n_niches} niches; lower n_niches"
        )
    groups = np.array_split(np.arange(len(names)), spec.n_niches)
    niches = []
    for group in groups:
        members = [names[i] for i in group]
        items = [_Item(topic, text=topics[topic].encode("utf-8")) for topic in members]
        niches.append((f"{members[0]}..{members[-1]}", items))
    return niches


def _glob_root(pattern: str) -> Path:
    """The leading part of a glob pattern without wildcards: what matched paths are recorded relative to."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _GLOB_MAGIC & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _walk_files(folder: Path) -> Iterable[Path]:
    """Every file under ``folder``, recursively, skipping hidden entries and ``__pycache__``."""
    for root, dirs, filenames in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        for filename in filenames:
            if not filename.startswith("."):
                yield Path(root) / filename


def _text_items(name: str, pattern: str) -> list[_Item]:
    expanded = os.path.expanduser(pattern)
    if _GLOB_MAGIC & set(expanded):
        root = _glob_root(expanded)
        paths: list[Path] = []
        for match in glob.glob(expanded, recursive=True):
            match = Path(match)
            paths.extend(_walk_files(match) if match.is_dir() else [match] if match.is_file() else [])
    elif os.path.isdir(expanded):
        root = Path(expanded)
        paths = list(_walk_files(root))
    elif os.path.isfile(expanded):
        root = Path(expanded).parent
        paths = [Path(expanded)]
    else:
        paths = []
    if not paths:
        raise ValueError(f"data.niches.{name}: no file matches {pattern!r}; give a folder, a file or a glob")
    by_rel: dict[str, _Item] = {}
    for path in paths:
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:  # a glob like "a/../b/*" can leave its literal root
            rel = path.as_posix()
        by_rel.setdefault(rel, _Item(rel, path=path))
    return [by_rel[rel] for rel in sorted(by_rel)]


def _text_niches(spec: TextSpec) -> list[tuple[str, list[_Item]]]:
    pairs = _niche_pairs(spec.niches)
    if not pairs:
        raise ValueError("data.niches: the text source needs (name, pattern) pairs, e.g. [[poems, 'poems/**/*.txt']]")
    niches = []
    for name, pattern in pairs:
        if pattern is None:
            raise ValueError(f"data.niches.{name}: give a (name, pattern) pair, the pattern a glob, folder or file")
        niches.append((name, _text_items(name, pattern)))
    return niches


# --- the split ----------------------------------------------------------------------------------------------


def _n_heldout(n_files: int, fraction: float) -> int:
    if fraction <= 0:
        return 0
    return min(n_files - 1, max(1, int(n_files * fraction + 0.5)))


def _take(items: Sequence[_Item], cap: int) -> tuple[list[bytes], list[str]]:
    """Items' bytes in order until ``cap`` bytes in all, counting a ``_SEPARATOR`` between items (the last one
    truncated): the pieces (to be joined with ``_SEPARATOR``) and their relative paths."""
    pieces: list[bytes] = []
    used: list[str] = []
    left = cap
    for item in items:
        if pieces:
            left -= len(_SEPARATOR)
        if left <= 0:
            break
        pieces.append(item.read(left))
        used.append(item.rel)
        left -= len(pieces[-1])
    return pieces, used


def _validate(spec: TextSpec) -> None:
    if spec.source not in SOURCES:
        raise ValueError(f"data.source: unknown text source {spec.source!r}; use one of {', '.join(SOURCES)}")
    if not 0.0 <= spec.heldout_fraction < 1.0:
        raise ValueError(f"data.heldout_fraction: {spec.heldout_fraction} is outside [0, 1); use e.g. 0.2")
    if int(spec.max_bytes_per_niche) < 1:
        raise ValueError(f"data.max_bytes_per_niche: {spec.max_bytes_per_niche} must be a positive number of bytes")
    if int(spec.n_niches) < 1:
        raise ValueError(f"data.n_niches: {spec.n_niches} must be at least 1")


def load_text(spec: TextSpec) -> TextCorpus:
    """Build the corpus ``spec`` describes (deterministic: the same spec and files give the same bytes and hash)."""
    _validate(spec)
    niches = {"stdlib": _stdlib_niches, "pydoc": _pydoc_niches, "text": _text_niches}[spec.source](spec)
    train_cap = int(spec.max_bytes_per_niche)
    heldout_cap = max(1, int(spec.max_bytes_per_niche * spec.heldout_fraction)) if spec.heldout_fraction > 0 else 0
    seen: set[bytes] = set()
    h = hashlib.sha256()
    names, train, heldout, files = [], [], [], {}
    for name, items in niches:
        kept = []
        for item in items:
            if item.size() == 0:
                continue
            digest = item.digest()
            if digest not in seen:
                seen.add(digest)
                kept.append(item)
        if not kept:
            where = "" if spec.source != "text" else f" matching {dict(_niche_pairs(spec.niches))[name]!r}"
            raise ValueError(
                f"data.niches.{name}: every file{where} is empty or a copy of an earlier one; give files with text"
            )
        n_held = _n_heldout(len(kept), spec.heldout_fraction)
        if spec.heldout_fraction > 0 and len(kept) < 2:
            raise ValueError(
                f"data.niches.{name}: has {len(kept)} usable file (empty and duplicate files are dropped) and the "
                "held-out split is by file; give it at least 2 files or set heldout_fraction to 0"
            )
        order = np.random.default_rng([int(spec.seed), zlib.crc32(name.encode("utf-8"))]).permutation(len(kept))
        held_items = [kept[i] for i in order[:n_held]]
        train_items = [kept[i] for i in order[n_held:]]
        splits = {}
        for split, chosen, cap in (("train", train_items, train_cap), ("heldout", held_items, heldout_cap)):
            pieces, used = _take(chosen, cap)
            for rel, piece in zip(used, pieces, strict=True):
                h.update(f"{name}\0{split}\0{rel}\0{len(piece)}\0".encode())
                h.update(piece)
            splits[split] = (np.frombuffer(bytearray(_SEPARATOR.join(pieces)), dtype=np.uint8), used)
        names.append(name)
        train.append(splits["train"][0])
        heldout.append(splits["heldout"][0])
        files[name] = {"train": splits["train"][1], "heldout": splits["heldout"][1]}
    return TextCorpus(names=names, train=train, heldout=heldout, files=files, sha256=h.hexdigest(), source=spec.source)


def windows(
    data: np.ndarray,
    length: int,
    n: int | None = None,
    generator: np.random.Generator | None = None,
    stride: int | None = None,
) -> np.ndarray:
    """``(m, length)`` int64 windows of the 1-D byte array ``data``.

    With ``generator``: ``n`` windows at uniformly random start offsets (``n=None``: ``len(data) // length`` of them;
    ``stride`` must then be None). Without: consecutive windows starting every ``stride`` bytes (default
    ``length``, i.e. non-overlapping) from offset 0, at most ``n`` of them. Data shorter than ``length`` is an error.
    """
    data = np.asarray(data).reshape(-1)
    length = int(length)
    if length < 1:
        raise ValueError(f"windows: length must be at least 1, got {length}")
    if data.size < length:
        raise ValueError(f"windows: {data.size} bytes cannot hold one window of {length}; use a shorter window")
    if generator is not None:
        if stride is not None:
            raise ValueError("windows: stride applies to consecutive windows only; drop it or the generator")
        count = data.size // length if n is None else int(n)
        starts = generator.integers(0, data.size - length + 1, size=count)
    else:
        step = length if stride is None else int(stride)
        if step < 1:
            raise ValueError(f"windows: stride must be at least 1, got {step}")
        starts = np.arange(0, data.size - length + 1, step)
        if n is not None:
            starts = starts[: int(n)]
    return data[starts[:, None] + np.arange(length)].astype(np.int64, copy=False)
