"""Task vectors, Task Arithmetic and weight averaging (Ilharco et al., 2023)."""

from __future__ import annotations

import torch


def task_vectors(base: torch.Tensor, finetuned: list[torch.Tensor]) -> list[torch.Tensor]:
    """τ_t = θ_t − θ0, formed in float32 after the upcast.

    Args:
        base: θ0 (any float dtype).
        finetuned: θ_t for each task, same shape as `base`.

    Returns:
        One float32 task vector per task.
    """
    base32 = base.float()
    return [theta.float() - base32 for theta in finetuned]


def sum_in_task_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Float32 sum accumulated in task order (acc = acc + x_t), as the reference computes Σ_t.

    Args:
        tensors: tensors of one shape, in task order.

    Returns:
        Their float32 sum.
    """
    total = tensors[0].float().clone()
    for tensor in tensors[1:]:
        total = total + tensor
    return total


def apply_vector(base: torch.Tensor, vector: torch.Tensor, scaling: float) -> torch.Tensor:
    """θ0 + α·τ in float32 (α rounded to float32, as for a Python scalar times a float32 tensor).

    Args:
        base: θ0.
        vector: the merged task vector.
        scaling: the coefficient α.

    Returns:
        The merged weights in float32.
    """
    return base.float() + vector * scaling
