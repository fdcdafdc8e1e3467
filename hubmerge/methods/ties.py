"""TIES-Merging (Yadav et al., 2023): trim, elect the sign, disjoint merge — the reference's semantics."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from hubmerge.methods.registry import (
    Citation,
    Density,
    MergeSpec,
    Method,
    Params,
    Scaling,
    TiesMerge,
    TiesVector,
    register,
)
from hubmerge.methods.task_arithmetic import sum_in_task_order

CITATION = Citation(
    "Prateek Yadav, Derek Tam, Leshem Choshen, Colin Raffel, Mohit Bansal. "
    "*TIES-Merging: Resolving Interference When Merging Models.* NeurIPS 2023.",
    """@inproceedings{yadav2023ties,
  title={{TIES}-Merging: Resolving Interference When Merging Models},
  author={Yadav, Prateek and Tam, Derek and Choshen, Leshem and Raffel, Colin and Bansal, Mohit},
  booktitle={Advances in Neural Information Processing Systems},
  year={2023}
}""",
)


class TiesOptions(Params):
    density: Density = Field(0.2, description="share of each task vector kept: its largest |τ_t| entries")
    merge: TiesMerge = Field("mean", description="mean | sum | max of the entries that agree with the sign")
    trim: Literal["global", "tensor"] = Field(
        "global", description="global: top density over the whole model (the paper's); tensor: per tensor"
    )

    def vector(self) -> TiesVector:
        return TiesVector(density=self.density, merge=self.merge, trim=self.trim)


class TiesParams(TiesOptions):
    scaling: Scaling = Field(1.0, description="α, multiplies the TIES vector")


class InnerTiesOptions(TiesOptions):
    """TIES as TALL masks and Consensus use it: the reference hard-codes K = 20 with dis-sum."""

    merge: TiesMerge = Field("sum", description="mean | sum | max of the entries that agree with the sign")


def trim(taus: list[torch.Tensor], thresholds: list[float | None]) -> list[torch.Tensor]:
    """Zero every entry below its task's magnitude threshold (ties kept).

    Args:
        taus: float32 task vectors, task order.
        thresholds: one per task; None keeps the task whole (density 1).

    Returns:
        The trimmed task vectors (τ_t ⊙ mask, a product as in the reference, so −0.0 can appear).
    """
    return [
        tau.clone() if thr is None else tau.abs().ge_(thr).mul_(tau)
        for tau, thr in zip(taus, thresholds, strict=True)
    ]


def elect_sign(trimmed: list[torch.Tensor]) -> torch.Tensor:
    """s = sign of the float32 sum of the trimmed vectors (not a vote count); 0 where they cancel."""
    return sum_in_task_order(trimmed).sign_()


def sign_count(sign: torch.Tensor) -> int:
    """Σ s as an exact integer; the model-wide majority sign is the sign of its total over all pieces."""
    return int(sign.to(torch.int64).sum())


def resolve_zero_signs(sign: torch.Tensor, majority: int) -> torch.Tensor:
    """Replace s = 0 by the model-wide majority sign (itself possibly 0).

    Args:
        sign: elected signs of one piece.
        majority: −1, 0 or +1, from all d coordinates.

    Returns:
        The signs used for the disjoint merge.
    """
    return sign.masked_fill(sign == 0, float(majority))


def disjoint_merge(trimmed: list[torch.Tensor], sign: torch.Tensor, merge: TiesMerge) -> torch.Tensor:
    """Merge only the entries that agree with the elected sign.

    Where the sign is > 0 an entry is kept if > 0, otherwise if < 0 (so a 0 sign keeps negative entries,
    the reference's quirk when the majority is 0).

    Args:
        trimmed: trimmed task vectors, task order.
        sign: resolved elected signs.
        merge: `mean` (over the kept nonzero entries), `sum`, or `max` (largest |kept| times the sign).

    Returns:
        The merged task vector τ_MTL of this piece, float32.
    """
    # keep τ > 0 where the sign is > 0 and τ < 0 elsewhere (sign 0 included): τ·direction > 0 does both;
    # the products by a 0/1 mask give τ's signed zeros, as the reference's τ * bool does
    direction = torch.where(sign > 0, 1.0, -1.0)
    total = kept = largest = None
    for tau in trimmed:
        selected = torch.mul(tau, direction).gt_(0).mul_(tau)
        if merge == "max":
            largest = (
                selected.abs_() if largest is None else torch.maximum(largest, selected.abs_(), out=largest)
            )
            continue
        if merge == "mean":
            kept = (selected != 0).float() if kept is None else kept.add_(selected != 0)
        total = selected.add_(0.0) if total is None else total.add_(selected)  # from +0.0, as .sum(0)
    if merge == "sum":
        return total
    if merge == "mean":
        return total.div_(kept.clamp_(min=1))
    if merge == "max":
        return largest.mul_(sign)
    raise ValueError(f"unknown TIES merge {merge!r}")


register(
    Method(
        "ties",
        TiesParams,
        "merged",
        "θ0 + α·TIES(τ): trim to the top density per task, elect signs, disjoint merge",
        "TIES-Merging: trim each task vector, elect signs, merge the agreeing entries",
        plan=lambda p, names: MergeSpec("ties", "merged", p.vector(), scaling=p.scaling),
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
    )
)
