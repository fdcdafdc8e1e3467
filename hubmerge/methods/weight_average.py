"""Weight averaging (model soup): the mean of the fine-tuned models, θ0 + (1/T)·Σ τ_t."""

from __future__ import annotations

from hubmerge.methods.registry import MergeSpec, Method, NoParams, SumVector, register

register(
    Method(
        "weight_average",
        NoParams,
        "merged",
        "θ0 + (1/T)·Σ τ_t",
        "the mean of the fine-tuned models",
        plan=lambda p, names: MergeSpec("weight_average", "merged", SumVector(), scaling=1.0 / len(names)),
    )
)
