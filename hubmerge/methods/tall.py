"""TALL masks and Consensus Merging (Wang, Dimitriadis et al., ICML 2024)."""

from __future__ import annotations

import torch

from hubmerge.methods.task_arithmetic import exact_float32_operand, task_vectors


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
