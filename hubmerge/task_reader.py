"""One task's files of a compressed artifact, open: any tensor of its model, merged ones rebuilt (as a tensor, or
straight into a model's parameter with the fused kernel)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from hubmerge.artifacts import MASK_DIR, VALUE_DIR, rebuild, rebuild_packed_into, rebuild_sparse, unpack_bits
from hubmerge.planning import first_entry, row_blocks
from hubmerge.sources import SafetensorsReader

if TYPE_CHECKING:
    from hubmerge.compressed import CompressedMerge

# Entries of θ0 and τ_MTL read at once when a task is rebuilt into a model's memory (row blocks, as the engine
# reads its pieces: whole tensors freed one after another fragmented the heap by ~250 MiB on a 1 GB model)
READ_BLOCK_ENTRIES = 1 << 20


class TaskReader:
    """One task's files of an artifact, open: reads any tensor of the task's model, merged ones rebuilt.

    Args:
        merge: the artifact.
        task: one of its tasks.
        dtype: as for `CompressedMerge.task_infos`.
    """

    def __init__(self, merge: CompressedMerge, task: str, dtype: str | None = None):
        self.infos = merge.task_infos(task, dtype)
        self.merged = merge.mask_shapes(task)
        self.base = merge.base
        self.masks = SafetensorsReader(merge._task_file(MASK_DIR, task))
        private = merge._private_file(task)
        self.private = SafetensorsReader(private) if private is not None else None
        # magnitude pruning keeps each task's own values; the other methods share τ_MTL
        shared = merge.manifest["vector"] is not None
        self.values = None if shared else SafetensorsReader(merge._task_file(VALUE_DIR, task))
        self.vector = merge.vector_readers() if shared else None

    def read(self, key: str) -> torch.Tensor:
        """Tensor `key` of the task's model, in its output dtype."""
        info = self.infos[key]
        if key not in self.merged:
            own = self.private is not None and key in self.private.infos
            return (self.private.read(key) if own else self.base.read(key)).to(info.dtype)
        theta0 = self.base.read(key)
        mask = unpack_bits(self.masks.read(key), theta0.numel()).reshape(theta0.shape)
        if self.vector is None:
            return rebuild_sparse(theta0, self.values.read(key), mask).to(info.dtype)
        return rebuild(theta0, self.vector[key].read(key), mask).to(info.dtype)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Tensor `key` into `out` (contiguous, any dtype): its output dtype's values, cast to `out`'s. A
        merged tensor on the CPU goes from θ0, τ_MTL and the packed mask straight into `out`
        (`rebuild_packed_into`), row block by row block: no whole-tensor temporary."""
        if key in self.merged and self.vector is not None and out.device.type == "cpu":
            info, flat, packed = self.base.infos[key], out.view(-1), self.masks.read(key)
            stored = self.infos[key].dtype
            for rows in row_blocks(info, READ_BLOCK_ENTRIES):
                start = first_entry(info, rows)
                theta0 = self.base.read(key, rows).reshape(-1)
                tau = self.vector[key].read(key, rows).reshape(-1)
                stop = start + theta0.numel()
                rebuild_packed_into(
                    theta0, tau, packed[start // 8 : (stop + 7) // 8], stored, flat[start:stop]
                )
            return
        out.copy_(self.read(key))
