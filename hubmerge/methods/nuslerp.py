"""NuSLERP (mergekit's): spherical interpolation between the task vectors of two fine-tunes, t = w1/(w0 + w1),
over the whole tensor (`nuslerp_flatten`, the default), each row, or each column (`nuslerp_row_wise`).

The norms and dot products come from a statistics pass (float64, per group), so no tensor is held whole.
"""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge.methods.generalized import PerTaskWeight, check_per_task, group_sums, per_entry, per_task
from hubmerge.methods.registry import MergeSpec, Method, Params, Piece, PieceVector, register

# mergekit's: norms are floored at NORM_FLOOR; 1 − cos² ≤ COLINEAR² interpolates linearly
NORM_FLOOR = 1e-7
COLINEAR = 1e-8


class NuslerpParams(Params):
    weight: PerTaskWeight = Field(1.0, description="w_t of the two fine-tunes; t = w1/(w0 + w1)")
    nuslerp_flatten: bool = Field(True, description="one angle for the whole tensor")
    nuslerp_row_wise: bool = Field(
        False, description="without flatten: one angle per column (mergekit's dim 0) instead of per row"
    )


def coefficients(sums: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(c0, c1) per group with nuslerp = c0·v0 + c1·v1, from the [G, 3] sums Σv0², Σv0·v1, Σv1²."""
    norm0 = sums[:, 0].sqrt().clamp(min=NORM_FLOOR)
    norm1 = sums[:, 2].sqrt().clamp(min=NORM_FLOOR)
    cos = (sums[:, 1] / (norm0 * norm1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.sin(theta)
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / torch.where(colinear, 1.0, sin))
    c1 = torch.where(colinear, t, torch.sin(t * theta) / torch.where(colinear, 1.0, sin))
    return c0, c1


def plan(params: NuslerpParams, task_names: list[str]) -> MergeSpec:
    w0, w1 = per_task(params.weight, task_names)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    groups = "tensor" if params.nuslerp_flatten else "column" if params.nuslerp_row_wise else "row"

    def statistics(piece: Piece) -> torch.Tensor:
        return group_sums(piece, piece.taus, groups)

    def compute(piece: Piece) -> torch.Tensor:
        n = piece.taus[0].numel()
        c0, c1 = (per_entry(c, piece, groups, n) for c in coefficients(piece.statistics, t))
        return piece.taus[0] * c0 + piece.taus[1] * c1

    return MergeSpec("nuslerp", "merged", PieceVector(compute, statistics=statistics))


register(
    Method(
        "nuslerp",
        NuslerpParams,
        "merged",
        "θ0 + slerp(τ0, τ1; t = w1/(w0+w1)) per tensor, row or column",
        "NuSLERP: spherical interpolation of two task vectors",
        plan=plan,
        check=check_per_task,
        min_tasks=2,
        max_tasks=2,
    )
)
