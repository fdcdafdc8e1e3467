"""Compressed artifacts: the format, and its writer (τ_MTL + one bit-packed mask per task, written streaming).

Layout of an artifact directory:

    hubmerge.json                     manifest: format, method, parameters, base + tasks with revisions, stats,
                                      each task's own part (`hubmerge.private`), the files' hashes
    tau_mtl.safetensors               τ_MTL in `tau_dtype`, float32 by default (sharded +
                                      tau_mtl.safetensors.index.json when large)
    masks/<task>.safetensors          per tensor: uint8, 8 entries per byte, row-major, big-endian bit order
                                      (numpy.packbits), last byte zero-padded; shapes in the file metadata
    values/<task>.safetensors         magnitude pruning only: the task's kept τ values, row-major
    private/<task>.safetensors        the task's own tensors, as its fine-tune stores them (heads, ...)
    tasks/<task>/                     the task's config, tokenizer and generation files that differ from the base's
    README.md, hubmerge_recipe.yaml

Task t is rebuilt as θ0 + m_t ⊙ τ_MTL (magnitude pruning: θ0 + m_t ⊙ τ_t), computed in float32 (`rebuild`);
reading an artifact is `hubmerge.compressed`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hubmerge import fused
from hubmerge.distributed import Group
from hubmerge.output import MANIFEST
from hubmerge.private import PRIVATE_DIR, TASK_FILES_DIR
from hubmerge.writer import (
    SafetensorsFile,
    ShardedFiles,
    Slot,
    ValueSpool,
    assemble_spooled,
)

FORMAT = "hubmerge-compressed"
TASK_FORMAT = "hubmerge-task"  # a task's model rebuilt from an artifact (`hubmerge materialize`)
FORMAT_VERSION = 2  # 2: each task's own tensors and files (`hubmerge.private`)
RECIPE_FILE = "hubmerge_recipe.yaml"  # the pinned recipe, in every output
VECTOR_STEM = "tau_mtl"
MASK_DIR = "masks"
VALUE_DIR = "values"
# Folder and file names of the artifact itself, which exported task subfolders must not take.
RESERVED_NAMES = (
    MASK_DIR,
    VALUE_DIR,
    PRIVATE_DIR,
    TASK_FILES_DIR,
    MANIFEST,
    RECIPE_FILE,
    "README.md",
    "mask_agreement.png",
)
PACKING = "per tensor, row-major, 8 entries per byte, big-endian bit order (numpy.packbits), zero-padded"
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 on the CPU, 8 entries per byte, first entry in the most significant bit."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` entries as a flat bool tensor."""
    return torch.from_numpy(np.unpackbits(packed.cpu().numpy(), count=numel).astype(bool))


