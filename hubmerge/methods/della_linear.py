"""DELLA without the sign consensus (mergekit's `della_linear`): MAGPRUNE (`della.py`), then the weighted sum."""

from __future__ import annotations

from functools import partial

from hubmerge.methods.della import CITATION, DellaLinearParams, check_della, plan
from hubmerge.methods.registry import Method, register

register(
    Method(
        "della_linear",
        DellaLinearParams,
        "merged",
        "θ0 + λ·Σ_t w_t·MAGPRUNE(τ_t)",
        "DELLA's magnitude-ranked random drop and rescale, then the weighted sum",
        plan=partial(plan, name="della_linear", consensus=False),
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_della,
    )
)
