"""Data sources and the fixed train / validation / test splits every run shares."""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from forkpop.workers.niches import partition


class DataError(ValueError):
    """A data problem a user can fix (a path, a format, a partition that cannot be made)."""


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to rebuild the same data anywhere: workers load it where they run."""

    source: str = "digits"
    path: str | None = None
    label_column: int = -1
    label: str | None = None  # the label column's name in a file with a header row
    standardize: bool | None = None  # None: on for files, off for the bundled digits
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    accept_fraction: float = 0.0  # share of the non-test data held out as the acceptance split
    split_seed: int = 0
    partition: str = "dirichlet"
    n_niches: int = 16
    alpha: float = 0.3
    shards_per_niche: int = 2
    min_niche_size: int = 8
    seed: int = 0
    # Poisoned niches (a data feature: the run knows which niches it poisoned).
    poison_kind: str = "none"  # none | label_flip | backdoor | noise
    poison_niches: int = 0
    poison_rate: float = 1.0  # share of a poisoned niche's samples that are altered
    backdoor_target: int = 0
    noise_std: float = 0.5

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def standardizes(self) -> bool:
        """Whether inputs are standardized: ``standardize``, or by default for files only."""
        return self.source != "digits" if self.standardize is None else bool(self.standardize)


@dataclass(frozen=True, eq=False)
class Scaling:
    """The standardization applied to every split: ``x' = (x - mean) / std``, both ``(n_features,)``
    float64, measured on the pool (training) split only (a feature constant there has std 1)."""

    mean: np.ndarray
    std: np.ndarray


@dataclass(frozen=True)
class DataBundle:
    """Arrays of one data set: ``x_*`` float32 ``(n, n_features)``, ``y_*`` int64 ``(n,)``.

    ``niches[i]`` indexes rows of ``x_pool``/``y_pool`` in the niche's fixed stream order.
    The test split is held out from selection and distillation; only reports read it.
    ``classes[k]`` is the label class ``k`` stands for in the file (as text); ``input_shape``
    is the shape of one sample before it was flattened (``(n_features,)`` for tables,
    ``(C, H, W)`` for images); ``scaling`` is the standardization applied (None: none).
    """

    x_pool: np.ndarray
    y_pool: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    niches: tuple[np.ndarray, ...]
    n_classes: int
    plan: SplitPlan | None = None
    poisoned: tuple[int, ...] = ()  # indices of the poisoned niches
    classes: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()
    scaling: Scaling | None = None
    x_accept: np.ndarray | None = None  # the acceptance split (None: none held out)
    y_accept: np.ndarray | None = None

    @property
    def n_features(self) -> int:
        return int(self.x_pool.shape[1])

    def record(self) -> dict:
        """What a run records of the data, JSON-serialisable: the class names in index order,
        the input shape and the standardization (on or off, per-feature mean and std)."""
        s = self.scaling
        return {
            "classes": list(self.classes),
            "input_shape": list(self.input_shape),
            "standardize": s is not None,
            "mean": None if s is None else [float(v) for v in s.mean],
            "std": None if s is None else [float(v) for v in s.std],
        }


@dataclass(frozen=True, eq=False)
class _Source:
    """A data set as loaded, before splitting: flat float32 inputs, class indices, and what
    the indices and the flat inputs stand for."""

    x: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    input_shape: tuple[int, ...]


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, read from the file it ships, scaled to [0, 1]: ``(1797, 64)``.

    Reading the file directly spares each worker the 1.5 s import of ``sklearn.datasets``;
    it is the same table ``load_digits()`` returns (a test checks).
    """
    found = importlib.util.find_spec("sklearn")
    path = Path(found.origin).parent / "datasets" / "data" / "digits.csv.gz" if found and found.origin else None
    if path is not None and path.is_file():
        table = np.loadtxt(path, delimiter=",")
        data, target = table[:, :-1], table[:, -1]
    else:  # a scikit-learn that stores it elsewhere
        from sklearn.datasets import load_digits

        d = load_digits()
        data, target = d.data, d.target
    return (data / 16.0).astype(np.float32), target.astype(np.int64)


