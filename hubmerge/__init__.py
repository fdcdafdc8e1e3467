"""hubmerge: merge and compress fine-tuned checkpoints of one base model (TALL masks, Consensus Merging)."""

__version__ = "0.1.0"

from hubmerge.artifacts import CompressedMerge
from hubmerge.errors import HubmergeError
from hubmerge.recipe import Recipe, load_recipe, parse_recipe
from hubmerge.run import run_recipe

__all__ = [
    "CompressedMerge",
    "HubmergeError",
    "Recipe",
    "__version__",
    "load_recipe",
    "parse_recipe",
    "run_recipe",
]
