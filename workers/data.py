"""Data sources and the fixed train / validation / test splits every run shares."""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from workers.niches import partition


class DataError(ValueError):
    """A data problem a user can fix (a path, a format, a partition that cannot be made)."""


@dataclass(frozen=True)
class DataSpec:
    """Everything needed to rebuild the same data anywhere: workers load it where they run."""

    source: str = "digits"
    path: str | None = None
    label_column: int = -1
    test_fraction: float = 0.3
    val_fraction: float = 0.1
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


@dataclass(frozen=True)
class DataBundle:
    """Arrays of one data set: ``x_*`` float32 ``(n, n_features)``, ``y_*`` int64 ``(n,)``.

    ``niches[i]`` indexes rows of ``x_pool``/``y_pool`` in the niche's fixed stream order.
    The test split is held out from selection and distillation; only reports read it.
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

    @property
    def n_features(self) -> int:
        return int(self.x_pool.shape[1])


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


def _load_file(path: str, label_column: int) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.path {path!r} is not a readable file; point data.path at an .npz or .csv file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "x" not in z or "y" not in z:
                    raise DataError(f"data.path {path!r} needs arrays named 'x' and 'y' (has {sorted(z.files)})")
                x, y = z["x"], z["y"]
        elif p.suffix == ".csv":
            table = np.loadtxt(p, delimiter=",", dtype=np.float64, ndmin=2)
            y = table[:, label_column]
            x = np.delete(table, label_column % table.shape[1], axis=1)
        else:
            raise DataError(f"data.path {path!r}: unsupported suffix {p.suffix!r}; use .npz or .csv")
    except DataError:
        raise
    except Exception as e:  # numpy's parse errors are many; all mean the same to a user
        raise DataError(f"data.path {path!r} could not be read ({type(e).__name__}: {e}); fix the file") from None
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    if len(x) != len(y) or len(x) == 0:
        raise DataError(f"data.path {path!r}: x has {len(x)} rows and y {len(y)}; they must match and be non-empty")
    if not np.isfinite(x).all():
        raise DataError(f"data.path {path!r} holds NaN or infinite features; clean the file")
    _, y = np.unique(np.asarray(y), return_inverse=True)
    return x, y.astype(np.int64)


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        rest, held = train_test_split(idx, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as e:
        raise DataError(
            f"cannot make a stratified split of {fraction} ({e}); use more data or a larger fraction"
        ) from None
    return np.asarray(rest), np.asarray(held)


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


@functools.lru_cache(maxsize=4)
def _source_cached(key: str) -> tuple[np.ndarray, np.ndarray]:
    spec = DataSpec(**json.loads(key))
    if spec.source == "digits":
        return _load_digits()
    if spec.source == "file":
        if not spec.path:
            raise DataError("data.source is 'file' but data.path is empty; set data.path")
        return _load_file(spec.path, spec.label_column)
    raise DataError(f"unknown data.source {spec.source!r}; use 'digits' or 'file'")


@functools.lru_cache(maxsize=4)
def _plan_cached(key: str) -> SplitPlan:
    spec = DataSpec(**json.loads(key))
    _, y = _source_cached(key)
    # The test split matches train_test_split(test_size=0.3, random_state=0, stratify=y).
    train, test = _stratified_split(y, spec.test_fraction, spec.split_seed)
    pool_rel, val_rel = _stratified_split(y[train], spec.val_fraction, spec.split_seed)
    pool, val = train[pool_rel], train[val_rel]
    niches = partition(
        y[pool],
        spec.partition,
        spec.n_niches,
        np.random.default_rng(spec.seed),
        alpha=spec.alpha,
        shards_per_niche=spec.shards_per_niche,
        min_size=spec.min_niche_size,
    )
    return SplitPlan(pool, val, test, tuple(niches))


_BUNDLES: dict[str, DataBundle] = {}


def _bundle_cached(key: str, plan: SplitPlan | None) -> DataBundle:
    if key in _BUNDLES:
        return _BUNDLES[key]
    x, y = _source_cached(key)
    plan = plan or _plan_cached(key)
    if len(_BUNDLES) >= 4:
        _BUNDLES.pop(next(iter(_BUNDLES)))
    spec = DataSpec(**json.loads(key))
    x_pool, y_pool = x[plan.pool], y[plan.pool]
    n_classes = int(y.max()) + 1
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
