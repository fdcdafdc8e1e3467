"""Magnitude pruning (the paper's compression baseline): each task vector pruned to its top-density |τ_t|
entries and stored sparsely; task t = θ0 + m_t ⊙ τ_t."""

from __future__ import annotations

from hubmerge.methods.magnitude_masking import MagnitudeParams
from hubmerge.methods.registry import MergeSpec, Method, NoVector, register
from hubmerge.methods.tall import CITATION

register(
    Method(
        "magnitude_pruning",
        MagnitudeParams,
        "compressed",
        "per-task top-density of |τ_t|; task t = θ0 + m_t ⊙ τ_t",
        "each task vector pruned to its largest entries, stored sparsely",
        plan=lambda p, names: MergeSpec(
            "magnitude_pruning", "compressed", NoVector(), masks="magnitude", mask_density=p.density
        ),
        citation=CITATION,
    )
)
