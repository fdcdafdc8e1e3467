"""The registry of merge methods and the plan (`MergeSpec`) that a method hands the engine.

A method is one module of this package that calls `register(Method(...))`: its recipe name, parameters
(a pydantic model with the reference's defaults), what it computes, which of its parameters the validation
search varies, its citation, and `plan`, which turns validated parameters into a `MergeSpec`. The package
imports every module, so a new file is all a new method needs.

A `MergeSpec` says how τ_MTL is formed (`vector`), which per-task masks are built (`tall` or `magnitude`),
whether a consensus filter applies, and whether the result is a merged model or a compressed artifact. The
vector kinds are a closed union: the engine's backends `match` on it with `assert_never`, so a kind that a
backend does not handle is a type error, not a silent skip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hubmerge.methods.topk import kth_rank

Density = Annotated[float, Field(gt=0, le=1)]
Lambda = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Scaling = Annotated[float, Field(allow_inf_nan=False)]
Result = Literal["merged", "compressed"]
# What the validation search can vary (recipe `search:`): α, λ per task, consensus k.
Searchable = Literal["scaling", "lambda", "k"]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def recorded_fields(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)

    def recorded(self) -> dict[str, Any]:
        """The parameters as recorded with the output (every default filled in)."""
        return self.recorded_fields()


class NoParams(Params):
    pass


TiesMerge = Literal["mean", "sum", "max"]


@dataclass(frozen=True)
class SumVector:
    """τ_MTL = Σ_t τ_t (fused kernel on the CPU)."""


@dataclass(frozen=True)
class TiesVector:
    """τ_MTL = TIES(τ): trim to the top density per task, elect signs, disjoint merge (fused on the CPU)."""

    density: float
    merge: TiesMerge
    trim: Literal["global", "tensor"]


@dataclass(frozen=True)
class NoVector:
    """No shared vector: each task keeps its own values (magnitude pruning)."""


@dataclass(frozen=True)
class Piece:
    """One piece (whole rows) of one tensor, as a `PieceVector` sees it.

    Attributes:
        key: the tensor's name.
        shape: the whole tensor's shape.
        start: row-major index of the piece's first entry in the tensor.
        base: θ0 of the piece, flat, as stored.
        thetas: θ_t of the piece per task, flat, as stored.
        taus: τ_t = θ_t − θ0 per task, flat float32.
        thresholds: for each rank function of `PieceVector.tensor_ranks`, per task, the tensor's k-th
            smallest |τ_t| (None where the rank is 0).
        statistics: the sum over the whole tensor of `PieceVector.statistics` (float64), if it has one.
    """

    key: str
    shape: tuple[int, ...]
    start: int
    base: torch.Tensor
    thetas: list[torch.Tensor]
    taus: list[torch.Tensor]
    thresholds: tuple[list[float | None], ...] = ()
    statistics: torch.Tensor | None = None

    @property
    def row_length(self) -> int:
        """Entries per row of the tensor (1-D tensors are one row)."""
        return self.shape[-1] if self.shape else 1


@dataclass(frozen=True)
class PieceVector:
    """τ_MTL by a method's own tensor functions, one piece of whole rows at a time (torch operations).

    Attributes:
        compute: the float32 τ_MTL of a piece, flat.
        tensor_ranks: per-tensor magnitude thresholds that `compute` needs, as functions of the tensor's
            entry count giving k (1-based, ascending |τ|; 0: none), one pass each.
        statistics: sums over a piece that `compute` needs over the whole tensor (float64 vector; a pass of
            its own before the output pass, each process taking whole tensors so sums do not depend on the
            process count).
        whole_rows: `compute` needs every row whole, a 1-D tensor being one row: 1-D tensors are then not
            cut into pieces (matrices never cut a row).
    """

    compute: Callable[[Piece], torch.Tensor]
    tensor_ranks: tuple[Callable[[int], int], ...] = ()
    statistics: Callable[[Piece], torch.Tensor] | None = None
    whole_rows: bool = False


Vector = SumVector | TiesVector | NoVector | PieceVector


@dataclass(frozen=True)
class MergeSpec:
    """What the engine computes, resolved from a method and its parameters for T tasks."""

    method: str
    result: Result
    vector: Vector
    scaling: float = 1.0
    masks: Literal["tall", "magnitude"] | None = None
    lambdas: tuple[float, ...] = ()
    mask_density: float | None = None
    consensus_k: int | None = None

    @property
    def own_values(self) -> bool:
        """Whether each task stores its own kept values instead of a shared τ_MTL (magnitude pruning)."""
        return isinstance(self.vector, NoVector)

    @property
    def ties(self) -> TiesVector | None:
        return self.vector if isinstance(self.vector, TiesVector) else None

    @property
    def global_topk_density(self) -> float | None:
        """Density of the model-wide per-task top-k selection this spec needs (None: no such pass)."""
        if self.masks == "magnitude":
            return self.mask_density
        if self.ties is not None and self.ties.trim == "global" and self.ties.density < 1:
            return self.ties.density
        return None

    @property
    def tensor_ranks(self) -> tuple[Callable[[int], int], ...]:
        """The per-tensor magnitude selections this spec needs, one threshold pass each: functions of a
        tensor's entry count giving the 1-based rank k of its threshold (0: keep everything)."""
        if self.ties is not None and self.ties.trim == "tensor" and self.ties.density < 1:
            return (partial(kth_rank, density=self.ties.density),)
        if isinstance(self.vector, PieceVector):
            return self.vector.tensor_ranks
        return ()

    @property
    def tensor_statistics(self) -> Callable[[Piece], torch.Tensor] | None:
        return self.vector.statistics if isinstance(self.vector, PieceVector) else None

    @property
    def needs_majority_sign(self) -> bool:
        return self.ties is not None

    @property
    def majority_sign_pass(self) -> bool:
        """Whether the TIES majority sign needs a pass of its own before the output pass.

        It decides only entries whose trimmed values cancel exactly. A plain TIES merge with `mean` or `sum`
        guesses it from a sample of the pieces and counts the true one during its output pass, which runs
        again only if the guess was wrong. TALL/Consensus masks (built from τ_MTL) and
        `max` (whose zeros carry the majority's sign) need it first.
        """
        if self.ties is None:
            return False
        return self.masks is not None or self.ties.merge not in ("mean", "sum")


