"""Generalized task arithmetic, the frame of mergekit's sparsifying methods (DARE, breadcrumbs, DELLA):
sparsify each task vector, optionally keep only the entries that agree with the elected sign, then take the
weighted sum, optionally divided by the sum of the weights that took part.

Parameters that mergekit sets per model (`weight`, `density`, ...) are a number or a {task: value} mapping.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from pydantic import Field

from hubmerge.methods.registry import Params, Piece, PieceVector
from hubmerge.methods.task_arithmetic import sum_in_task_order

Weight = Annotated[float, Field(allow_inf_nan=False)]
PerTaskWeight = Weight | dict[str, Weight]
UNIT = Annotated[float, Field(gt=0, le=1)]
PerTaskDensity = UNIT | dict[str, UNIT]


def per_task(value: float | dict[str, float], task_names: list[str]) -> tuple[float, ...]:
    """A per-model parameter as one value per task, task order."""
    if isinstance(value, dict):
        return tuple(float(value[name]) for name in task_names)
    return (float(value),) * len(task_names)


def check_per_task(params: Params, task_names: list[str]) -> None:
    """Every {task: value} parameter names each task once and no other.

    Raises:
        ValueError: naming the parameter and the task.
    """
    for name, field in type(params).model_fields.items():
        value = getattr(params, name)
        if not isinstance(value, dict) or not all(isinstance(v, float | int) for v in value.values()):
            continue
        where = field.alias or name
        unknown = sorted(set(value) - set(task_names))
        if unknown:
            raise ValueError(
                f"parameters.{where}: unknown task {unknown[0]!r} (tasks: {', '.join(task_names)})"
            )
        missing = [n for n in task_names if n not in value]
        if missing:
            raise ValueError(f"parameters.{where}: no value for task {missing[0]!r}")


def elected_agreement(weighted: list[torch.Tensor]) -> list[torch.Tensor]:
    """mergekit's sign consensus (`sum`): the sign of Σ_t w_t·τ_t, with 0 counted as +; task t takes part
    where its own sign equals it (so zeros never take part).

    Args:
        weighted: w_t·τ_t per task, float32.

    Returns:
        One bool mask per task.
    """
    majority = torch.where(sum_in_task_order(weighted) >= 0, 1.0, -1.0)
    return [tau.sign() == majority for tau in weighted]


def mix(
    deltas: list[torch.Tensor], weights: Sequence[float], consensus: bool, normalize: bool
) -> torch.Tensor:
    """Σ_t w_t·δ_t over the entries that take part, divided by Σ_t w_t over them if `normalize`.

    Args:
        deltas: sparsified task vectors, float32, task order.
        weights: w_t per task.
        consensus: keep only entries agreeing with the elected sign (`elected_agreement`).
        normalize: divide by the weights that took part (1 where they sum to 0, or to |Σ w| < 1e-8 without
            consensus, as mergekit).

    Returns:
        The merged task vector, float32.
    """
    weighted = [delta * weight for delta, weight in zip(deltas, weights, strict=True)]
    if not consensus:
        mixed = sum_in_task_order(weighted)
        if normalize:
            divisor = float(torch.tensor(weights, dtype=torch.float32).sum())
            mixed /= 1.0 if abs(divisor) < 1e-8 else divisor
        return mixed
    agree = elected_agreement(weighted)
    mixed = sum_in_task_order([w * a for w, a in zip(weighted, agree, strict=True)])
    if normalize:
        divisor = sum_in_task_order([a * weight for a, weight in zip(agree, weights, strict=True)])
        mixed /= divisor.masked_fill_(divisor == 0, 1.0)
    return mixed


def keyed_uniform(
    seed: int, key: str, task: int, start: int, count: int, device: torch.device
) -> torch.Tensor:
    """Uniform 32-bit integers for entries start..start+count−1 of tensor `key`, task `task`.

    A counter-based stream: each entry's value is a hash of (seed, key, task, entry index), so any split of
    a tensor into pieces, over any number of processes and on any device, draws the same values.

    Returns:
        int64 values in [0, 2^32).
    """
    digest = hashlib.sha256(f"{seed}\0{key}\0{task}".encode()).digest()
    k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    x = _mix32((index & 0xFFFFFFFF) ^ k0)
    return _mix32(x ^ (index >> 32) ^ k1)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (lowbias32) on int64 holding values < 2^32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x·constant mod 2^32, in two 16-bit halves of the constant so no int64 product overflows."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & 0xFFFFFFFF


def bernoulli_keep(
    seed: int,
    key: str,
    task: int,
    start: int,
    probability: torch.Tensor | float,
    count: int,
    device: torch.device,
) -> torch.Tensor:
    """Keep each entry with `probability` (a number or one per entry), from the keyed stream."""
    u = keyed_uniform(seed, key, task, start, count, device)
    if isinstance(probability, float):
        return u < round(probability * 2**32)
    return u < (probability.double() * 2**32).round().to(torch.int64)


# mergekit's `rescale`: a sparsified task vector is scaled back to the L1 norm it had, per tensor, unless
# either norm is below this
RESCALE_EPS = 1e-7
# Drops entries of one task's τ of a piece: (piece, task index, τ_t) → the sparsified τ_t
Sparsify = Callable[[Piece, int, torch.Tensor], torch.Tensor]


def generalized_vector(
    sparsify: Sparsify,
    weights: Sequence[float],
    consensus: bool,
    normalize: bool,
    rescale: bool,
    tensor_ranks: tuple[Callable[[int], int], ...] = (),
) -> PieceVector:
    """The piece function of a generalized task arithmetic method.

    Args:
        sparsify: drops entries of each task vector.
        weights: w_t per task.
        consensus: keep only entries agreeing with the elected sign.
        normalize: divide by the weights that took part.
        rescale: scale each sparsified τ_t back to τ_t's L1 norm over the tensor (a statistics pass).
        tensor_ranks: the per-tensor thresholds `sparsify` reads from the piece.
    """

    def sparsified(piece: Piece) -> list[torch.Tensor]:
        return [sparsify(piece, task, tau) for task, tau in enumerate(piece.taus)]

    def l1_norms(piece: Piece) -> torch.Tensor:
        """[T, 2]: Σ|τ_t| and Σ|sparsified τ_t| of the piece."""
        return torch.tensor(
            [
                [float(tau.abs().sum(dtype=torch.float64)), float(kept.abs().sum(dtype=torch.float64))]
                for tau, kept in zip(piece.taus, sparsified(piece), strict=True)
            ],
            dtype=torch.float64,
        )

    def compute(piece: Piece) -> torch.Tensor:
        deltas = sparsified(piece)
        if rescale:
            deltas = [
                l1_rescaled(delta, *piece.statistics[task].tolist()) for task, delta in enumerate(deltas)
            ]
        return mix(deltas, weights, consensus, normalize)

    return PieceVector(compute, tensor_ranks=tensor_ranks, statistics=l1_norms if rescale else None)


def l1_rescaled(kept: torch.Tensor, before: float, after: float) -> torch.Tensor:
    """`kept` scaled by before/after, the L1 norms of the task vector before and after sparsifying it over
    the whole tensor; unchanged when either is below RESCALE_EPS."""
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return kept
    return kept * (before / after)


def group_sums(piece: Piece, vectors: list[torch.Tensor], groups: str) -> torch.Tensor:
    """Σ v_i·v_j over each group of entries, for every pair i ≤ j of `vectors` (flat float32 pieces):
    a float64 [G, P] tensor with zeros for the groups outside this piece, so that adding it up over the pieces
    gives the tensor's sums.

    Args:
        piece: where the vectors lie in their tensor.
        vectors: flat pieces, one per vector.
        groups: `tensor` (one group), `row` (rows along the last dimension) or `column` (the entries that
            share every index but the first).
    """
    groups = "tensor" if groups == "row" and len(piece.shape) < 2 else groups  # a 1-D tensor is one row
    pairs = [(i, j) for i in range(len(vectors)) for j in range(i, len(vectors))]
    stacked = torch.stack([vectors[i].double() * vectors[j].double() for i, j in pairs], dim=-1)
    numel = math.prod(piece.shape)
    if groups == "tensor":
        return stacked.sum(dim=0, keepdim=True)
    if groups == "row":
        width = piece.row_length
        sums = torch.zeros(
            max(numel // max(width, 1), 1), len(pairs), dtype=torch.float64, device=stacked.device
        )
        rows = stacked.reshape(-1, width, len(pairs)).sum(dim=1)
        first = piece.start // width
        sums[first : first + rows.shape[0]] = rows
        return sums
    if groups == "column":
        width = numel // piece.shape[0] if piece.shape else 1
        return stacked.reshape(-1, width, len(pairs)).sum(dim=0)
    raise ValueError(f"unknown grouping {groups!r}")


def pair_index(count: int) -> dict[tuple[int, int], int]:
    """Column of each pair i ≤ j in `group_sums`'s output."""
    pairs = [(i, j) for i in range(count) for j in range(i, count)]
    return {pair: column for column, pair in enumerate(pairs)}


def per_entry(values: torch.Tensor, piece: Piece, groups: str, count: int) -> torch.Tensor:
    """Per-group values spread over the `count` entries of the piece (float32), as `group_sums` groups."""
    values = values.float()
    groups = "tensor" if groups == "row" and len(piece.shape) < 2 else groups
    if groups == "tensor":
        return values.expand(count) if values.numel() == 1 else values.reshape(-1)[:1].expand(count)
    if groups == "row":
        width = piece.row_length
        first = piece.start // width
        return values[first : first + count // width].repeat_interleave(width)
    width = math.prod(piece.shape) // piece.shape[0] if piece.shape else 1
    return values.repeat(count // width)
