"""Model Breadcrumbs with TIES's sign consensus (mergekit's `breadcrumbs_ties`): the breadcrumbs band per
tensor (`breadcrumbs.py`), then only the entries agreeing with the sign of Σ_t w_t·τ_t."""

from __future__ import annotations

from functools import partial

from hubmerge.methods.breadcrumbs import CITATION, BreadcrumbsParams, plan
from hubmerge.methods.generalized import check_per_task
from hubmerge.methods.registry import Method, register

register(
    Method(
        "breadcrumbs_ties",
        BreadcrumbsParams,
        "merged",
        "θ0 + λ·Σ_t w_t·band(τ_t) over the entries agreeing with the elected sign",
        "Model Breadcrumbs with TIES's sign consensus",
        plan=partial(plan, name="breadcrumbs_ties", consensus=True),
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
        check=check_per_task,
    )
)
