"""hubmerge: merge and compress fine-tuned checkpoints of one base model (TALL masks, Consensus Merging).

The public names are imported on first use: most of them pull in torch, which would make `hubmerge --help`
and `hubmerge --version` take seconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hubmerge.compressed import CompressedMerge
    from hubmerge.errors import (
        ArtifactFormatError,
        HubAccessError,
        HubmergeError,
        OutputError,
        RecipeError,
        SourceError,
    )
    from hubmerge.output import read_record
    from hubmerge.recipe import Recipe, load_recipe, parse_recipe
    from hubmerge.record import RunRecord
    from hubmerge.run import run_recipe

_HOMES = {
    "CompressedMerge": "hubmerge.compressed",
    "HubmergeError": "hubmerge.errors",
    "RecipeError": "hubmerge.errors",
    "SourceError": "hubmerge.errors",
    "HubAccessError": "hubmerge.errors",
    "ArtifactFormatError": "hubmerge.errors",
    "OutputError": "hubmerge.errors",
    "RunRecord": "hubmerge.record",
    "read_record": "hubmerge.output",
    "Recipe": "hubmerge.recipe",
    "load_recipe": "hubmerge.recipe",
    "parse_recipe": "hubmerge.recipe",
    "run_recipe": "hubmerge.run",
}

__all__ = [
    "ArtifactFormatError",
    "CompressedMerge",
    "HubAccessError",
    "HubmergeError",
    "OutputError",
    "Recipe",
    "RecipeError",
    "RunRecord",
    "SourceError",
    "__version__",
    "load_recipe",
    "parse_recipe",
    "read_record",
    "run_recipe",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hubmerge' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
