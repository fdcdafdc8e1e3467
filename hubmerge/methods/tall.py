"""TALL masks (Wang, Dimitriadis et al., ICML 2024): τ_MTL plus one mask per task, m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|}.

τ_MTL is Task Arithmetic's Σ τ_t, TIES's vector, or the vector of any composable method (`merge: <name>`,
its options under its name). Consensus Merging (`consensus.py`) shares the parameters and the mask functions.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, ModelWrapValidatorHandler, PrivateAttr, model_validator

from hubmerge.methods.registry import (
    METHODS,
    Citation,
    Lambda,
    MergeSpec,
    Method,
    Params,
    SumVector,
    Vector,
    register,
)
from hubmerge.methods.task_arithmetic import exact_float32_operand, task_vectors
from hubmerge.methods.ties import InnerTiesOptions

CITATION = Citation(
    "Ke Wang, Nikolaos Dimitriadis, Guillermo Ortiz-Jiménez, François Fleuret, Pascal Frossard. "
    "*Localizing Task Information for Improved Model Merging and Compression.* ICML 2024.",
    """@inproceedings{wang2024localizing,
  title={Localizing Task Information for Improved Model Merging and Compression},
  author={Wang, Ke and Dimitriadis, Nikolaos and Ortiz-Jim{\\'e}nez, Guillermo and Fleuret, Fran{\\c{c}}ois
          and Frossard, Pascal},
  booktitle={International Conference on Machine Learning},
  year={2024}
}""",
)
TALL_DEFAULT_LAMBDA = 0.4
# τ_MTL forms whose options are not under the method's name
BUILT_IN = ("task_arithmetic", "ties")


class TallParams(Params):
    # `merge: <method>` takes that method's options under its name (`_inner`); `ties` has a field of its own
    # because the reference's inner TIES defaults (dis-sum) differ from the method's

    merge: str = Field(
        "task_arithmetic",
        description="how τ_MTL is formed: task_arithmetic (Σ τ_t) | ties | any composable method "
        "(`hubmerge methods`), its options under its name",
    )
    lam: Lambda | dict[str, Lambda] = Field(
        TALL_DEFAULT_LAMBDA,
        alias="lambda",
        description="λ_t in m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|}: a number, or {task: λ}",
    )
    ties: InnerTiesOptions | None = Field(None, description="TIES options, with merge: ties")
    _inner: dict[str, Any] | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _take_inner_options(cls, data: Any, handler: ModelWrapValidatorHandler[TallParams]) -> TallParams:
        """Take the `merge` method's options (under its name) out before the other keys are checked."""
        inner = None
        if isinstance(data, dict):
            merge = data.get("merge")
            if isinstance(merge, str) and merge not in BUILT_IN and merge in data:
                data = dict(data)
                inner = data.pop(merge)
        params = handler(data)
        params._inner = inner
        return params

    def inner_options(self) -> dict[str, Any]:
        """The options of the `merge` method (not `ties`, which has its field)."""
        return dict(self._inner or {})

    def lambdas(self, task_names: list[str]) -> tuple[float, ...]:
        if isinstance(self.lam, dict):
            return tuple(float(self.lam[n]) for n in task_names)
        return (float(self.lam),) * len(task_names)

    def vector(self, task_names: list[str]) -> Vector:
        """How τ_MTL is formed: the vector of the `merge` method, without its α."""
        if self.merge == "task_arithmetic":
            return SumVector()
        if self.merge == "ties":
            return (self.ties or InnerTiesOptions()).vector()
        return METHODS[self.merge].spec(self.inner_options(), task_names).vector

    def recorded(self) -> dict[str, Any]:
        """The parameters as recorded with the output, the `merge` method's defaults filled in."""
        if self.merge == "ties":
            return self.model_copy(update={"ties": self.ties or InnerTiesOptions()}).recorded_fields()
        recorded = self.recorded_fields()
        if self.merge != "task_arithmetic":
            inner = METHODS[self.merge].params.model_validate(self.inner_options())
            recorded[self.merge] = inner.recorded()
        return recorded


def check_tall(params: TallParams, task_names: list[str]) -> None:
    """λ per task, the `merge` method and its options.

    Raises:
        ValueError: naming the parameter.
    """
    if isinstance(params.lam, dict):
        unknown = sorted(set(params.lam) - set(task_names))
        if unknown:
            raise ValueError(
                f"parameters.lambda: unknown task {unknown[0]!r} (tasks: {', '.join(task_names)})"
            )
        missing = [n for n in task_names if n not in params.lam]
        if missing:
            raise ValueError(f"parameters.lambda: no value for task {missing[0]!r}")
    if params.ties is not None and params.merge != "ties":
        raise ValueError("parameters.ties: only used with `merge: ties`")
    composable = sorted(name for name, method in METHODS.items() if method.composable)
    if params.merge not in composable:
        raise ValueError(
            f"parameters.merge: {params.merge!r} cannot form τ_MTL (one of: {', '.join(composable)})"
        )
    if params.merge not in BUILT_IN:
        try:
            METHODS[params.merge].parse(params.inner_options(), task_names)
        except ValueError as err:
            raise ValueError(str(err).replace("parameters.", f"parameters.{params.merge}.", 1)) from None


def tall_masks(
    base: torch.Tensor,
    finetuned: list[torch.Tensor],
    tau_mtl: torch.Tensor,
    lambdas: list[float],
    taus: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """m_t = |θ0 − θ_t| > λ_t·|(θ0 + τ_MTL) − θ_t|, in the reference's weight form.

    Strict `>`: entries where τ_t = 0 are never in the mask. θ0 + τ_MTL is rounded to float32 first and λ
    multiplies in float32, because forming the product in float64 flips near-tie bits.

    Args:
        base: θ0.
        finetuned: θ_t per task.
        tau_mtl: the unscaled merged task vector (TA sum or TIES dis-sum).
        lambdas: λ_t >= 0 per task.
        taus: the float32 task vectors θ_t − θ0, when the caller has them: |θ0 − θ_t| is exactly |τ_t|
            (rounding to nearest is symmetric), so they save a subtraction per task.

    Returns:
        The bool mask of each task.
    """
    multi = torch.add(exact_float32_operand(base), tau_mtl)
    if taus is None:
        taus = task_vectors(base, finetuned)
    masks = []
    for theta, tau, lam in zip(finetuned, taus, lambdas, strict=True):
        masks.append(tau.abs() > torch.sub(multi, exact_float32_operand(theta)).abs_().mul_(lam))
    return masks


def mask_count(masks: list[torch.Tensor]) -> torch.Tensor:
    """How many task masks contain each entry (uint8 up to 255 tasks, int32 beyond)."""
    count = torch.zeros_like(masks[0], dtype=torch.uint8 if len(masks) < 255 else torch.int32)
    for mask in masks:
        count += mask
    return count


def consensus_mask(count: torch.Tensor, k: int) -> torch.Tensor:
    """Entries selected by at least k tasks: k=1 drops catastrophic weights, k=2 also selfish ones."""
    return count >= k


def agreement_histograms(
    count: torch.Tensor, active: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """hist[c] = entries contained in exactly c of the T masks, c = 0..T, over all entries and over the
    `active` ones only (int64 each; one bincount for both)."""
    bins = num_tasks + 1
    # uint8 codes while 2·bins fit: a quarter of the memory traffic of int32
    kind = torch.uint8 if 2 * bins <= 256 else torch.int32
    code = count.reshape(-1).to(kind) + active.reshape(-1).to(kind) * bins
    both = torch.bincount(code, minlength=2 * bins)
    return both[:bins] + both[bins:], both[bins:]


register(
    Method(
        "tall_masks",
        TallParams,
        "compressed",
        "τ_MTL + one mask per task; task t = θ0 + m_t ⊙ τ_MTL",
        "TALL masks: one merged vector plus a binary mask per task",
        plan=lambda p, names: MergeSpec(
            "tall_masks", "compressed", p.vector(names), masks="tall", lambdas=p.lambdas(names)
        ),
        searchable=("lambda",),
        citation=CITATION,
        check=check_tall,
    )
)
