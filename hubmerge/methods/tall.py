"""TALL masks and Consensus Merging (Wang, Dimitriadis et al., ICML 2024)."""

from __future__ import annotations

import torch


def tall_mask(base: torch.Tensor, finetuned: torch.Tensor, tau_mtl: torch.Tensor, lam: float) -> torch.Tensor:
    """m_t = |θ0 − θ_t| > λ·|(θ0 + τ_MTL) − θ_t|, in the reference's weight form.

    Strict `>`: entries where τ_t = 0 are never in the mask. θ0 + τ_MTL is rounded to float32 first and λ
    multiplies in float32, because forming the product in float64 flips near-tie bits.

    Args:
        base: θ0.
        finetuned: θ_t.
        tau_mtl: the unscaled merged task vector (TA sum or TIES dis-sum).
        lam: λ_t >= 0.

    Returns:
        The bool mask of task t.
    """
    base32, theta = base.float(), finetuned.float()
    multi = base32 + tau_mtl
    return (base32 - theta).abs() > (multi - theta).abs() * lam


def mask_count(masks: list[torch.Tensor]) -> torch.Tensor:
    """How many task masks contain each entry (int32)."""
    count = torch.zeros_like(masks[0], dtype=torch.int32)
    for mask in masks:
        count += mask
    return count


def consensus_mask(count: torch.Tensor, k: int) -> torch.Tensor:
    """Entries selected by at least k tasks: k=1 drops catastrophic weights, k=2 also selfish ones."""
    return count >= k


def agreement_histogram(count: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """hist[c] = number of entries contained in exactly c of the T masks, c = 0..T (int64)."""
    return torch.bincount(count.reshape(-1).to(torch.int64), minlength=num_tasks + 1)
