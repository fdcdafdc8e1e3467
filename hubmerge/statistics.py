"""What the passes of a run gather: thresholds, the TIES majority sign, per-tensor sums, mask agreement.

Every statistic that decides an output byte is an exact integer count (radix histograms, sign counts, mask
agreement) or is computed from whole tensors by one process, so the output does not depend on the number of
processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hubmerge.methods import MergeSpec
from hubmerge.methods.tall import agreement_histograms


def majority_of(sign_total: int) -> int:
    return (sign_total > 0) - (sign_total < 0)


@dataclass
class RunStats:
    num_tasks: int
    thresholds: list[float | None] | None = None
    sign_total: int | None = None
    kept: list[int] = field(default_factory=list)
    histogram: torch.Tensor | None = None
    histogram_active: torch.Tensor | None = None
    consensus_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.thresholds is not None:
            out["topk_thresholds"] = self.thresholds
        if self.sign_total is not None:
            out["ties_sign_total"] = self.sign_total
        if self.kept:
            out["mask_kept"] = self.kept
        if self.histogram is not None:
            out["agreement_histogram"] = [int(x) for x in self.histogram]
            out["agreement_histogram_active"] = [int(x) for x in self.histogram_active]
        return out


class Tally:
    """The statistics of one run: what the passes before the output pass found, and what the output pass
    counts (mask sizes, agreement, consensus kept, the TIES signs when the majority was only guessed)."""

    def __init__(self, spec: MergeSpec, num_tasks: int):
        self.spec = spec
        self.num_tasks = num_tasks
        self.stats = RunStats(num_tasks=num_tasks)
        if spec.masks is not None:
            # Zeros, not None: a process may hold no piece at all, and the sums across processes need a value.
            self.stats.histogram = torch.zeros(num_tasks + 1, dtype=torch.int64)
            self.stats.histogram_active = torch.zeros(num_tasks + 1, dtype=torch.int64)
            self.stats.kept = [0] * num_tasks
        # per selection of `spec.tensor_ranks`: each tensor's per-task thresholds
        self.tensor_thresholds: list[dict[str, list[float | None]]] = []
        # per tensor: the sum of the method's `statistics` over its pieces
        self.tensor_sums: dict[str, torch.Tensor] = {}
        self.majority = 0
        # Whether the output pass counts the TIES signs (its majority is then the sample's guess), and the count
        self.counting_signs = False
        self.sign_count = 0

    def thresholds_for(self, key: str) -> list[float | None]:
        """The per-task |τ| thresholds of TIES trimming or magnitude masks for tensor `key`."""
        if self.spec.ties is not None and self.tensor_thresholds:
            return self.tensor_thresholds[0][key]
        if self.stats.thresholds is not None:
            return self.stats.thresholds
        return [None] * self.num_tasks

    def tensor_thresholds_for(self, key: str) -> tuple[list[float | None], ...]:
        """Per selection of the method's `tensor_ranks`, the tensor's per-task thresholds."""
        return tuple(thresholds[key] for thresholds in self.tensor_thresholds)

    def set_majority(self, total: int) -> None:
        """The majority sign from the sign total over every piece, recorded with the run."""
        self.stats.sign_total = total
        self.majority = majority_of(total)

    def record_masks(self, masks: list[torch.Tensor], count: torch.Tensor, taus: list[torch.Tensor]) -> None:
        active = taus[0] != 0
        for tau in taus[1:]:
            active |= tau != 0
        hist, hist_active = (h.cpu() for h in agreement_histograms(count, active, len(masks)))
        self.add_mask_counts(hist, hist_active, [int(torch.count_nonzero(m)) for m in masks])

    def add_mask_counts(
        self, histogram: torch.Tensor, histogram_active: torch.Tensor, kept: list[int]
    ) -> None:
        """Add a piece's agreement histograms (all entries, active ones) and mask sizes to the run's."""
        self.stats.histogram += histogram
        self.stats.histogram_active += histogram_active
        self.stats.kept = [total + k for total, k in zip(self.stats.kept, kept, strict=True)]
