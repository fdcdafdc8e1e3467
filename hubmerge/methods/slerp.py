"""SLERP between the base and one fine-tune, per tensor, as mergekit computes it: the angle between the two
weight tensors (normalized over the whole tensor), and linear interpolation when they are nearly collinear.

The norms and the dot product come from a statistics pass (float64), so no tensor is held whole.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from hubmerge.methods.generalized import group_sums
from hubmerge.methods.registry import MergeSpec, Method, Params, Piece, PieceVector, register
from hubmerge.methods.task_arithmetic import exact_float32_operand

# mergekit's: |cos| above this interpolates linearly; norms below EPS count as 1
DOT_THRESHOLD = 0.9995
EPS = 1e-8


class SlerpParams(Params):
    t: float = Field(0.5, ge=0, le=1, description="interpolation factor: 0 is the base, 1 the fine-tune")


def coefficients(sums: torch.Tensor, t: float) -> tuple[float, float]:
    """(c0, c1) with slerp(θ0, θ1) = c0·θ0 + c1·θ1, from Σθ0², Σθ0·θ1, Σθ1² of one tensor."""
    square0, dot, square1 = (float(x) for x in sums.reshape(-1))
    norm0, norm1 = math.sqrt(square0), math.sqrt(square1)
    norm0, norm1 = (norm0 if norm0 > EPS else 1.0), (norm1 if norm1 > EPS else 1.0)
    cos = min(max(dot / (norm0 * norm1), -1.0), 1.0)
    if abs(cos) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def plan(params: SlerpParams, task_names: list[str]) -> MergeSpec:
    def weights(piece: Piece) -> list[torch.Tensor]:
        return [piece.base.float(), exact_float32_operand(piece.thetas[0]).float()]

    def statistics(piece: Piece) -> torch.Tensor:
        return group_sums(piece, weights(piece), "tensor")

    def compute(piece: Piece) -> torch.Tensor:
        c0, c1 = coefficients(piece.statistics, params.t)
        theta0, theta1 = weights(piece)
        return (theta0 * c0).add_(theta1 * c1).sub_(theta0)

    return MergeSpec("slerp", "merged", PieceVector(compute, statistics=statistics))


register(
    Method(
        "slerp",
        SlerpParams,
        "merged",
        "slerp(θ0, θ1; t) per tensor: sin((1−t)Ω)/sin Ω·θ0 + sin(tΩ)/sin Ω·θ1",
        "SLERP: spherical interpolation between the base and one fine-tuned model",
        plan=plan,
        min_tasks=1,
        max_tasks=1,
    )
)
