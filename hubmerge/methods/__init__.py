"""The merge methods, one module each, and their registry (`registry.py`).

Importing this package imports every module in it, and each method module registers itself, so `METHODS`
lists every method; the recipe, CLI, search, card and engine read it. docs/adding-a-method.md shows how to
add one.
"""

from __future__ import annotations

import importlib
import pkgutil

from hubmerge.methods.registry import METHODS, Citation, MergeSpec, Method, Params

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Citation", "MergeSpec", "Method", "Params"]
