"""Each task's own part of a compressed artifact: the tensors it does not merge and the files that make it itself.

A task rebuilt from an artifact is the fine-tune: its keys, shapes, dtypes and config. Merged tensors come from
θ0 + m_t ⊙ τ_MTL. Every other tensor of the fine-tune is either the base's, byte for byte (referenced, not
stored), or kept as the fine-tune stores it in `private/<task>.safetensors`: a classification head, a tensor the
recipe excludes that training changed, a tensor the base lacks or has in another shape. Config, tokenizer and
generation files that differ from the base's (`id2label`, `num_labels`, `architectures`, ...) are kept in
`tasks/<task>/`. Base tensors that a fine-tune lacks are not part of its task model.
"""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path
from typing import Any

import torch

from hubmerge.nonfinite import NonfiniteCounts
from hubmerge.sources import Checkpoint, support_files
from hubmerge.writer import DTYPE_NAMES, SafetensorsFile, Slot

PRIVATE_DIR = "private"
TASK_FILES_DIR = "tasks"


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical tensors (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def task_parts(
    name: str,
    index: int,
    model: Checkpoint,
    base: Checkpoint,
    merge_keys: list[str],
    directory: Path,
    nonfinite: NonfiniteCounts,
) -> tuple[dict[str, Any], str | None]:
    """Write task `name`'s own tensors and files into the artifact `directory`.

    Args:
        name: the task.
        index: its position among the tasks (for the NaN/Inf counts, which index the base as 0).
        model: its fine-tuned checkpoint.
        base: the base checkpoint.
        merge_keys: the tensors the artifact merges (every task has them, in the base's shapes).
        directory: the artifact being written.
        nonfinite: the run's NaN/Inf counts; a task's own tensors are checked like merged ones.

    Returns:
        The task's record (`private`, `from_base`, `files`, `merged_dtypes`) and the SHA-256 of its private
        tensor file (None when it has no own tensor).
    """
    merged = set(merge_keys)
    own, from_base = [], []
    for key in sorted(k for k in model.infos if k not in merged):
        info = model.infos[key]
        if base.infos.get(key) == info and same_bytes(model.read(key), base.read(key)):
            from_base.append(key)
        else:
            own.append(key)
    record: dict[str, Any] = {
        "private": None,
        "from_base": from_base,
        "merged_dtypes": {
            key: DTYPE_NAMES[model.infos[key].dtype]
            for key in merge_keys
            if model.infos[key].dtype != base.infos[key].dtype
        },
        "files": copy_task_files(model, base, directory / TASK_FILES_DIR / name),
    }
    digest = None
    if own:
        path = directory / PRIVATE_DIR / f"{name}.safetensors"
        path.parent.mkdir(exist_ok=True)
        file = SafetensorsFile(path, [Slot(k, model.infos[k].dtype, model.infos[k].shape) for k in own])
        file.create()
        try:
            for key in own:
                tensor = model.read(key)
                nonfinite.check_one(index, key, tensor)
                file.write(key, tensor)
        finally:
            file.close()
        digest = file.sha256
        record["private"] = {
            "file": path.relative_to(directory).as_posix(),
            "tensors": len(own),
            "entries": sum(model.infos[k].numel for k in own),
            "bytes": file.data_bytes,
        }
    return record, digest


def copy_task_files(model: Checkpoint, base: Checkpoint, destination: Path) -> list[str]:
    """Copy the fine-tune's config, tokenizer and generation files that the base lacks or has otherwise."""
    if model.directory is None:
        return []
    kept = []
    for rel in support_files(model.directory):
        theirs = base.directory / rel if base.directory is not None else None
        if (
            theirs is not None
            and theirs.is_file()
            and filecmp.cmp(model.directory / rel, theirs, shallow=False)
        ):
            continue
        (destination / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.directory / rel, destination / rel)
        kept.append(rel.as_posix())
    return kept
