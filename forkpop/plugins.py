"""Plug-ins by registered name, import path (``package.module:attr``) or installed entry point.

Each kind (``models``, ``worlds``, ``strategies``, ``distillers``) has a registry. A name is
looked up in that order: the registry, an import path, then the entry points of the group
``forkpop.<kind>`` of installed packages. An import path's module is imported from
``sys.path`` (``PYTHONPATH``), else from the current directory. Ray actors resolve the same
names the same way (an import path's folder travels with the spec; see :func:`import_roots`);
a name registered with :func:`register` exists only in the process that registered it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

KINDS = ("models", "worlds", "strategies", "distillers", "learners")
_REGISTRY: dict[str, dict[str, Any]] = {k: {} for k in KINDS}
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class PluginError(ValueError):
    """A plug-in name that does not resolve; its message (one line) says what to change."""


def _kind(kind: str) -> dict[str, Any]:
    if kind not in _REGISTRY:
        raise PluginError(f"unknown plug-in kind {kind!r}; use one of {KINDS}")
    return _REGISTRY[kind]


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def register(kind: str, name: str, obj: Any | None = None) -> Any:
    """Register ``obj`` under ``name`` for ``kind``; without ``obj``, a decorator."""
    reg = _kind(kind)

    def put(o: Any) -> Any:
        reg[name] = o
        return o

    return put(obj) if obj is not None else put


def registry(kind: str) -> dict[str, Any]:
    """The live registry of ``kind``: name -> object (adding to it registers)."""
    return _kind(kind)


def registered(kind: str) -> list[str]:
    """The registered names of ``kind`` (not counting import paths or entry points)."""
    return sorted(_kind(kind))


def is_import_path(name: str) -> bool:
    """Whether ``name`` reads ``package.module:attr`` (dotted identifiers on both sides)."""
    mod, sep, attr = name.partition(":")
    return bool(sep and _DOTTED.fullmatch(mod) and _DOTTED.fullmatch(attr))


def entry_point_names(kind: str) -> list[str]:
    """The names installed packages offer for ``kind`` (entry point group ``forkpop.<kind>``)."""
    _kind(kind)
    try:
        return sorted({ep.name for ep in metadata.entry_points(group=f"forkpop.{kind}")})
    except Exception:  # a broken distribution's metadata
        return []


def _entry_point(kind: str, name: str, key: str) -> Any | None:
    try:
        eps = [ep for ep in metadata.entry_points(group=f"forkpop.{kind}") if ep.name == name]
    except Exception:  # a broken distribution's metadata
        return None
    if not eps:
        return None
    try:
        return eps[0].load()
    except Exception as e:
        raise PluginError(
            f"{key}={name!r}: the entry point {eps[0].value!r} of group 'forkpop.{kind}' does not load ({_line(e)})"
        ) from None


def _import_module(mod_name: str) -> Any:
    """``importlib.import_module``; a top-level module not found on ``sys.path`` is looked for in
    the current directory too (as ``python -m`` would), so ``forkpop run`` finds ``./mymodels.py``."""
    try:
        return importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        top = mod_name.split(".")[0]
        here = any(Path(cwd, top + suffix).exists() for suffix in ("", ".py"))
        if e.name != top or cwd in sys.path or "" in sys.path or not here:
            raise
        sys.path.append(cwd)
        importlib.invalidate_caches()
        return importlib.import_module(mod_name)


def _import(kind: str, name: str, key: str) -> Any:
    mod_name, _, attr = name.partition(":")
    try:
        mod = _import_module(mod_name)
    except ModuleNotFoundError as e:
        raise PluginError(
            f"{key}={name!r}: cannot import module {mod_name!r} ({_line(e)}); put it on PYTHONPATH, "
            "in the current directory, or install it"
        ) from None
    except Exception as e:  # the module itself fails: a syntax error, an exception at import
        raise PluginError(
            f"{key}={name!r}: importing module {mod_name!r} failed ({_line(e)}); fix the module"
        ) from None
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{key}={name!r}: module {mod_name!r} has no {attr!r}; check the name after ':'")
        obj = getattr(obj, part)
    return obj


def resolve(kind: str, name: str, key: str | None = None) -> Any:
    """The plug-in ``name`` of ``kind``; ``key`` (the config key) names it in errors."""
    reg = _kind(kind)
    key = key or kind
    if name in reg:
        return reg[name]
    if is_import_path(name):
        return _import(kind, name, key)
    found = _entry_point(kind, name, key)
    if found is not None:
        return found
    offered = registered(kind) + [n for n in entry_point_names(kind) if n not in reg]
    raise PluginError(
        f"{key}={name!r} is neither one of {offered} nor an import path 'package.module:attr' "
        f"nor an entry point of group 'forkpop.{kind}'; change {key}"
    )


def known(kind: str, name: str) -> bool:
    """Whether ``name`` is registered, an installed entry point, or reads as an import path
    (which is only imported by :func:`resolve`)."""
    return name in _kind(kind) or is_import_path(name) or name in entry_point_names(kind)


def import_roots(name: str) -> tuple[str, ...]:
    """Folders to put on ``sys.path`` elsewhere (a Ray actor) so that ``name`` imports there as
    it does here: the folder above the (top-level package of the) module of an import path,
    unless it is installed. Imports the module if it is not imported yet (errors: :func:`resolve`'s)."""
    if not is_import_path(name):
        return ()
    mod_name = name.partition(":")[0]
    mod = sys.modules.get(mod_name)
    if mod is None:
        _import("models", name, "plug-in")
        mod = sys.modules.get(mod_name)
    file = getattr(mod, "__file__", None)
    top = mod_name.split(".")[0]
    if not file or top == "forkpop":
        return ()
    root = Path(file).resolve().parent
    if Path(file).name.startswith("__init__."):
        root = root.parent
    for _ in range(mod_name.count(".")):
        root = root.parent
    if {"site-packages", "dist-packages"} & set(root.parts):
        return ()
    return (str(root),)


def add_import_roots(roots: tuple[str, ...] | list[str]) -> None:
    """Make the folders of :func:`import_roots` importable in this process (a worker)."""
    added = False
    for r in roots:
        if r not in sys.path and Path(r).is_dir():
            sys.path.insert(0, r)
            added = True
    if added:
        importlib.invalidate_caches()


def accepts(factory: Callable[..., Any], name: str, through_kwargs: bool = True) -> bool:
    """Whether ``factory`` takes the keyword argument ``name``: by that name, or (with
    ``through_kwargs``) any name through ``**kw``. A signature that cannot be read counts as
    taking it only with ``through_kwargs``."""
    import inspect

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return through_kwargs
    p = params.get(name)
    if p is not None:
        return p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return through_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