def rebuild(theta0: torch.Tensor, tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """θ0 + m ⊙ τ in float32, from tensors in any float dtype: θ0 itself where the mask is off (even where τ
    is not finite), so every reader of an artifact gets the same bits.

    Args:
        theta0: the base's tensor (or piece).
        tau: τ_MTL there, same shape.
        mask: the task's bool mask there, same shape.
    """
    theta0 = theta0.float()
    return torch.where(mask, theta0 + tau.float(), theta0)


def rebuild_sparse(theta0: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning's θ0 + m ⊙ τ_t in float32, from the task's kept values (row-major order of `mask`)."""
    flat = theta0.float().reshape(-1).clone()
    flat[mask.reshape(-1)] += values.float()
    return flat.reshape(theta0.shape)


# Entries rebuilt at once by torch operations (a multiple of 8: whole bytes of a packed mask): the float32
# temporaries of a piece stay in the caches on a CPU, and a GPU still gets large kernels.
REBUILD_PIECE_ENTRIES = 1 << 18
_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bits_on(packed: torch.Tensor, count: int) -> torch.Tensor:
    """`unpack_bits` with torch operations, on the packed tensor's device: `count` bools."""
    shifts = _BIT_SHIFTS.get(packed.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[packed.device] = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:count].bool()


def rebuild_packed_into(
    theta0: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, stored: torch.dtype, out: torch.Tensor
) -> None:
    """`rebuild` of flat θ0 and τ with the packed mask (`pack_bits`) of the same entries, cast to `stored` (the
    dtype the task's model stores it in), then written into flat `out` in its own dtype.

    The fused CPU kernel does it in one pass where it applies; elsewhere (a GPU, float16) torch operations do,
    piece by piece, with the same bits.
    """
    if fused.rebuild_into(theta0, tau, packed, stored, out):
        return
    n = theta0.numel()
    for start in range(0, n, REBUILD_PIECE_ENTRIES):
        stop = min(start + REBUILD_PIECE_ENTRIES, n)
        mask = unpack_bits_on(packed[start // 8 : (stop + 7) // 8], stop - start)
        out[start:stop].copy_(rebuild(theta0[start:stop], tau[start:stop], mask).to(stored))


def packed_size(numel: int) -> int:
    return math.ceil(numel / 8)


def output_dtype(name: str, stored: torch.dtype) -> torch.dtype:
    """The dtype a float tensor is written in: `auto` keeps the base's."""
    return stored if name == "auto" else OUTPUT_DTYPES[name]


class ArtifactWriter:
    """Writes an artifact directory piece by piece; pieces may come in any order and from several processes."""

    def __init__(
        self,
        directory: Path,
        shapes: dict[str, tuple[int, ...]],
        task_names: list[str],
        *,
        shared_vector: bool,
        own_values: bool,
        max_shard_size: int | str,
        vector_dtype: torch.dtype = torch.float32,
        rank: int = 0,
    ):
        self.directory = directory
        self._vector_dtype = vector_dtype
        self._keys = list(shapes)
        shape_meta = {
            "hubmerge.shapes": json.dumps({k: list(s) for k, s in shapes.items()}),
            "hubmerge.packing": PACKING,
        }
        self._vector = (
            ShardedFiles(
                directory,
                [Slot(k, vector_dtype, s) for k, s in shapes.items()],
                max_shard_size,
                stem=VECTOR_STEM,
            )
            if shared_vector
            else None
        )
        self._masks = [
            SafetensorsFile(
                directory / MASK_DIR / f"{name}.safetensors",
                [Slot(k, torch.uint8, (packed_size(math.prod(s)),)) for k, s in shapes.items()],
                shape_meta,
            )
            for name in task_names
        ]
        self._value_paths = [directory / VALUE_DIR / f"{name}.safetensors" for name in task_names]
        self._values: list[ValueSpool] = []
        self._own_values = own_values
        self._rank = rank

    def _files(self) -> list[ShardedFiles | SafetensorsFile]:
        return [*([self._vector] if self._vector is not None else []), *self._masks]

    def create(self) -> None:
        """Create the folders and the fixed-size files (one process, before any `write`)."""
        (self.directory / MASK_DIR).mkdir()
        if self._own_values:
            (self.directory / VALUE_DIR).mkdir()
        for file in self._files():
            file.create()

    def write(
        self,
        key: str,
        start: int,
        tau_mtl: torch.Tensor | None,
        masks: list[torch.Tensor],
        taus: list[torch.Tensor],
    ) -> None:
        """The piece of `key` whose first (row-major) entry is `start`, a multiple of 8 (bit packing)."""
        if self._own_values and not self._values:
            self._values = [ValueSpool(path, self._vector_dtype, self._rank) for path in self._value_paths]
        if self._vector is not None:
            self._vector.write(key, tau_mtl.to("cpu", self._vector_dtype), start)
        for file, mask in zip(self._masks, masks, strict=True):
            file.write(key, pack_bits(mask), start // 8)
        for spool, mask, tau in zip(self._values, masks, taus, strict=False):
            spool.write(key, start, tau.reshape(-1)[mask.reshape(-1)].to("cpu"))

    @property
    def written(self) -> int:
        return sum(file.written for file in self._files())

    def digests(self) -> dict[str, str]:
        """{path relative to the artifact: SHA-256} of the files hashed while written."""
        digests = self._vector.digests() if self._vector is not None else {}
        for mask in self._masks:
            if (digest := mask.sha256) is not None:
                digests[mask.path.relative_to(self.directory).as_posix()] = digest
        return digests

    @property
    def data_bytes(self) -> int:
        return sum(file.data_bytes for file in self._files())

    def close(self) -> None:
        for file in self._files():
            file.close()

    def assemble_values(self, group: Group) -> None:
        """Magnitude pruning: rank 0 writes each task's values file from every process's spooled pieces."""
        if not self._own_values:
            return
        pieces = group.gather([spool.finish() for spool in self._values])
        if group.is_main:
            for i, path in enumerate(self._value_paths):
                task_pieces = [piece for share in pieces if share for piece in share[i]]
                assemble_spooled(path, self._vector_dtype, self._keys, task_pieces)
        group.barrier()


def storage_summary(
    d: int,
    num_tasks: int,
    *,
    base_bits: float,
    vector_dtype: str,
    kept_values: int | None,
    private_entries: int,
    private_bytes: int,
    shared_entries: int,
    finetuned_bytes: int,
) -> dict[str, Any]:
    """Storage in bits: this artifact, the paper's accounting (its App. C), and T fine-tuned copies.

    Args:
        d: P′, the merged entries.
        num_tasks: T.
        base_bits: bits per merged entry of the base as stored.
        vector_dtype: the dtype τ_MTL (or the kept values) is stored in.
        kept_values: magnitude pruning's kept entries over all tasks; None for a shared τ_MTL.
        private_entries, private_bytes: the tasks' own tensors (heads, ...) over all tasks, F in the paper.
        shared_entries: the base's other entries the tasks use unchanged (stored once, in the base).
        finetuned_bytes: the T fine-tuned checkpoints as stored.
    """
    vector_bits = 8 * OUTPUT_DTYPES[vector_dtype].itemsize
    vector = vector_bits * (d if kept_values is None else kept_values)
    artifact = vector + d * num_tasks + 8 * private_bytes
    return {
        "parameters": d,
        "tasks": num_tasks,
        "vector_dtype": vector_dtype,
        "vector_bits_per_entry": vector_bits,
        "private_entries": private_entries,
        "private_bits": 8 * private_bytes,
        "shared_entries": shared_entries,
        "artifact_bits": artifact,
        "artifact_bits_per_task": artifact / num_tasks,
        # θ0 and τ_MTL in float32, one bit per entry per task, float32 heads and other unmerged entries
        "paper_bits": (
            (64 + num_tasks) * d + 32 * (private_entries + shared_entries) if kept_values is None else None
        ),
        "finetuned_fp32_bits": 32 * (num_tasks * (d + shared_entries) + private_entries),
        "finetuned_stored_bits": 8 * finetuned_bytes,
        "base_bits_per_entry": base_bits,
    }
