"""The native CPU kernel (``native_mlp.c``): a variant's whole lifetime of SGD in one C call.

The batched engine's torch path spends most of a step outside its matrix products: some 35
small ops of a few microseconds each, passes over weights and momentum buffers that no longer
fit the core's cache, and Python threads that wait for each other's interpreter lock. The C
kernel trains one variant at a time with everything in L2, and ctypes lets go of the GIL, so
one Python thread per core trains variants side by side.

It is built on first use with the machine's C compiler (``cc -O3 -march=native``: AVX2 and
FMA where the CPU has them, nothing assumed) into a cache folder keyed by the source, the
compiler and the flags (``$FORKPOP_CACHE`` or ``~/.cache/forkpop``): about 1.5 s once per
machine, nothing after. Where there is no compiler, or the build fails, :func:`kernel`
answers None with the reason and the engine keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

SOURCE = Path(__file__).with_name("native_mlp.c")
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-std=gnu11")

_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, str] | None = None


def cache_dir() -> Path:
    base = os.environ.get("FORKPOP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "forkpop")
    return Path(base) / "native"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(FLAGS).encode() + sys.platform.encode()).hexdigest()[:16]
    out = cache_dir() / f"mlp-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and renamed into place: processes building at once never see half a file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError((r.stderr.strip().splitlines() or ["failed"])[-1])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("FORKPOP_NATIVE", "1") == "0":
        return None, "FORKPOP_NATIVE=0"
    cc = _compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or clang) on PATH"
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        return None, f"the native kernel did not build: {e}"
    f = lib.fp_train_variant
    i32p, i64p, f32p = (ctypes.POINTER(t) for t in (ctypes.c_int32, ctypes.c_int64, ctypes.c_float))
    f.restype = ctypes.c_int64
    # fmt: off
    f.argtypes = [
        ctypes.c_int, i32p, i32p, ctypes.c_float, i32p,  # L, dims, acts, slope, has_bias
        f32p, f32p, i64p, i64p, i64p, ctypes.c_int32,  # flat, x_pool, y_pool, table, cnt, bsz
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,  # off, nb, steps
        ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,  # lr, mom, wd, clip, exploded
        f32p, i32p,  # loss_out, hit_out
    ]
    # fmt: on
    return lib, ""


def kernel() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel and "", or None and why not (built once per process)."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
        return _loaded
