"""NaN and ±Inf entries of the inputs, counted as the engine computes each piece (no pass of its own: the
fused kernels flag them while loading their inputs, and only a flagged piece is counted per model).

A fine-tune with a few NaNs (a diverged step, a bad conversion) would otherwise reach the merged model or every
task rebuilt from an artifact without a word. By default the first piece that holds one stops the run with a
line naming the model, the tensor and the count; with `allow`, the counts are recorded in the run record and
the card instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hubmerge import fused
from hubmerge.errors import SourceError

Rows = tuple[int, int] | None


def count_nonfinite(piece: torch.Tensor, use_kernels: bool) -> int:
    """Entries of a tensor that are NaN or ±Inf (0 for integer tensors).

    Args:
        piece: any tensor, on any device.
        use_kernels: count with the fused CPU kernel where it applies (a contiguous CPU float piece).
    """
    if not piece.is_floating_point():
        return 0
    if use_kernels and fused.supports(piece):
        return fused.nonfinite_count(piece)
    return piece.numel() - int(torch.count_nonzero(torch.isfinite(piece)))


@dataclass
class NonfiniteCounts:
    """Per model and tensor, the NaN/±Inf entries seen; each piece is counted once, however often it is read."""

    names: list[str]  # "base", then the task names, in the order the engine reads the checkpoints
    sources: list[str]
    allow: bool
    use_kernels: bool
    counts: dict[tuple[int, str], int] = field(default_factory=dict)
    _seen: set[tuple[str, Rows]] = field(default_factory=set)

    def check(
        self,
        key: str,
        rows: Rows,
        pieces: list[torch.Tensor],
        shape: tuple[int, ...],
        flagged: bool | None = None,
    ) -> None:
        """Count the pieces of (θ0, θ_1..θ_T) of tensor `key` at `rows`, unless counted before.

        Args:
            key, rows: which piece.
            pieces: its inputs, base first.
            shape: the tensor's shape, for the error.
            flagged: whether the fused kernels met a NaN/Inf entry computing these pieces (False: nothing to
                count); None: count them.

        Raises:
            SourceError: at the first model with a NaN/Inf entry there, unless `allow`.
        """
        if (key, rows) in self._seen:
            return
        self._seen.add((key, rows))
        if flagged is False:
            return
        where = "" if rows is None else f" (rows {rows[0]}-{rows[1] - 1} of {shape[0]})"
        for model, piece in enumerate(pieces):
            self._count(model, key, piece, where)

    def check_one(self, model: int, key: str, tensor: torch.Tensor) -> None:
        """Count a whole tensor that model `model` (0: the base) alone contributes, e.g. a task's own head."""
        self._count(model, key, tensor, "")

    def _count(self, model: int, key: str, piece: torch.Tensor, where: str) -> None:
        n = count_nonfinite(piece, self.use_kernels)
        if not n:
            return
        if not self.allow:
            raise SourceError(
                f"{self._describe(model)}: tensor {key!r} has {n:,} NaN/Inf entries{where}; refusing to "
                "merge non-finite weights (pass --allow-nonfinite to merge them anyway)",
                self.sources[model],
            )
        self.merge({(model, key): n})

    def _describe(self, model: int) -> str:
        name = self.names[model]
        return f"base ({self.sources[0]})" if model == 0 else f"model {name!r} ({self.sources[model]})"

    def records(self) -> list[dict[str, Any]]:
        """[{model, source, tensor, count}] for the run record, in model then tensor order."""
        return [
            {"model": self.names[model], "source": self.sources[model], "tensor": key, "count": n}
            for (model, key), n in sorted(self.counts.items())
        ]

    def merge(self, counts: dict[tuple[int, str], int]) -> None:
        """Add the `counts` of another process's instance."""
        for key, n in counts.items():
            self.counts[key] = self.counts.get(key, 0) + n
