"""forkpop: evolving, forking model populations (fork, learn online, select, distill).

The public surface::

    forkpop.run(config, *, overrides=None, seed=None, backend=None, tracking=True) -> Result
    forkpop.load(run_dir) -> Result          # summary, seed_model, lineage, config, run_dir
    forkpop.register(kind, name, obj)        # plug-ins: models, worlds, strategies, distillers

Models, worlds and strategies are also named by import path (``package.module:attr``) or
through entry points of installed packages (groups ``forkpop.models``, ``forkpop.worlds``,
``forkpop.strategies``); see :mod:`forkpop.plugins`. Errors are one-line ``ValueError``\\ s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from forkpop.plugins import PluginError, register

if TYPE_CHECKING:
    from forkpop.api import Result, load, run
    from forkpop.experiments.config import ConfigError

__version__ = "0.1.0"
__all__ = ["run", "load", "Result", "register", "PluginError", "ConfigError"]


def __getattr__(name: str) -> Any:  # the API imports torch, Ray, MLflow: only when used
    if name in ("run", "load", "Result"):
        from forkpop import api

        return getattr(api, name)
    if name == "ConfigError":
        from forkpop.experiments.config import ConfigError

        return ConfigError
    raise AttributeError(f"module 'forkpop' has no attribute {name!r}")
