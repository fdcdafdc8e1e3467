"""Task vectors and Task Arithmetic (Ilharco et al., 2023): θ0 + α·Σ τ_t."""

from __future__ import annotations

import torch
from pydantic import Field

from hubmerge.methods.registry import Citation, MergeSpec, Method, Params, Scaling, SumVector, register

CITATION = Citation(
    "Gabriel Ilharco, Marco Tulio Ribeiro, Mitchell Wortsman, Suchin Gururangan, Ludwig Schmidt, "
    "Hannaneh Hajishirzi, Ali Farhadi. *Editing Models with Task Arithmetic.* ICLR 2023.",
    """@inproceedings{ilharco2023editing,
  title={Editing Models with Task Arithmetic},
  author={Ilharco, Gabriel and Ribeiro, Marco Tulio and Wortsman, Mitchell and Gururangan, Suchin
          and Schmidt, Ludwig and Hajishirzi, Hannaneh and Farhadi, Ali},
  booktitle={International Conference on Learning Representations},
  year={2023}
}""",
)


class TaskArithmeticParams(Params):
    scaling: Scaling = Field(1.0, description="α, multiplies the sum of the task vectors")


def task_vectors(base: torch.Tensor, finetuned: list[torch.Tensor]) -> list[torch.Tensor]:
    """τ_t = θ_t − θ0, formed in float32 after the upcast.

    Args:
        base: θ0 (any float dtype).
        finetuned: θ_t for each task, same shape as `base`.

    Returns:
        One float32 task vector per task.
    """
    base32 = base.float()
    return [task_vector(base32, theta) for theta in finetuned]


def task_vector(
    base32: torch.Tensor, finetuned: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """τ = θ_t − θ0 of one task, from θ0 already in float32.

    Args:
        base32: θ0 as float32.
        finetuned: θ_t (any float dtype), same shape.
        out: float32 memory to write τ into.

    Returns:
        τ in float32.
    """
    return torch.sub(exact_float32_operand(finetuned), base32, out=out)


def exact_float32_operand(x: torch.Tensor) -> torch.Tensor:
    """`x` as an operand of float32 arithmetic that upcasts it exactly.

    Half-precision tensors are promoted to float32 inside the operation (exactly, as `x.float()` would),
    which saves a float32 copy; wider ones are rounded to float32 first, as the reference's `.float()` does.
    """
    return x if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else x.float()


def sum_in_task_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Float32 sum accumulated in task order (acc = acc + x_t), as the reference computes Σ_t.

    Args:
        tensors: tensors of one shape, in task order.

    Returns:
        Their float32 sum.
    """
    # 0 + x_0 first: the reference's stack(τ).sum(0) starts from +0.0, so an all −0.0 sum is +0.0
    total = tensors[0].float().add(0.0)
    for tensor in tensors[1:]:
        total.add_(tensor)
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
    # θ0 first, as in the reference: with NaN on both sides the sum keeps the first operand's NaN
    return torch.add(exact_float32_operand(base), torch.mul(vector, scaling))


register(
    Method(
        "task_arithmetic",
        TaskArithmeticParams,
        "merged",
        "θ0 + α·Σ τ_t",
        "the base plus the scaled sum of the task vectors",
        plan=lambda p, names: MergeSpec("task_arithmetic", "merged", SumVector(), scaling=p.scaling),
        searchable=("scaling",),
        citation=CITATION,
        composable=True,
    )
)
