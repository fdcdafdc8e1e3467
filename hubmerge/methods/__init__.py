"""The merge methods: their recipe parameters (with the reference's defaults) and what each computes.

Every method is described by a `MergeSpec`: how τ_MTL is formed (`sum` or `ties`), which per-task masks are
built (`tall` or `magnitude`), whether a consensus filter applies, and whether the result is a merged model or
a compressed artifact. The engine streams the tensor functions of this package according to that spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hubmerge.methods.ties import TiesMerge

Density = Annotated[float, Field(gt=0, le=1)]
Lambda = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Scaling = Annotated[float, Field(allow_inf_nan=False)]
TALL_DEFAULT_LAMBDA = 0.4


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class NoParams(Params):
    pass


class TaskArithmeticParams(Params):
    scaling: Scaling = Field(1.0, description="α, multiplies the sum of the task vectors")


class TiesOptions(Params):
    density: Density = Field(0.2, description="share of each task vector kept: its largest |τ_t| entries")
    merge: TiesMerge = Field("mean", description="mean | sum | max of the entries that agree with the sign")
    trim: Literal["global", "tensor"] = Field(
        "global", description="global: top density over the whole model (the paper's); tensor: per tensor"
    )


class TiesParams(TiesOptions):
    scaling: Scaling = Field(1.0, description="α, multiplies the TIES vector")


class InnerTiesOptions(TiesOptions):
    """TIES as TALL masks and Consensus use it: the reference hard-codes K = 20 with dis-sum."""

    merge: TiesMerge = Field("sum", description="mean | sum | max of the entries that agree with the sign")


class TallParams(Params):
    merge: Literal["task_arithmetic", "ties"] = Field(
        "task_arithmetic", description="how τ_MTL is formed: task_arithmetic (Σ τ_t) | ties"
    )
    lam: Lambda | dict[str, Lambda] = Field(
        TALL_DEFAULT_LAMBDA,
        alias="lambda",
        description="λ_t in m_t = 1{|τ_t| > λ_t·|τ_MTL − τ_t|}: a number, or {task: λ}",
    )
    ties: InnerTiesOptions | None = Field(None, description="TIES options, with merge: ties")


class ConsensusParams(TallParams):
    k: Annotated[int, Field(ge=0, strict=True)] = Field(
        2, description="keep entries in >= k task masks (1 drops catastrophic, 2 also selfish)"
    )
    scaling: Scaling = Field(1.0, description="α, multiplies the filtered τ_MTL")


class MagnitudeParams(Params):
    density: Density = Field(0.1, description="share of each task's entries kept: its largest |τ_t|")


@dataclass(frozen=True)
class TiesSpec:
    density: float
    merge: TiesMerge
    trim: Literal["global", "tensor"]


@dataclass(frozen=True)
class MergeSpec:
    """What the engine computes, resolved from a method and its parameters for T tasks."""

    method: str
    result: Literal["merged", "compressed"]
    vector: Literal["sum", "ties", "none"]
    ties: TiesSpec | None = None
    scaling: float = 1.0
    masks: Literal["tall", "magnitude"] | None = None
    lambdas: tuple[float, ...] = ()
    mask_density: float | None = None
    consensus_k: int | None = None
    # magnitude pruning stores each task's own kept values instead of a shared τ_MTL
    own_values: bool = False

    @property
    def global_topk_density(self) -> float | None:
        """Density of the model-wide per-task top-k selection this spec needs (None: no such pass)."""
        if self.masks == "magnitude":
            return self.mask_density
        if self.ties is not None and self.ties.trim == "global" and self.ties.density < 1:
            return self.ties.density
        return None

    @property
    def tensor_topk_density(self) -> float | None:
        if self.ties is not None and self.ties.trim == "tensor" and self.ties.density < 1:
            return self.ties.density
        return None

    @property
    def needs_majority_sign(self) -> bool:
        return self.vector == "ties"

    @property
    def majority_sign_pass(self) -> bool:
        """Whether the TIES majority sign needs a pass of its own before the output pass.

        It decides only entries whose trimmed values cancel exactly. A plain TIES merge with `mean` or `sum`
        guesses it from a sample of the pieces and counts the true one during its output pass, which runs
        again only if the guess was wrong. TALL/Consensus masks (built from τ_MTL) and
        `max` (whose zeros carry the majority's sign) need it first.
        """
        if not self.needs_majority_sign:
            return False
        return self.masks is not None or self.ties is None or self.ties.merge not in ("mean", "sum")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: type[Params]
    result: Literal["merged", "compressed"]
    summary: str
    build: Callable[[Any, list[str]], MergeSpec]
    description: str  # one line for `hubmerge methods`

    def parse(self, raw: dict[str, Any], task_names: list[str]) -> Params:
        """Validate raw recipe parameters against this method and the task list.

        Raises:
            ValueError: naming the parameter (`parameters.<field>: ...`).
        """
        try:
            params = self.params.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            # drop pydantic's union-branch labels such as "constrained-float" from the location
            field = ".".join(str(p) for p in first["loc"] if not any(c in str(p) for c in "-[("))
            msg = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
            raise ValueError(f"parameters.{field}: {msg} (method {self.name})") from None
        if isinstance(params, TallParams):
            _check_tall(params, task_names)
        return params

    def validate(self, raw: dict[str, Any], task_names: list[str]) -> None:
        self.parse(raw, task_names)

    def spec(self, raw: dict[str, Any], task_names: list[str]) -> MergeSpec:
        return self.build(self.parse(raw, task_names), task_names)

    def resolved_parameters(self, raw: dict[str, Any], task_names: list[str]) -> dict[str, Any]:
        """The parameters with every default filled in, as recorded with the output."""
        params = self.parse(raw, task_names)
        if isinstance(params, TallParams) and params.merge == "ties" and params.ties is None:
            params = params.model_copy(update={"ties": InnerTiesOptions()})
        return params.model_dump(by_alias=True, mode="json", exclude_none=True)


def _check_tall(params: TallParams, task_names: list[str]) -> None:
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
    if isinstance(params, ConsensusParams) and params.k > len(task_names):
        raise ValueError(f"parameters.k: {params.k} is larger than the number of tasks ({len(task_names)})")


def _lambdas(params: TallParams, task_names: list[str]) -> tuple[float, ...]:
    if isinstance(params.lam, dict):
        return tuple(float(params.lam[n]) for n in task_names)
    return (float(params.lam),) * len(task_names)


def _ties_spec(options: TiesOptions) -> TiesSpec:
    return TiesSpec(density=options.density, merge=options.merge, trim=options.trim)


def _tall_vector(params: TallParams) -> dict[str, Any]:
    if params.merge == "ties":
        return {"vector": "ties", "ties": _ties_spec(params.ties or InnerTiesOptions())}
    return {"vector": "sum"}


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in [
        MethodSpec(
            "weight_average",
            NoParams,
            "merged",
            "θ0 + (1/T)·Σ τ_t",
            lambda p, names: MergeSpec("weight_average", "merged", "sum", scaling=1.0 / len(names)),
            description="the mean of the fine-tuned models",
        ),
        MethodSpec(
            "task_arithmetic",
            TaskArithmeticParams,
            "merged",
            "θ0 + α·Σ τ_t",
            lambda p, names: MergeSpec("task_arithmetic", "merged", "sum", scaling=p.scaling),
            description="the base plus the scaled sum of the task vectors",
        ),
        MethodSpec(
            "ties",
            TiesParams,
            "merged",
            "θ0 + α·TIES(τ): trim to the top density per task, elect signs, disjoint merge",
            lambda p, names: MergeSpec("ties", "merged", "ties", ties=_ties_spec(p), scaling=p.scaling),
            description="TIES-Merging: trim each task vector, elect signs, merge the agreeing entries",
        ),
        MethodSpec(
            "consensus",
            ConsensusParams,
            "merged",
            "θ0 + α·(τ_MTL ⊙ 1{#TALL masks >= k})",
            lambda p, names: MergeSpec(
                "consensus",
                "merged",
                scaling=p.scaling,
                masks="tall",
                lambdas=_lambdas(p, names),
                consensus_k=p.k,
                **_tall_vector(p),
            ),
            description="Consensus Merging: drop the entries fewer than k TALL masks contain",
        ),
        MethodSpec(
            "tall_masks",
            TallParams,
            "compressed",
            "τ_MTL + one mask per task; task t = θ0 + m_t ⊙ τ_MTL",
            lambda p, names: MergeSpec(
                "tall_masks", "compressed", masks="tall", lambdas=_lambdas(p, names), **_tall_vector(p)
            ),
            description="TALL masks: one merged vector plus a binary mask per task",
        ),
        MethodSpec(
            "magnitude_masking",
            MagnitudeParams,
            "compressed",
            "Σ τ + per-task top-density mask of |τ_t|; task t = θ0 + m_t ⊙ Σ τ",
            lambda p, names: MergeSpec(
                "magnitude_masking", "compressed", "sum", masks="magnitude", mask_density=p.density
            ),
            description="the summed task vectors with a magnitude mask per task",
        ),
        MethodSpec(
            "magnitude_pruning",
            MagnitudeParams,
            "compressed",
            "per-task top-density of |τ_t|; task t = θ0 + m_t ⊙ τ_t",
            lambda p, names: MergeSpec(
                "magnitude_pruning",
                "compressed",
                "none",
                masks="magnitude",
                mask_density=p.density,
                own_values=True,
            ),
            description="each task vector pruned to its largest entries, stored sparsely",
        ),
    ]
}