LABEL_NAMES = ("label", "target", "y", "class")  # a header's label column by default, else the last
SUFFIXES = (".csv", ".npz", ".npy", ".parquet")
_MISSING = frozenset({"", "na", "nan", "n/a", "null", "none", "?"})


def _numeric(col: Sequence) -> tuple[np.ndarray, int | None]:
    """``col`` as float64 (missing values: NaN) and the index of its first non-number (or None)."""
    try:
        return np.asarray(col, dtype=np.float64), None
    except (ValueError, TypeError):
        pass
    out = np.empty(len(col), dtype=np.float64)
    for i, v in enumerate(col):
        if v is None or (isinstance(v, str) and v.strip().lower() in _MISSING):
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except (ValueError, TypeError):
            return out, i
    return out, None


def _classes(y: np.ndarray, what: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices ``0..C-1`` of labels ``y`` (in sorted order of the labels) and the labels
    as text; refuses non-integer numbers and a single class."""
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{what} holds NaN or infinite labels; give every sample a class label")
        if (y != np.round(y)).any():
            bad = y[y != np.round(y)][0]
            raise DataError(
                f"{what} holds non-integer labels (e.g. {bad:g}); forkpop classifies: give class labels "
                "(integers or names), or point data.label at the class column"
            )
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iub" and y.dtype.kind not in "US":
        raise DataError(f"{what} has labels of dtype {y.dtype}; give integers or strings")
    uniq, inv = np.unique(y, return_inverse=True)
    classes = tuple(u.decode(errors="replace") if isinstance(u, bytes) else str(u) for u in uniq.tolist())
    if len(uniq) < 2:
        raise DataError(
            f"{what} holds a single class ({classes[0]!r}) in {len(y)} rows; a classifier needs two or more: "
            "check the label column (data.label) or the file"
        )
    return inv.reshape(-1).astype(np.int64), classes


def _label_index(shown: str, names: list[str] | None, m: int, label: str | None, label_column: int) -> int:
    """The label column of a table of ``m`` columns: ``label`` by name, else (with a header and
    ``label_column`` at -1) the first of ``LABEL_NAMES``, else the last; else ``label_column``."""
    if label is not None:
        if names is None:
            raise DataError(
                f"data.label={label!r} names a column but {shown} has no header row; add a header row "
                "or use data.label_column (a column index)"
            )
        if label not in names:
            listed = ", ".join(names[:30]) + (f", ... ({m} columns)" if m > 30 else "")
            raise DataError(f"data.label={label!r} is not a column of {shown}; its columns are: {listed}")
        li = names.index(label)
    elif names is not None and label_column == -1:
        lower = [n.lower() for n in names]
        li = next((lower.index(n) for n in LABEL_NAMES if n in lower), m - 1)
    else:
        if not -m <= label_column < m:
            raise DataError(f"data.label_column={label_column} is out of range for the {m} columns of {shown}")
        li = label_column % m
    if m < 2:
        raise DataError(f"{shown} has one column; it needs feature columns and a label column (a comma-separated file)")
    return li


def _table(
    shown: str,
    names: list[str] | None,
    columns: list[Sequence],
    where: Callable[[int], str],
    label: str | None,
    label_column: int,
) -> _Source:
    """Inputs and labels of a table given as columns; ``names`` is its header (None: none, then
    every field must be a number). ``where(i)`` says where data row ``i`` is in the file."""
    m = len(columns)
    title = (lambda j: repr(names[j])) if names is not None else (lambda j: f"{j + 1}")
    li = _label_index(shown, names, m, label, label_column)
    feats = []
    for j in range(m):
        values, bad = _numeric(columns[j])
        if bad is not None and (names is None or j != li):
            if names is None:
                raise DataError(
                    f"{shown} could not be read: {where(bad)}, column {j + 1} holds {str(columns[j][bad])!r}, "
                    "not a number; a CSV without a header row must hold numbers only (add a header row naming "
                    "the columns to use string labels)"
                )
            raise DataError(
                f"{shown}: column {title(j)} holds {str(columns[j][bad])!r} on {where(bad)}, not a number; "
                "features must be numbers: encode that column as numbers or drop it"
            )
        if j == li:
            if bad is None:
                y = values
                missing = np.flatnonzero(np.isnan(y))
            else:  # class names
                texts = ["" if v is None else str(v).strip() for v in columns[j]]
                y = np.asarray(texts)
                missing = np.flatnonzero([t.lower() in _MISSING for t in texts])
            if len(missing):
                raise DataError(
                    f"{shown}: the label column {title(j)} is empty or missing on {where(int(missing[0]))} "
                    f"({len(missing)} of its {len(y)} rows); give every row a label or drop those rows"
                )
            continue
        finite = np.isfinite(values)
        if not finite.all():
            rows = np.flatnonzero(~finite)
            kind = "infinite" if np.isnan(values[rows]).sum() == 0 else "empty or NaN"
            raise DataError(
                f"{shown}: column {title(j)} is {kind} on {where(int(rows[0]))} ({len(rows)} of its {len(values)} "
                "rows); fill in those values or drop those rows"
            )
        feats.append(values)
    what = f"{shown}: the label column {title(li)}"
    yi, classes = _classes(y, what)
    x = np.column_stack(feats).astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{shown} holds features too large for float32; rescale them")
    return _Source(x, yi, classes, (x.shape[1],))


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _has_header(rows: list[list[str]]) -> bool:
    """The first row is a header when none of its fields is a number, or when one is not a
    number where the row below has a number."""
    first = [f.strip() for f in rows[0]]
    if not any(_is_number(f) for f in first):
        return True
    below = rows[1] if len(rows) > 1 else []
    return any(not _is_number(f) and j < len(below) and _is_number(below[j]) for j, f in enumerate(first))


def _load_csv_fast(p: Path, shown: str, label: str | None, label_column: int) -> _Source | None:
    """A clean CSV read by numpy's parser (several times faster); None where anything is off
    (a missing value, a stray field, a blank line before the header): the careful reader
    then reads it and says what is wrong."""
    import itertools

    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            head = list(itertools.islice(csv.reader(f), 2))
    except (UnicodeDecodeError, csv.Error):
        return None
    if len(head) < 2 or not head[0] or len(head[0]) != len(head[1]):
        return None
    header = _has_header(head)
    names = [c.strip() for c in head[0]] if header else None
    m = len(head[0])
    li = _label_index(shown, names, m, label, label_column)
    read = {"delimiter": ",", "skiprows": int(header), "comments": None, "encoding": "utf-8-sig", "quotechar": '"'}
    try:
        x = np.loadtxt(p, usecols=[j for j in range(m) if j != li], dtype=np.float64, ndmin=2, **read)
        texts = np.char.strip(np.loadtxt(p, usecols=[li], dtype=str, ndmin=1, **read))
    except Exception:
        return None
    if len(x) != len(texts) or not len(x) or not np.isfinite(x).all():
        return None
    y, bad = _numeric(texts)
    if bad is not None:
        if names is None or np.isin(np.char.lower(texts), list(_MISSING)).any():
            return None
        y = texts
    elif np.isnan(y).any():
        return None
    yi, classes = _classes(
        y, f"{shown}: the label column {names[li]!r}" if names else f"{shown}: the label column {li + 1}"
    )
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        return None
    return _Source(x32, yi, classes, (x32.shape[1],))


def _load_csv(p: Path, shown: str, label: str | None, label_column: int) -> _Source:
    fast = _load_csv_fast(p, shown, label, label_column)
    if fast is not None:
        return fast
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows, lines = [], []
            for r in reader:
                if any(c.strip() for c in r):
                    rows.append(r)
                    lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError(f"{shown} could not be read: it is not UTF-8 text; save it as a UTF-8 CSV") from None
    except csv.Error as e:
        raise DataError(f"{shown} could not be read ({e}); fix the file") from None
    if not rows:
        raise DataError(f"{shown} is empty; give a CSV with one row per sample (a header row first, optionally)")
    header = _has_header(rows)
    width = len(rows[0])
    for r, line in zip(rows, lines, strict=True):
        if len(r) != width:
            raise DataError(
                f"{shown} could not be read: line {line} has {len(r)} fields but line {lines[0]} has {width}; "
                "every row needs the same number of comma-separated fields"
            )
    names = [c.strip() for c in rows[0]] if header else None
    body, body_lines = (rows[1:], lines[1:]) if header else (rows, lines)
    if not body:
        raise DataError(f"{shown} has a header row but no data rows; add one row per sample")
    columns = [list(c) for c in zip(*body, strict=True)]
    return _table(shown, names, columns, lambda i: f"line {body_lines[i]}", label, label_column)


def _load_parquet(p: Path, shown: str, label: str | None, label_column: int) -> _Source:
    import pyarrow.parquet as pq

    table = pq.read_table(p)
    if table.num_rows == 0:
        raise DataError(f"{shown} is empty; give a table with one row per sample")
    names = [str(n) for n in table.column_names]
    columns = []
    for name in table.column_names:
        col = table.column(name)
        try:
            columns.append(col.to_numpy(zero_copy_only=False))
        except Exception:  # nested or otherwise odd types: as Python values
            columns.append(col.to_pylist())
    return _table(shown, names, columns, lambda i: f"row {i + 1}", label, label_column)


def _labels_beside(p: Path) -> list[Path]:
    """Where the labels of inputs saved as an ``.npy`` are looked for, in order."""
    stem, out = p.stem, []
    if stem in ("x", "X") or stem[:2] in ("x_", "X_", "x-", "X-"):
        out.append(p.with_name("y" + stem[1:] + ".npy"))
    if "images" in stem:
        out.append(p.with_name(stem.replace("images", "labels") + ".npy"))
    out.append(p.with_name(stem + "_labels.npy"))
    return out


def _load_arrays(p: Path, shown: str) -> _Source:
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            xname = "x" if "x" in z else "X" if "X" in z else None
            if xname is None or "y" not in z:
                raise DataError(f"{shown} needs arrays named 'x' and 'y' (has {sorted(z.files)})")
            x, y = z[xname], z["y"]
    else:
        x = np.load(p, allow_pickle=False)
        found = [q for q in _labels_beside(p) if q.is_file()]
        if not found:
            tried = ", ".join(q.name for q in _labels_beside(p))
            raise DataError(
                f"{shown} holds the inputs; save their labels as a 1-D array beside it, in {tried.split(', ')[-1]} "
                f"(looked for {tried}), or give one .npz with arrays x and y"
            )
        y = np.load(found[0], allow_pickle=False)
        shown = f"{shown} (labels {found[0].name})"
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(
            f"{shown}: x has shape {x.shape}; give (samples, features), (samples, H, W) or (samples, C, H, W)"
        )
    if x.dtype.kind not in "biuf":
        raise DataError(f"{shown}: x has dtype {x.dtype}; inputs must be numbers")
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise DataError(
            f"{shown}: x has {len(x)} rows and y {len(y) if y.ndim else 0} (shape {y.shape}); "
            "they must match, be non-empty, and y must be 1-D"
        )
    shape = tuple(int(s) for s in x.shape[1:])
    input_shape = (1, *shape) if len(shape) == 2 else shape
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    bad = np.argwhere(~np.isfinite(x))
    if len(bad):
        i, j = (int(v) for v in bad[0])
        raise DataError(
            f"{shown} holds NaN or infinite features ({len(bad)} values, the first at sample {i}, "
            f"flat feature {j}); clean the file"
        )
    yi, classes = _classes(y, f"{shown}: y")
    return _Source(x, yi, classes, input_shape)


def _load_file(path: str, label_column: int = -1, label: str | None = None) -> _Source:
    p = Path(path)
    shown = f"data.path {path!r}"
    if not p.is_file():
        raise DataError(f"{shown} is not a readable file; point data.path at a .csv, .npz, .npy or .parquet file")
    if p.suffix not in SUFFIXES:
        raise DataError(f"{shown}: unsupported suffix {p.suffix!r}; use {', '.join(SUFFIXES)}")
    if label is not None and p.suffix in (".npz", ".npy"):
        raise DataError(f"data.label={label!r} names a column, but {shown} holds arrays; unset data.label")
    if p.stat().st_size == 0:
        raise DataError(f"{shown} is empty; give a file with one row per sample")
    try:
        if p.suffix == ".csv":
            return _load_csv(p, shown, label, label_column)
        if p.suffix == ".parquet":
            return _load_parquet(p, shown, label, label_column)
        return _load_arrays(p, shown)
    except DataError:
        raise
    except Exception as e:  # numpy's and pyarrow's read errors are many; all mean the same to a user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(f"{shown} could not be read ({type(e).__name__}: {msg}); fix the file") from None


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """Samples per class in a stratified draw of ``n_draws``: the floored proportional share,
    the rest to the largest remainders, ties broken by ``rng`` (scikit-learn's rule, so splits
    are the ones ``train_test_split(stratify=...)`` makes)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need = int(n_draws - floored.sum())
    if need > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add = min(len(inds), need)
            floored[rng.choice(inds, size=add, replace=False)] += 1
            need -= add
            if need == 0:
                break
    return floored.astype(int)


def _stratified_split(y: np.ndarray, fraction: float | int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``(rest, held)``: ``fraction`` (a share, or a count) held out, every class in
    proportion. The same rows as scikit-learn's ``train_test_split(test_size=fraction,
    random_state=seed, stratify=y)``, without importing scikit-learn (seconds of start-up)."""
    n = len(y)
    n_held = int(np.ceil(fraction * n)) if isinstance(fraction, float) else int(fraction)
    n_rest = n - n_held
    if not 0 < n_held < n:
        raise DataError(f"cannot hold out {fraction} of {n} rows; use a fraction in (0, 1) or more data")
    classes, y_idx, counts = np.unique(y, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise DataError(
            f"cannot make a stratified split of {fraction}: class {classes[counts.argmin()]!r} has only 1 row; "
            "use more data or drop that class"
        )
    if min(n_rest, n_held) < len(classes):
        raise DataError(
            f"cannot make a stratified split of {fraction}: {min(n_rest, n_held)} rows for {len(classes)} classes; "
            "use more data or a larger fraction"
        )
    by_class = np.split(np.argsort(y_idx, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(counts, n_rest, rng)
    t_i = _approximate_mode(counts - n_i, n_held, rng)
    rest: list[int] = []
    held: list[int] = []
    for i in range(len(classes)):
        rows = by_class[i].take(rng.permutation(counts[i]), mode="clip")
        rest.extend(rows[: n_i[i]])
        held.extend(rows[n_i[i] : n_i[i] + t_i[i]])
    return rng.permutation(rest).astype(np.int64), rng.permutation(held).astype(np.int64)


@dataclass(frozen=True, eq=False)
class SplitPlan:
    """Which rows of the source go where: ``pool``/``val``/``test`` index the source's rows,
    ``niches[i]`` indexes ``pool`` in niche ``i``'s stream order.

    The driver makes the plan once (it needs scikit-learn's stratified split) and hands it to
    the workers with the spec: they still load the data themselves, but skip re-deriving it.
    """

    pool: np.ndarray
    val: np.ndarray
    test: np.ndarray
    niches: tuple[np.ndarray, ...]
    accept: np.ndarray | None = None


@functools.lru_cache(maxsize=4)
def _source_cached(key: str) -> _Source:
    spec = DataSpec(**json.loads(key))
    if spec.source == "digits":
        if spec.label is not None:
            raise DataError(f"data.label={spec.label!r} is set but data.source is 'digits'; unset data.label")
        x, y = _load_digits()
        return _Source(x, y, tuple(str(c) for c in range(10)), (x.shape[1],))
    if spec.source == "file":
        if not spec.path:
            raise DataError("data.source is 'file' but data.path is empty; set data.path")
        return _load_file(spec.path, spec.label_column, spec.label)
    raise DataError(f"unknown data.source {spec.source!r}; use 'digits' or 'file'")


def _check_rows(spec: DataSpec, y: np.ndarray, classes: tuple[str, ...]) -> None:
    """Refuse, in one line, data too small for its splits and niches."""
    what = f"data.path {spec.path!r}" if spec.source == "file" else f"data.source {spec.source!r}"
    counts = np.bincount(y)
    if counts.min() < 3:
        k = int(counts.argmin())
        raise DataError(
            f"{what}: class {classes[k]!r} has only {counts[k]} of the {len(y)} rows ({len(counts)} classes); each "
            "class needs at least 3 (for the test, validation and training splits): add rows, drop that class, or "
            "check that the label column (data.label) is the class"
        )
    n_test = math.ceil(spec.test_fraction * len(y))
    n_val = math.ceil(spec.val_fraction * (len(y) - n_test))
    n_accept = math.ceil(spec.accept_fraction * (len(y) - n_test))
    n_pool = len(y) - n_test - n_val - n_accept
    least = spec.min_niche_size if spec.partition == "dirichlet" else 1
    if n_pool < spec.n_niches * least:
        need = f"{spec.n_niches} niches" + (f" of at least {least} (data.min_niche_size)" if least > 1 else "")
        raise DataError(
            f"{what} has {len(y)} rows; {n_pool} remain for training after the test, validation and acceptance "
            "splits, "
            f"too few for {need}: use more rows or lower data.n_niches"
            + (" or data.min_niche_size" if least > 1 else "")
        )


@functools.lru_cache(maxsize=4)
def _plan_cached(key: str) -> SplitPlan:
    spec = DataSpec(**json.loads(key))
    src = _source_cached(key)
    y = src.y
    _check_rows(spec, y, src.classes)
    # The test split matches train_test_split(test_size=0.3, random_state=split_seed, stratify=y);
    # the validation split is held out of the rest, then the acceptance split out of what remains.
    train, test = _stratified_split(y, spec.test_fraction, spec.split_seed)
    pool_rel, val_rel = _stratified_split(y[train], spec.val_fraction, spec.split_seed)
    pool, val = train[pool_rel], train[val_rel]
    accept = None
    if spec.accept_fraction > 0:  # a share of the non-test data, as the validation split is
        n_accept = math.ceil(spec.accept_fraction * len(train))
        pool_rel, acc_rel = _stratified_split(y[pool], n_accept, spec.split_seed + 1)
        pool, accept = pool[pool_rel], pool[acc_rel]
    niches = partition(
        y[pool],
        spec.partition,
        spec.n_niches,
        np.random.default_rng(spec.seed),
        alpha=spec.alpha,
        shards_per_niche=spec.shards_per_niche,
        min_size=spec.min_niche_size,
    )
    return SplitPlan(pool, val, test, tuple(niches), accept)


_BUNDLES: dict[str, DataBundle] = {}


def _bundle_cached(key: str, plan: SplitPlan | None) -> DataBundle:
    if key in _BUNDLES:
        return _BUNDLES[key]
    src = _source_cached(key)
    plan = plan or _plan_cached(key)
    if len(_BUNDLES) >= 4:
        _BUNDLES.pop(next(iter(_BUNDLES)))
    spec = DataSpec(**json.loads(key))
    x, y = src.x, src.y
    scaling = None
    if spec.standardizes():  # the pool's statistics only: validation and test stay unseen
        pool = x[plan.pool].astype(np.float64)
        mean, std = pool.mean(axis=0), pool.std(axis=0)
        std[~(std > 0)] = 1.0
        scaling = Scaling(mean, std)
        x = ((x - mean) / std).astype(np.float32)
    x_pool, y_pool = x[plan.pool], y[plan.pool]
    n_classes = len(src.classes)
    poisoned = poison(spec, x_pool, y_pool, plan.niches, n_classes) if spec.poison_kind != "none" else ()
    bundle = _BUNDLES[key] = DataBundle(
        x_pool=x_pool,
        y_pool=y_pool,
        x_val=x[plan.val],
        y_val=y[plan.val],
        x_test=x[plan.test],
        y_test=y[plan.test],
        niches=plan.niches,
        n_classes=n_classes,
        plan=plan,
        poisoned=poisoned,
        classes=src.classes,
        input_shape=src.input_shape,
        scaling=scaling,
        x_accept=None if plan.accept is None else x[plan.accept],
        y_accept=None if plan.accept is None else y[plan.accept],
    )
    return bundle


POISONS = ("none", "label_flip", "backdoor", "noise")


def trigger(x: np.ndarray) -> np.ndarray:
    """The backdoor trigger: a bright 2x2 patch in the bottom-right corner of square images
    (the last 4 features of other data), at the data's maximum value. Returns a copy."""
    out = np.array(x, dtype=np.float32, copy=True)
    n = out.shape[1]
    side = int(round(n**0.5))
    hi = 1.0
    if side * side == n and side >= 4:
        img = out.reshape(len(out), side, side)
        img[:, -3:-1, -3:-1] = hi
        return img.reshape(len(out), n)
    out[:, -4:] = hi
    return out


def poison(
    spec: DataSpec, x_pool: np.ndarray, y_pool: np.ndarray, niches: tuple[np.ndarray, ...], n_classes: int
) -> tuple[int, ...]:
    """Alter ``spec.poison_niches`` niches in place (chosen by ``spec.seed``); returns their indices.

    ``label_flip``: labels y -> (y + 1) mod C; ``backdoor``: the trigger patch stamped on the
    inputs and the label set to ``backdoor_target``; ``noise``: Gaussian noise of
    ``noise_std`` added to the inputs. Each touches ``poison_rate`` of a niche's samples.
    Validation and test data are never altered.
    """
    if spec.poison_kind not in POISONS:
        raise DataError(f"unknown data.poison.kind {spec.poison_kind!r}; use one of {POISONS}")
    if not 0 <= spec.poison_niches <= len(niches):
        raise DataError(f"data.poison.niches is {spec.poison_niches} but there are {len(niches)} niches; lower it")
    if spec.poison_kind == "backdoor" and not 0 <= spec.backdoor_target < n_classes:
        raise DataError(f"data.poison.target {spec.backdoor_target} is not a class (0..{n_classes - 1}); change it")
    rng = np.random.default_rng([spec.seed, 7919])
    chosen = tuple(sorted(int(i) for i in rng.choice(len(niches), spec.poison_niches, replace=False)))
    for i in chosen:
        idx = niches[i]
        hit = np.sort(rng.choice(idx, max(1, int(round(spec.poison_rate * len(idx)))), replace=False))
        if spec.poison_kind == "label_flip":
            y_pool[hit] = (y_pool[hit] + 1) % n_classes
        elif spec.poison_kind == "backdoor":
            x_pool[hit] = trigger(x_pool[hit])
            y_pool[hit] = spec.backdoor_target
        else:
            x_pool[hit] = x_pool[hit] + rng.normal(0.0, spec.noise_std, x_pool[hit].shape).astype(np.float32)
    return chosen


def load_data(spec: DataSpec, plan: SplitPlan | None = None) -> DataBundle:
    """The bundle for ``spec``, cached per process (each worker loads its data once).

    ``plan``, when given, is the split the driver made for this same spec.
    """
    try:
        return _bundle_cached(spec.key(), plan)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise DataError(str(e)) from None
