"""Model Stock (Jang et al., ECCV 2024): θ0 + t·mean(τ_t), with t = N·cos/(1 + (N − 1)·cos) from the mean
cosine between the task vectors, per tensor (or per row with `filter_wise`), as mergekit computes it.

The cosines come from a statistics pass (Σ τ_i·τ_j per tensor or row, float64), so no tensor is held whole.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge.methods.generalized import group_sums, pair_index, per_entry
from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Piece, PieceVector, register
from hubmerge.methods.task_arithmetic import sum_in_task_order

CITATION = Citation(
    "Dong-Hwan Jang, Sangdoo Yun, Dongyoon Han. *Model Stock: All We Need Is Just a Few Fine-Tuned Models.* "
    "ECCV 2024.",
    """@inproceedings{jang2024model,
  title={Model Stock: All We Need Is Just a Few Fine-Tuned Models},
  author={Jang, Dong-Hwan and Yun, Sangdoo and Han, Dongyoon},
  booktitle={European Conference on Computer Vision},
  year={2024}
}""",
)
# mergekit's guards: the norm product's floor, and the denominator below which t is 0 (θ0 is kept)
NORM_FLOOR = 1e-6
SINGULAR = 1e-6


class ModelStockParams(Params):
    filter_wise: bool = Field(
        False, description="one t per row (along the last dimension) instead of per tensor"
    )


def interpolation(sums: torch.Tensor, count: int) -> torch.Tensor:
    """t per group from the [G, P] pair sums of the task vectors."""
    column = pair_index(count)
    norms = [sums[:, column[i, i]].sqrt() for i in range(count)]
    cosines = [
        (sums[:, column[i, j]] / (norms[i] * norms[j]).clamp(min=NORM_FLOOR)).clamp(-1, 1)
        for i in range(count)
        for j in range(i + 1, count)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))


def plan(params: ModelStockParams, task_names: list[str]) -> MergeSpec:
    groups = "row" if params.filter_wise else "tensor"

    def statistics(piece: Piece) -> torch.Tensor:
        return group_sums(piece, piece.taus, groups)

    def compute(piece: Piece) -> torch.Tensor:
        t = per_entry(interpolation(piece.statistics, len(piece.taus)), piece, groups, piece.taus[0].numel())
        return sum_in_task_order(piece.taus).div_(len(piece.taus)).mul_(t)

    return MergeSpec("model_stock", "merged", PieceVector(compute, statistics=statistics))


register(
    Method(
        "model_stock",
        ModelStockParams,
        "merged",
        "θ0 + t·mean(τ_t), t = N·cos/(1 + (N−1)·cos) from the mean pairwise cosine of the τ_t",
        "Model Stock: move from the base toward the average by the angle between the task vectors",
        plan=plan,
        citation=CITATION,
        min_tasks=2,
    )
)
