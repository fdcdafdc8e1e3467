"""DELLA (Deep et al., 2024): MAGPRUNE drops each entry of each task vector at random with a probability that
falls with its magnitude's rank in its row (keep probability from density − epsilon for the smallest to
density + epsilon for the largest), rescales what is kept back to the task vector's L1 norm per tensor, then
merges with the sign consensus (`della`) or without it (`della_linear`), as mergekit computes them.

Ranks are taken along mergekit's dimension 1 (the rows of a matrix); a 1-D tensor is one row. The random
stream is keyed by (seed, tensor, task, entry index), as for DARE.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from pydantic import Field

from hubmerge.methods.generalized import (
    PerTaskDensity,
    PerTaskWeight,
    Weight,
    check_per_task,
    generalized_vector,
    keyed_uniform,
    per_task,
)
from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Piece, register

CITATION = Citation(
    "Pala Tej Deep, Rishabh Bhardwaj, Soujanya Poria. "
    "*DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling.* 2024.",
    """@article{deep2024della,
  title={{DELLA}-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling},
  author={Deep, Pala Tej and Bhardwaj, Rishabh and Poria, Soujanya},
  journal={arXiv preprint arXiv:2406.11617},
  year={2024}
}""",
)


class DellaParams(Params):
    weight: PerTaskWeight = Field(1.0, description="w_t, each task vector's weight: a number or {task: w}")
    density: PerTaskDensity = Field(1.0, description="mean probability of keeping an entry")
    epsilon: float = Field(0.15, ge=0, lt=1, description="keep probabilities span density ± epsilon by rank")
    scaling: Weight = Field(1.0, alias="lambda", description="λ, multiplies the merged vector")
    normalize: bool = Field(True, description="divide by the sum of the weights that took part")
    rescale: bool = Field(True, description="scale what is kept back to the task vector's L1 norm per tensor")
    seed: int = Field(0, description="seed of the keyed random stream")


class DellaLinearParams(DellaParams):
    normalize: bool = Field(False, description="divide by the sum of the weights that took part")


def check_della(params: DellaParams, task_names: list[str]) -> None:
    check_per_task(params, task_names)
    for density in per_task(params.density, task_names):
        if density < 1 and not (density - params.epsilon > 0 and density + params.epsilon < 1):
            raise ValueError(
                f"parameters.epsilon: density ± epsilon must lie in (0, 1) (density {density}, "
                f"epsilon {params.epsilon})"
            )


def keep_probabilities(
    tau: torch.Tensor, shape: tuple[int, ...], density: float, epsilon: float
) -> torch.Tensor:
    """MAGPRUNE's keep probability of each entry of a flat piece of whole rows: density − epsilon for the
    smallest |τ| of its row up to density + epsilon for the largest (ties ranked by position)."""
    rows = tau.reshape(1, -1, 1) if len(shape) < 2 else tau.reshape(-1, shape[1], math.prod(shape[2:]))
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = order.argsort(dim=1, stable=True).to(torch.float32)  # 0-based: (rank − 1) in mergekit's terms
    width = rows.shape[1]
    scaled = ranks / (width - 1) if width > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + scaled.clamp_(0, 1) * (2 * epsilon)).reshape(-1)


def plan(
    params: DellaParams, task_names: list[str], name: str = "della", consensus: bool = True
) -> MergeSpec:
    densities = per_task(params.density, task_names)

    def sparsify(piece: Piece, task: int, tau: torch.Tensor) -> torch.Tensor:
        if densities[task] >= 1:
            return tau
        probability = keep_probabilities(tau, piece.shape, densities[task], params.epsilon)
        u = keyed_uniform(params.seed, piece.key, task, piece.start, tau.numel(), tau.device)
        return tau * (u < (probability.double() * 2**32).round().to(torch.int64))

    vector = generalized_vector(
        sparsify, per_task(params.weight, task_names), consensus, params.normalize, params.rescale
    )
    return MergeSpec(name, "merged", replace(vector, whole_rows=True), scaling=params.scaling)


register(
    Method(
        "della",
        DellaParams,
        "merged",
        "θ0 + λ·Σ_t w_t·MAGPRUNE(τ_t) over the entries agreeing with the elected sign, normalized",
        "DELLA: drop entries at random, the smaller the likelier, rescale, then TIES's sign consensus",
        plan=plan,
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_della,
    )
)
