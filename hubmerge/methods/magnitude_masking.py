"""Magnitude masking (the paper's compression baseline): Σ τ_t shared, and per task a mask of its
top-density |τ_t| entries; task t = θ0 + m_t ⊙ Σ τ."""

from __future__ import annotations

from pydantic import Field

from hubmerge.methods.registry import Density, MergeSpec, Method, Params, SumVector, register
from hubmerge.methods.tall import CITATION


class MagnitudeParams(Params):
    density: Density = Field(0.1, description="share of each task's entries kept: its largest |τ_t|")


register(
    Method(
        "magnitude_masking",
        MagnitudeParams,
        "compressed",
        "Σ τ + per-task top-density mask of |τ_t|; task t = θ0 + m_t ⊙ Σ τ",
        "the summed task vectors with a magnitude mask per task",
        plan=lambda p, names: MergeSpec(
            "magnitude_masking", "compressed", SumVector(), masks="magnitude", mask_density=p.density
        ),
        citation=CITATION,
    )
)
