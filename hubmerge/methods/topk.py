"""Exact global top-k magnitude thresholds, computed from streamed pieces by radix selection.

The reference keeps, per task, the entries with |τ| >= the k-th smallest |τ| over the whole flattened
model, k = d − int(d·p). Non-negative float32 values order exactly like their int32 bit patterns, so the
k-th smallest value is found from two histograms: the top 16 bits of every entry (pass A1), then the low 16
bits of the entries in the bucket holding rank k (pass A2). Both histograms are integer counts, so pieces
can be added in any order (or across processes) and the result is exact.
"""

from __future__ import annotations

import torch

HIGH_BUCKETS = 1 << 15  # |x| has a zero sign bit, so its top 16 bits are below 2**15
LOW_BUCKETS = 1 << 16


def kth_rank(count: int, density: float) -> int:
    """k of the reference's `topk_values_mask`: rank (1-based) of the threshold; 0 means keep everything.

    Args:
        count: d, the number of entries taking part.
        density: share p of entries to keep, in (0, 1].

    Returns:
        k = d − int(d·p), with int() of the double product as in the reference.
    """
    return count - int(count * density)


def magnitude_bits(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int32 bit patterns of |x| (float32), which sort like the magnitudes.

    Args:
        x: float32 values, or any float tensor when `out` is None.
        out: int32 or float32 memory of x's size to write into (x itself for in-place work).

    Returns:
        The bit patterns, flat.
    """
    if out is None:
        return x.float().abs().reshape(-1).view(torch.int32)
    return torch.abs(x.reshape(-1), out=out.view(torch.float32)).view(torch.int32)


def high_codes_(bits: torch.Tensor) -> torch.Tensor:
    """In place: each entry's top 16 bits, its bin in the high histogram."""
    return bits.bitwise_right_shift_(16)


def low_codes_(bits: torch.Tensor, bucket: int) -> torch.Tensor:
    """In place: each entry's bin in the low histogram of `bucket`: 1 + its low 16 bits inside the bucket,
    0 below it, LOW_BUCKETS + 1 above it, so one bincount counts the bucket without selecting its entries."""
    return bits.sub_(bucket << 16).clamp_(-1, LOW_BUCKETS).add_(1)


def high_histogram(codes: torch.Tensor) -> torch.Tensor:
    """Counts of the high codes (int64, HIGH_BUCKETS bins)."""
    return torch.bincount(codes, minlength=HIGH_BUCKETS)


def low_histogram(codes: torch.Tensor) -> torch.Tensor:
    """Counts of the low 16 bits of the bucket's entries, from their low codes (int64, LOW_BUCKETS bins)."""
    return torch.bincount(codes, minlength=LOW_BUCKETS + 2)[1:-1]


def locate(histogram: torch.Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the `rank`-th smallest entry (1-based) and the rank within that bin.

    Args:
        histogram: int64 counts per bin, bins in increasing value order.
        rank: 1 <= rank <= histogram.sum().

    Returns:
        (bin index, rank inside the bin).
    """
    cumulative = histogram.cpu().cumsum(0)
    if rank < 1 or rank > int(cumulative[-1]):
        raise ValueError(f"rank {rank} outside 1..{int(cumulative[-1])}")
    index = int(torch.searchsorted(cumulative, torch.tensor(rank)))
    below = int(cumulative[index - 1]) if index > 0 else 0
    return index, rank - below


def threshold_value(bucket: int, low: int) -> float:
    """The float32 value whose bit pattern is (bucket << 16) | low, as a Python float (exact)."""
    return torch.tensor([(bucket << 16) | low], dtype=torch.int32).view(torch.float32).item()


def tensor_threshold(x: torch.Tensor, density: float) -> float | None:
    """Per-tensor variant (`trim: tensor`): the k-th smallest |x| within this tensor alone.

    Args:
        x: one task's τ for one tensor.
        density: share of entries to keep.

    Returns:
        The threshold, or None when every entry is kept.
    """
    return threshold_at_rank(x, kth_rank(x.numel(), density))


def threshold_at_rank(x: torch.Tensor, k: int) -> float | None:
    """The k-th smallest |x| (1-based), or None for k = 0 (nothing is cut)."""
    if k == 0:
        return None
    return x.float().abs().reshape(-1).kthvalue(k).values.item()


def topk_mask(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Entries of `x` whose magnitude reaches the threshold; ties at the threshold are kept (>=).

    Args:
        x: a task vector piece.
        threshold: from the global (or per-tensor) selection; None keeps everything.

    Returns:
        A bool mask shaped like `x`.
    """
    if threshold is None:
        return torch.ones_like(x, dtype=torch.bool)
    return x.abs() >= threshold
