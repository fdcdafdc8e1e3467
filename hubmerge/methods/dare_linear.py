"""DARE (Yu et al., 2024, "Language Models are Super Mario"): drop each entry of each task vector at random,
keeping it with probability `density`, rescale the kept ones by 1/density, then take the weighted sum.

The random stream is keyed by (seed, tensor, task, entry index) (`generalized.keyed_uniform`), so any number
of processes, any piece size and any device give the same bytes. `dare_ties` adds the sign consensus.
"""

from __future__ import annotations

from pydantic import Field

from hubmerge.methods.generalized import (
    PerTaskDensity,
    PerTaskWeight,
    Weight,
    bernoulli_keep,
    check_per_task,
    mix,
    per_task,
)
from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Piece, PieceVector, register

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
    density: PerTaskDensity = Field(1.0, description="share of each task vector's entries kept at random")
    scaling: Weight = Field(1.0, alias="lambda", description="λ, multiplies the merged vector")
    normalize: bool = Field(False, description="divide by the sum of the weights that took part")
    rescale: bool = Field(True, description="divide the kept entries by density (DARE's rescaling)")
    seed: int = Field(0, description="seed of the keyed random stream")


def dare(piece: Piece, densities: tuple[float, ...], rescale: bool, seed: int) -> list:
    """Each task vector of the piece with entries dropped at random (kept with probability density_t), the
    kept ones divided by density_t if `rescale`."""
    dropped = []
    for task, (tau, density) in enumerate(zip(piece.taus, densities, strict=True)):
        if density >= 1:
            dropped.append(tau)
            continue
        keep = bernoulli_keep(seed, piece.key, task, piece.start, density, tau.numel(), tau.device)
        kept = tau * keep
        dropped.append(kept / density if rescale else kept)
    return dropped


def plan(
    params: DareParams, task_names: list[str], name: str = "dare_linear", consensus: bool = False
) -> MergeSpec:
    weights, densities = per_task(params.weight, task_names), per_task(params.density, task_names)

    def compute(piece: Piece):
        return mix(dare(piece, densities, params.rescale, params.seed), weights, consensus, params.normalize)

    return MergeSpec(name, "merged", PieceVector(compute), scaling=params.scaling)


register(
    Method(
        "dare_linear",
        DareParams,
        "merged",
        "θ0 + λ·Σ_t w_t·DARE(τ_t), DARE = random keep at density, rescaled by 1/density",
        "DARE: drop task-vector entries at random and rescale, then add the weighted vectors",
        plan=plan,
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_per_task,
    )
)
