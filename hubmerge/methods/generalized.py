"""Generalized task arithmetic, the frame of mergekit's sparsifying methods (DARE, breadcrumbs, DELLA):
sparsify each task vector, optionally keep only the entries that agree with the elected sign, then take the
weighted sum, optionally divided by the sum of the weights that took part.

Parameters that mergekit sets per model (`weight`, `density`, ...) are a number or a {task: value} mapping.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Annotated

import torch
from pydantic import Field

from hubmerge.methods.registry import Params
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
