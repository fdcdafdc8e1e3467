"""Validation search over α (scaling), λ per task (TALL masks) and k (consensus), as the paper chooses them.

The merge itself runs through the engine once per structural setting (one run for Task Arithmetic / TIES,
one per k for consensus, one per λ for TALL masks); α candidates are applied in place on the evaluation model
(θ = θ0 + α·v), so a search costs little more than its evaluations. Ties go to the smallest value. Scores are
maximized, except those of lower-is-better metrics (perplexity), which are minimized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hubmerge.compressed import CompressedMerge
from hubmerge.evaluation import Evaluator, Overlay, better, mean, normalized
from hubmerge.methods import METHODS
from hubmerge.recipe import Recipe, Search
from hubmerge.serving import TaskSwitcher
from hubmerge.sources import Provenance, open_local

# Runs the recipe's method with these parameters into a fresh directory and returns it (float32 output).
RunVariant = Callable[[dict[str, Any]], Path]


@dataclass
class SearchResult:
    parameters: dict[str, Any]  # the recipe's parameters with the chosen values
    chosen: dict[str, Any]  # only what was searched: {"scaling": 0.3} / {"lambda": {task: λ}} / ...
    rows: list[dict[str, Any]] = field(default_factory=list)  # every candidate with its validation scores
    finetuned: dict[str, float] = field(default_factory=dict)  # the normalization reference, per task


def scaled(base: Overlay, vector: Overlay, alpha: float) -> Overlay:
    """θ0 + α·v in float32, tensor by tensor."""
    return {k: base[k] + alpha * vector[k] for k in base}


def read_overlay(directory: Path, keys: list[str]) -> Overlay:
    """Tensors `keys` of a model directory written by hubmerge, as float32."""
    model = open_local(directory, Provenance(source=str(directory), location=str(directory)))
    try:
        return overlay_of(model.read, keys)
    finally:
        model.close()


def direction(output: Path, base: Overlay) -> Overlay:
    """The merge direction v of a merged model written with α = 1: its weights minus θ0."""
    weights = read_overlay(output, list(base))
    return {k: weights[k] - base[k] for k in base}


def run_search(
    recipe: Recipe,
    base: Overlay,
    finetuned: dict[str, Overlay],
    evaluator: Evaluator,
    run_variant: RunVariant,
) -> SearchResult:
    """Choose the searched parameters of `recipe.method` on `recipe.search.split`.

    Args:
        recipe: the recipe, with `search` and `evaluation` sections.
        base: θ0 of the merged tensors (float32).
        finetuned: θ_t of the merged tensors for every task, for the normalization reference.
        evaluator: scores overlays; prepared for the search split.
        run_variant: runs the method with given parameters (see `RunVariant`).
    """
    search, evaluation = recipe.search, recipe.evaluation
    assert search is not None and evaluation is not None
    split, metric = search.split, evaluation.metric
    reference = {t: evaluator.score(t, finetuned[t], split) for t in evaluator.tasks}
    result = SearchResult(parameters=dict(recipe.parameters), chosen={}, finetuned=reference)

    def row(setting: dict[str, Any], scores: dict[str, float]) -> dict[str, Any]:
        norm = normalized(scores, reference)
        entry = {**setting, "accuracy": scores, "normalized": norm, "mean_normalized": mean(norm)}
        result.rows.append(entry)
        return entry

    def best_alpha(vector: Overlay, setting: dict[str, Any]) -> dict[str, Any]:
        best = None
        for alpha in sorted(search.scaling):
            weights = scaled(base, vector, alpha)
            entry = row(
                {**setting, "scaling": alpha},
                {t: evaluator.score(t, weights, split) for t in evaluator.tasks},
            )
            if best is None or better(entry["mean_normalized"], best["mean_normalized"], metric):
                best = entry
        assert best is not None
        return best

    searchable = METHODS[recipe.method].searchable
    if "lambda" in searchable:
        result.chosen = {"lambda": _best_lambdas(recipe, search, base, evaluator, run_variant, row)}
    elif "k" in searchable:
        best = None
        for k in sorted(search.k):
            candidate = best_alpha(
                direction(run_variant({**recipe.parameters, "k": k, "scaling": 1.0}), base), {"k": k}
            )
            if best is None or better(candidate["mean_normalized"], best["mean_normalized"], metric):
                best = candidate
        assert best is not None
        result.chosen = {"k": best["k"], "scaling": best["scaling"]}
    else:
        # the method's name for α (`lambda` in mergekit's methods), replacing the recipe's value
        key = METHODS[recipe.method].params.model_fields["scaling"].alias or "scaling"
        unscaled = {k: v for k, v in recipe.parameters.items() if k not in ("scaling", key)}
        best = best_alpha(direction(run_variant({**unscaled, key: 1.0}), base), {})
        result.chosen = {key: best["scaling"]}
    result.parameters.update(result.chosen)
    return result


def _best_lambdas(
    recipe: Recipe,
    search: Search,
    base: Overlay,
    evaluator: Evaluator,
    run_variant: RunVariant,
    row: Callable[[dict[str, Any], dict[str, float]], dict[str, Any]],
) -> dict[str, float]:
    """Each task's λ on its own validation score: the masks of one λ are built and scored, then dropped."""
    assert recipe.evaluation is not None
    best: dict[str, tuple[float, float]] = {}
    for lam in sorted(search.lambdas):
        merge = CompressedMerge.from_pretrained(run_variant({**recipe.parameters, "lambda": lam}))
        switcher = TaskSwitcher(merge, evaluator.device, list(base), base)
        scores = {}
        for task in evaluator.tasks:
            scores[task] = evaluator.score(task, switcher.overlay(task), search.split)
            if task not in best or better(scores[task], best[task][1], recipe.evaluation.metric):
                best[task] = (lam, scores[task])
        row({"lambda": lam}, scores)
    return {task: lam for task, (lam, _) in best.items()}


def overlay_of(read: Callable[[str], torch.Tensor], keys: list[str]) -> Overlay:
    """The merged tensors of one checkpoint, as float32."""
    return {k: read(k).float() for k in keys}