@dataclass(frozen=True)
class Citation:
    """The paper of a method, for the model card."""

    paper: str  # authors, title, venue: one line of Markdown
    bibtex: str


@dataclass(frozen=True)
class Method:
    """A merge method as the recipe, CLI, search, card and run record know it.

    Attributes:
        name: the recipe's `method:`.
        params: its parameters, with the reference's defaults.
        result: a merged model or a compressed artifact.
        summary: the formula, one line.
        description: what it does, one line (`hubmerge methods`).
        plan: validated parameters and the task names → the engine's `MergeSpec`.
        searchable: what `search:` varies for it.
        citation: the paper, for the model card.
        composable: whether TALL masks and Consensus can take its vector as τ_MTL (`merge: <name>`).
        check: further checks of validated parameters against the task names (ValueError naming the field).
        min_tasks / max_tasks: how many fine-tunes it takes.
    """

    name: str
    params: type[Params]
    result: Result
    summary: str
    description: str
    plan: Callable[[Any, list[str]], MergeSpec]
    searchable: tuple[Searchable, ...] = ()
    citation: Citation | None = None
    composable: bool = False
    check: Callable[[Any, list[str]], None] | None = None
    min_tasks: int = 1
    max_tasks: int | None = None

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
            where = ".".join(str(p) for p in first["loc"] if not any(c in str(p) for c in "-[("))
            msg = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
            raise ValueError(f"parameters.{where}: {msg} (method {self.name})") from None
        if self.check is not None:
            self.check(params, task_names)
        return params

    def check_task_count(self, t: int) -> None:
        """Raise ValueError when the method cannot merge t fine-tuned models."""
        if t >= self.min_tasks and (self.max_tasks is None or t <= self.max_tasks):
            return
        if self.max_tasks == self.min_tasks:
            wanted = f"exactly {self.min_tasks}"
        elif self.max_tasks is None:
            wanted = f"at least {self.min_tasks}"
        else:
            wanted = f"{self.min_tasks} to {self.max_tasks}"
        plural = "" if wanted.endswith(" 1") else "s"
        raise ValueError(f"{self.name} takes {wanted} fine-tuned model{plural}, the recipe has {t}")

    def validate(self, raw: dict[str, Any], task_names: list[str]) -> None:
        self.parse(raw, task_names)

    def spec(self, raw: dict[str, Any], task_names: list[str]) -> MergeSpec:
        self.check_task_count(len(task_names))
        return self.plan(self.parse(raw, task_names), task_names)

    def resolved_parameters(self, raw: dict[str, Any], task_names: list[str]) -> dict[str, Any]:
        """The parameters with every default filled in, as recorded with the output."""
        return self.parse(raw, task_names).recorded()


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (at import of its module)."""
    if method.name in METHODS:
        raise RuntimeError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method
