"""DARE-TIES: DARE's random drop and rescale (`dare_linear.py`), then TIES's sign consensus as mergekit
computes it: entries that agree with the sign of Σ_t w_t·τ_t, optionally divided by their weights' sum."""

from __future__ import annotations

from functools import partial

from hubmerge.methods.dare_linear import CITATION, DareParams, plan
from hubmerge.methods.generalized import check_per_task
from hubmerge.methods.registry import Method, register

register(
    Method(
        "dare_ties",
        DareParams,
        "merged",
        "θ0 + λ·Σ_t w_t·DARE(τ_t) over the entries agreeing with sign(Σ_t w_t·DARE(τ_t))",
        "DARE-TIES: DARE's random drop and rescale, then TIES's sign consensus",
        plan=partial(plan, name="dare_ties", consensus=True),
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_per_task,
    )
)
