"""DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of each task vector at random,
keeping it with probability `density`, rescale what is kept, then take the weighted sum.

As in mergekit, `rescale` scales each task's kept entries back to the L1 norm its task vector had over the
tensor (a statistics pass), rather than by 1/density. The random stream is keyed by (seed, tensor, task,
entry index) (`generalized.keyed_uniform`), so any number of processes, any piece size and any device give
the same bytes; mergekit draws from torch's global generator, so its bytes cannot be reproduced.
`dare_ties` adds the sign consensus.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge.methods.generalized import (
    PerTaskDensity,
    PerTaskWeight,
    Weight,
    bernoulli_keep,
    check_per_task,
    generalized_vector,
    per_task,
)
from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Piece, register

CITATION = Citation(
    "Le Yu, Bowen Yu, Haiyang Yu, Fei Huang, Yongbin Li. "
    "*Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch.* ICML 2024.",
    """@inproceedings{yu2024language,
  title={Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch},
  author={Yu, Le and Yu, Bowen and Yu, Haiyang and Huang, Fei and Li, Yongbin},
  booktitle={International Conference on Machine Learning},
  year={2024}
}""",
)


class DareParams(Params):
    weight: PerTaskWeight = Field(1.0, description="w_t, each task vector's weight: a number or {task: w}")
    density: PerTaskDensity = Field(
        1.0, description="probability of keeping each entry: a number or {task: p}"
    )
    scaling: Weight = Field(1.0, alias="lambda", description="λ, multiplies the merged vector")
    normalize: bool = Field(False, description="divide by the sum of the weights that took part")
    rescale: bool = Field(True, description="scale what is kept back to the task vector's L1 norm per tensor")
    seed: int = Field(0, description="seed of the keyed random stream")


def random_drop(densities: tuple[float, ...], seed: int):
    """Keep each entry of task t with probability density_t, from the keyed stream."""

    def sparsify(piece: Piece, task: int, tau: torch.Tensor) -> torch.Tensor:
        if densities[task] >= 1:
            return tau
        keep = bernoulli_keep(seed, piece.key, task, piece.start, densities[task], tau.numel(), tau.device)
        return tau * keep

    return sparsify


def plan(
    params: DareParams, task_names: list[str], name: str = "dare_linear", consensus: bool = False
) -> MergeSpec:
    vector = generalized_vector(
        random_drop(per_task(params.density, task_names), params.seed),
        per_task(params.weight, task_names),
        consensus,
        params.normalize,
        params.rescale,
    )
    return MergeSpec(name, "merged", vector, scaling=params.scaling)


register(
    Method(
        "dare_linear",
        DareParams,
        "merged",
        "θ0 + λ·Σ_t w_t·DARE(τ_t): random keep at density, rescaled to τ_t's L1 norm",
        "DARE: drop task-vector entries at random and rescale, then add the weighted vectors",
        plan=plan,
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_per_task,
    )
)
