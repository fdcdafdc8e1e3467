"""Streaming safetensors output and all-or-nothing output directories.

The safetensors library writes a file from a complete state dict. A merge produces one piece of one tensor at a
time, and every shape and dtype is known before the first tensor is read, so the header is written up front and
tensor bytes are appended as they are computed: memory stays bounded by one piece.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory

from hubmerge.errors import HubmergeError
from hubmerge.sources import SAFETENSORS_DTYPES, support_files

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class Slot:
    """One tensor of an output file: declared before any data is written."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def safetensors_header(slots: list[Slot], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for slot in slots:
        header[slot.key] = {
            "dtype": DTYPE_NAMES[slot.dtype],
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


class SafetensorsStream:
    """A safetensors file written in declared order; each tensor may arrive in several consecutive pieces."""

    def __init__(self, path: Path, slots: list[Slot], metadata: dict[str, str] | None = None):
        self.path = path
        self._slots = slots
        self._index = 0
        self._written = 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed by close(), possibly much later
        self._file.write(safetensors_header(slots, metadata))
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._slots) and self._slots[self._index].nbytes == 0:
            self._index += 1

    @property
    def done(self) -> bool:
        return self._index == len(self._slots)

    def write(self, key: str, piece: torch.Tensor) -> None:
        if piece.numel() == 0:  # empty tensors hold no bytes: their slots are skipped as they come up
            return
        if self.done or self._slots[self._index].key != key:
            expected = "nothing more" if self.done else repr(self._slots[self._index].key)
            raise RuntimeError(f"{self.path.name}: got {key!r}, expected {expected}")
        slot = self._slots[self._index]
        if piece.dtype != slot.dtype:
            raise RuntimeError(f"{self.path.name}: {key} is {slot.dtype}, got {piece.dtype}")
        data = tensor_bytes(piece)
        self._written += len(data)
        if self._written > slot.nbytes:
            raise RuntimeError(f"{self.path.name}: too many bytes for {key}")
        self._file.write(data)
        if self._written == slot.nbytes:
            self._index += 1
            self._written = 0
            self._skip_empty()

    def close(self) -> None:
        self._file.close()
        if not self.done:
            raise RuntimeError(f"{self.path.name}: closed before {self._slots[self._index].key} was written")


class ShardedStream:
    """Tensors written in declared order into `<stem>.safetensors` or shards + index above `max_shard_size`.

    Shard assignment is huggingface_hub's (the same as `save_torch_state_dict`); a tensor larger than the limit
    gets a shard of its own, so several shard files can be open at once.
    """

    def __init__(
        self,
        directory: Path,
        slots: list[Slot],
        max_shard_size: int | str,
        stem: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        split = split_state_dict_into_shards_factory(
            {slot.key: slot for slot in slots},
            get_storage_size=lambda slot: slot.nbytes,
            filename_pattern=stem + "{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        by_key = {slot.key: slot for slot in slots}
        self._directory = directory
        self._metadata = {"format": "pt", **(metadata or {})}
        self._file_slots = {
            name: [by_key[k] for k in keys] for name, keys in split.filename_to_tensors.items()
        }
        self._file_of = split.tensor_to_filename
        self._open: dict[str, SafetensorsStream] = {}
        self.files = list(self._file_slots)
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
            (directory / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, piece: torch.Tensor) -> None:
        name = self._file_of[key]
        if name not in self._open:
            self._open[name] = SafetensorsStream(
                self._directory / name, self._file_slots[name], self._metadata
            )
        stream = self._open[name]
        stream.write(key, piece)
        if stream.done:
            stream.close()

    def close(self) -> None:
        for name, slots in self._file_slots.items():
            if name not in self._open:  # a file of empty tensors only
                SafetensorsStream(self._directory / name, slots, self._metadata).close()
            elif not self._open[name].done:
                self._open[name].close()


class SpooledSafetensors:
    """A safetensors file of 1-D tensors whose lengths are known only at the end (e.g. kept values).

    Pieces go to a spool file beside the output; `close` writes the header and copies the spool behind it.
    """

    def __init__(self, path: Path, dtype: torch.dtype, metadata: dict[str, str] | None = None):
        self.path = path
        self._dtype = dtype
        self._metadata = metadata
        self._lengths: dict[str, int] = {}
        self._spool_path = path.with_name(path.name + ".spool")
        self._spool = open(self._spool_path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, key: str, piece: torch.Tensor) -> None:
        if key in self._lengths and next(reversed(self._lengths)) != key:
            raise RuntimeError(f"{self.path.name}: pieces of {key} must be written consecutively")
        self._lengths[key] = self._lengths.get(key, 0) + piece.numel()
        self._spool.write(tensor_bytes(piece.to(self._dtype)))

    def close(self) -> None:
        self._spool.close()
        slots = [Slot(key, self._dtype, (n,)) for key, n in self._lengths.items()]
        with open(self.path, "wb") as out, open(self._spool_path, "rb") as spool:
            out.write(safetensors_header(slots, self._metadata))
            shutil.copyfileobj(spool, out, 1 << 24)
        self._spool_path.unlink()


def check_output_path(target: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty directory without `overwrite`, before any work."""
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise HubmergeError(f"output path {target} is a file, not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HubmergeError(f"output directory {target} is not empty (pass --overwrite to replace it)")
    parent = target.resolve().parent
    if parent.exists() and not parent.is_dir():
        raise HubmergeError(f"output path {target}: parent {parent} is not a directory")


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only when the block completes.

    An interrupted or failed run leaves `target` as it was (absent, or the previous output).
    """
    check_output_path(target, overwrite)
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp creates 0700; outputs are ordinary directories
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, retired / "previous")
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_support_files(source: Path | None, destination: Path) -> None:
    """Config, tokenizer and generation files of the base, so an output loads like the base does."""
    if source is None:
        return
    for rel in support_files(source):
        (destination / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, destination / rel)
