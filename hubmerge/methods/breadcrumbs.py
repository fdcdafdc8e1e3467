"""Model Breadcrumbs (Davari & Belilovsky, 2024): per tensor, drop both the largest `gamma` share of each task
vector's entries (outliers) and the smallest ones, keeping a `density` share in between; then the weighted
sum. `breadcrumbs_ties` adds the sign consensus.

The band comes from two per-tensor thresholds found by exact radix selection, so a tensor is never held
whole; entries tied with a threshold are all kept (mergekit breaks such ties by its sort order).
"""

from __future__ import annotations

from functools import partial

import torch
from pydantic import Field

from hubmerge.methods.generalized import (
    PerTaskWeight,
    Weight,
    check_per_task,
    generalized_vector,
    per_task,
)
from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Piece, register

CITATION = Citation(
    "MohammadReza Davari, Eugene Belilovsky. "
    "*Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks.* ECCV 2024.",
    """@inproceedings{davari2024model,
  title={Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks},
  author={Davari, MohammadReza and Belilovsky, Eugene},
  booktitle={European Conference on Computer Vision},
  year={2024}
}""",
)


class BreadcrumbsParams(Params):
    weight: PerTaskWeight = Field(1.0, description="w_t, each task vector's weight: a number or {task: w}")
    density: float = Field(
        1.0, gt=0, le=1, description="share of each tensor's entries kept per task (1: all)"
    )
    gamma: float = Field(0.01, ge=0, lt=1, description="share of each tensor's largest |τ_t| dropped")
    scaling: Weight = Field(1.0, alias="lambda", description="λ, multiplies the merged vector")
    normalize: bool = Field(False, description="divide by the sum of the weights that took part")
    rescale: bool = Field(
        False, description="scale what is kept back to the task vector's L1 norm per tensor"
    )


def band(count: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries dropped below, entries dropped above) of a tensor of `count` entries, as mergekit counts."""
    kept, top = int(density * count), int(gamma * count)
    bottom = count - kept - top
    if bottom < 0:
        top, bottom = top + bottom, 0
    return bottom, top


def lower_rank(count: int, density: float, gamma: float) -> int:
    """Rank (ascending |τ|) of the smallest kept entry; 0 when nothing is dropped below."""
    bottom, _ = band(count, density, gamma)
    return bottom + 1 if bottom > 0 else 0


def upper_rank(count: int, density: float, gamma: float) -> int:
    """Rank (ascending |τ|) of the largest kept entry; 0 when nothing is dropped above."""
    _, top = band(count, density, gamma)
    return count - top if top > 0 else 0


def in_band(tau: torch.Tensor, lower: float | None, upper: float | None) -> torch.Tensor:
    """τ with the entries outside [lower, upper] in magnitude zeroed (None: no bound)."""
    magnitude = tau.abs()
    keep = torch.ones_like(tau, dtype=torch.bool)
    if lower is not None:
        keep &= magnitude >= lower
    if upper is not None:
        keep &= magnitude <= upper
    return tau * keep


def plan(
    params: BreadcrumbsParams, task_names: list[str], name: str = "breadcrumbs", consensus: bool = False
) -> MergeSpec:
    def sparsify(piece: Piece, task: int, tau: torch.Tensor) -> torch.Tensor:
        lower, upper = piece.thresholds
        return in_band(tau, lower[task], upper[task])

    ranks = (
        partial(lower_rank, density=params.density, gamma=params.gamma),
        partial(upper_rank, density=params.density, gamma=params.gamma),
    )
    vector = generalized_vector(
        sparsify, per_task(params.weight, task_names), consensus, params.normalize, params.rescale, ranks
    )
    return MergeSpec(name, "merged", vector, scaling=params.scaling)


register(
    Method(
        "breadcrumbs",
        BreadcrumbsParams,
        "merged",
        "θ0 + λ·Σ_t w_t·band(τ_t): per tensor, drop the top gamma and keep the next density of |τ_t|",
        "Model Breadcrumbs: drop each task vector's outliers and smallest entries per tensor, then add",
        plan=plan,
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_per_task,
    )
)
