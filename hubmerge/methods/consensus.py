"""Consensus Merging (Wang, Dimitriadis et al., ICML 2024): keep the entries of τ_MTL that at least k TALL
masks contain, dropping "selfish" (one task) and "catastrophic" (no task) weights."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from hubmerge.methods.registry import MergeSpec, Method, Scaling, register
from hubmerge.methods.tall import CITATION, TallParams, check_tall


class ConsensusParams(TallParams):
    k: Annotated[int, Field(ge=0, strict=True)] = Field(
        2, description="keep entries in >= k task masks (1 drops catastrophic, 2 also selfish)"
    )
    scaling: Scaling = Field(1.0, description="α, multiplies the filtered τ_MTL")


def check_consensus(params: ConsensusParams, task_names: list[str]) -> None:
    check_tall(params, task_names)
    if params.k > len(task_names):
        raise ValueError(f"parameters.k: {params.k} is larger than the number of tasks ({len(task_names)})")


register(
    Method(
        "consensus",
        ConsensusParams,
        "merged",
        "θ0 + α·(τ_MTL ⊙ 1{#TALL masks >= k})",
        "Consensus Merging: drop the entries fewer than k TALL masks contain",
        plan=lambda p, names: MergeSpec(
            "consensus",
            "merged",
            p.vector(names),
            scaling=p.scaling,
            masks="tall",
            lambdas=p.lambdas(names),
            consensus_k=p.k,
        ),
        searchable=("k", "scaling"),
        citation=CITATION,
        check=check_consensus,
    )
)
