"""The native CPU kernel (``native_mlp.c``): a variant's whole lifetime of SGD in one C call.

The batched engine's torch path spends most of a step outside its matrix products: some 35
small ops of a few microseconds each, passes over weights and momentum buffers that no longer
fit the core's cache, and Python threads that wait for each other's interpreter lock. The C
kernel trains one variant at a time with everything in L2, and ctypes lets go of the GIL, so
one Python thread per core trains variants side by side.

It is built on first use with the machine's C compiler (``cc -O3 -march=native``: AVX2 and
FMA where the CPU has them, nothing assumed) into a cache folder keyed by the source, the
compiler, the flags and the CPU's features (``$FORKPOP_CACHE`` or ``~/.cache/forkpop``): about 1.5 s once per
machine, nothing after. Where there is no compiler, or the build fails, :func:`kernel`
answers None with the reason and the engine keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from forkpop.population.models import linear_chain
from torch import nn

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


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them: a library built on an
    AVX-512 node must not be loaded on an AVX2 one sharing the cache folder)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    parts = (version, " ".join(FLAGS), sys.platform, platform.machine(), _cpu_flags())
    key = hashlib.sha256(src + "\n".join(parts).encode()).hexdigest()[:16]
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
    d = lib.fp_distill
    d.restype = ctypes.c_int64
    d.argtypes = [
        ctypes.c_int, i32p, i32p, ctypes.c_float, i32p,  # L, dims, acts, slope, has_bias
        f32p, f32p, f32p, i64p, ctypes.c_int64, ctypes.c_int32,  # flat, x, target, idx, steps, bs
        ctypes.c_float, ctypes.c_float,  # temperature, lr
        f32p, i64p, ctypes.c_int64, ctypes.c_int64,  # probe x, probe y, probe rows, eval_every
        ctypes.POINTER(ctypes.c_double),  # loss_out
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


_ACT_CODES = {nn.ReLU: 1, nn.Tanh: 2, nn.Sigmoid: 3, nn.LeakyReLU: 4}


def native_layout(model: nn.Module) -> tuple | None:
    """The model as the native kernel's arguments (dims, activation codes, leaky slope, biases)
    as ctypes arrays, or None where it is not Linear layers with at most one activation
    between two of them and the last layer's output the logits."""
    chain = [m for m in (linear_chain(model) or []) if not isinstance(m, nn.Identity)]
    if not chain or not isinstance(chain[-1], nn.Linear):
        return None
    dims, acts, bias, slopes = [chain[0].in_features], [], [], set()
    for i, m in enumerate(chain):
        if isinstance(m, nn.Linear):
            if m.in_features != dims[-1]:
                return None
            if i > 0 and isinstance(chain[i - 1], nn.Linear):
                acts.append(0)
            dims.append(m.out_features)
            bias.append(int(m.bias is not None))
        elif isinstance(chain[i - 1], nn.Linear):
            acts.append(_ACT_CODES[type(m)])
            if isinstance(m, nn.LeakyReLU):
                slopes.add(float(m.negative_slope))
        else:
            return None  # two activations in a row
    if len(slopes) > 1 or len(bias) > 16:
        return None
    i32 = ctypes.c_int32
    return (
        (i32 * len(dims))(*dims),
        (i32 * max(1, len(acts)))(*acts),
        slopes.pop() if slopes else 0.01,
        (i32 * len(bias))(*bias),
    )


def ptr(t: torch.Tensor, ctype: type) -> ctypes._Pointer:
    """A ctypes pointer to ``t``'s first element (``t`` contiguous, of ``ctype``'s width)."""
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


def distill(
    model: nn.Module,
    init: torch.Tensor,
    x: torch.Tensor,
    target: torch.Tensor,
    batches: Callable[[], torch.Tensor],
    temperature: float,
    lr: float,
    probe: tuple[torch.Tensor, torch.Tensor] | None,
    eval_every: int,
) -> tuple[torch.Tensor, list[float]] | None:
    """The native kernel's distillation (``fp_distill``): Adam on the soft targets ``target``
    of the transfer set ``x`` over the mini-batches ``batches()`` draws ``(steps, batch)``; the
    student's weights and the loss per step, as :func:`forkpop.selection.distill.distill`
    defines them. None, with nothing drawn, where the kernel does not run here or does not
    take ``model``."""
    layout = native_layout(model)
    tensors = (init, x, target) + (probe[0],) if probe is not None else (init, x, target)
    if layout is None or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
        return None
    lib, _ = kernel()
    if lib is None:
        return None
    dims, acts, slope, bias = layout
    w = init.detach().to(torch.float32).contiguous().clone()
    x, target = x.contiguous(), target.contiguous()
    idx = batches().to(torch.int64).contiguous()
    steps, bs = idx.shape
    keep = eval_every > 0 and probe is not None
    px = probe[0].contiguous() if keep else torch.zeros(1, x.shape[1])
    py = probe[1].to(torch.int64).contiguous() if keep else torch.zeros(1, dtype=torch.int64)
    losses = np.zeros(max(1, steps), dtype=np.float64)
    rc = lib.fp_distill(
        len(dims) - 1, dims, acts, slope, bias,
        ptr(w, ctypes.c_float), ptr(x, ctypes.c_float), ptr(target, ctypes.c_float), ptr(idx, ctypes.c_int64),
        steps, bs, temperature, lr,
        ptr(px, ctypes.c_float), ptr(py, ctypes.c_int64), len(py) if keep else 0, eval_every if keep else 0,
        losses.ctypes.data_as(ctypes.POINTER(ctypes.c_double)),
    )  # fmt: skip
    if rc == -2:
        raise MemoryError("the native kernel could not allocate the student's buffers")
    return w, losses[:steps].tolist()
