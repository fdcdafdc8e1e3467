"""TALL masks and Consensus Merging (Wang, Dimitriadis et al., ICML 2024)."""

from __future__ import annotations

import torch


def tall_masks(
    base: torch.Tensor, finetuned: list[torch.Tensor], tau_mtl: torch.Tensor, lambdas: list[float]
) -> list[torch.Tensor]:
    """m_t = |θ0 − θ_t| > λ_t·|(θ0 + τ_MTL) − θ_t|, in the reference's weight form.

    Strict `>`: entries where τ_t = 0 are never in the mask. θ0 + τ_MTL is rounded to float32 first and λ
    multiplies in float32, because forming the product in float64 flips near-tie bits.

    Args:
        base: θ0.
        finetuned: θ_t per task.
        tau_mtl: the unscaled merged task vector (TA sum or TIES dis-sum).
        lambdas: λ_t >= 0 per task.

    Returns:
        The bool mask of each task.
    """
    base32 = base.float()
    multi = base32 + tau_mtl
    masks = []
    for theta, lam in zip(finetuned, lambdas, strict=True):
        theta32 = theta.float()
        masks.append((base32 - theta32).abs() > (multi - theta32).abs() * lam)
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
    code = count.reshape(-1).to(torch.int32) + active.reshape(-1).to(torch.int32) * bins
    both = torch.bincount(code, minlength=2 * bins)
    return both[:bins] + both[bins:], both[bins:]
