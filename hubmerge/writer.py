"""Streaming safetensors output: headers first, then each piece at its final position.

The safetensors library writes a file from a complete state dict. A merge produces one piece of one tensor at a
time, and every shape and dtype is known before the first tensor is read, so the header is written up front and
each piece is written at its final position as soon as it is computed: memory stays bounded by a few pieces, and
pieces may come in any order, from a writer thread or from several processes.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from huggingface_hub.serialization._base import parse_size_to_int

from hubmerge.errors import HubmergeError
from hubmerge.integrity import InOrderHash
from hubmerge.sources import SAFETENSORS_DTYPES, support_files

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def parse_shard_size(value: int | str, option: str = "--max-shard-size") -> int:
    """A shard limit as bytes: an int, or a size such as 5GB or 500MB (huggingface_hub's units).

    Raises:
        HubmergeError: naming `option`, for anything else, before any work starts.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        try:
            size = parse_size_to_int(str(value))
        except ValueError as err:
            raise HubmergeError(
                f"{option} {value}: not a size; write a number and a unit, e.g. 5GB, 500MB, 100KB or 1TB"
            ) from err
    if size <= 0:
        raise HubmergeError(f"{option} {value}: must be larger than zero")
    return size


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


class SafetensorsFile:
    """A safetensors file whose header is written first and whose tensor bytes go to fixed offsets.

    Every offset follows from the declared slots, so pieces can be written in any order, by any thread or
    process: the file is created (header + full size) once, then each writer opens it and puts its pieces
    in place. The bytes are the same whatever the order, which makes multi-process output byte-identical.
    """

    def __init__(self, path: Path, slots: list[Slot], metadata: dict[str, str] | None = None):
        self.path = path
        self.slots = {slot.key: slot for slot in slots}
        self._header = safetensors_header(slots, metadata)
        self._offsets: dict[str, int] = {}
        offset = len(self._header)
        for slot in slots:
            self._offsets[slot.key] = offset
            offset += slot.nbytes
        self.size = offset
        self.written = 0  # bytes this process put in the file
        self._fd: int | None = None
        self._hash = InOrderHash(self.size, self._header)

    def create(self) -> None:
        """Write the header and extend the file to its full size (one process, before any `write`)."""
        with open(self.path, "wb") as handle:
            handle.write(self._header)
            handle.truncate(self.size)

    def write(self, key: str, piece: torch.Tensor, start: int = 0) -> None:
        """Put `piece` at entry `start` (row-major, counted in the tensor's dtype) of tensor `key`."""
        slot = self.slots.get(key)
        if slot is None:
            raise RuntimeError(f"{self.path.name}: no tensor {key!r} in this file")
        if piece.dtype != slot.dtype:
            raise RuntimeError(f"{self.path.name}: {key} is {slot.dtype}, got {piece.dtype}")
        data = tensor_bytes(piece)
        position = start * slot.dtype.itemsize
        if position + len(data) > slot.nbytes:
            raise RuntimeError(f"{self.path.name}: too many bytes for {key}")
        if self._fd is None:
            # readable: the running hash reads back the bytes written ahead of its prefix
            self._fd = os.open(self.path, os.O_RDWR)
        offset, done = self._offsets[key] + position, 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        self._hash.wrote(self._fd, offset, data)
        self.written += len(data)

    @property
    def sha256(self) -> str | None:
        """The file's SHA-256 if this process wrote every byte of it once, in any order (else None)."""
        return self._hash.hexdigest()

    @property
    def data_bytes(self) -> int:
        return self.size - len(self._header)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class ShardedFiles:
    """Tensors in `<stem>.safetensors`, or in shards + index above `max_shard_size`, written by position.

    Shard assignment is huggingface_hub's (the same as `save_torch_state_dict`); a tensor larger than the limit
    gets a shard of its own. `max_shard_size=None` writes one file whatever its size.
    """

    def __init__(
        self,
        directory: Path,
        slots: list[Slot],
        max_shard_size: int | str | None,
        stem: str = "model",
        metadata: dict[str, str] | None = None,
    ):
        if max_shard_size is None:
            max_shard_size = sum(slot.nbytes for slot in slots) + 1
        split = split_state_dict_into_shards_factory(
            {slot.key: slot for slot in slots},
            get_storage_size=lambda slot: slot.nbytes,
            filename_pattern=stem + "{suffix}.safetensors",
            max_shard_size=max_shard_size,
        )
        by_key = {slot.key: slot for slot in slots}
        metadata = {"format": "pt", **(metadata or {})}
        self._files = {
            name: SafetensorsFile(directory / name, [by_key[k] for k in keys], metadata)
            for name, keys in split.filename_to_tensors.items()
        }
        self._file_of = split.tensor_to_filename
        self._index = None
        if split.is_sharded:
            self._index = (
                directory / f"{stem}.safetensors.index.json",
                {"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))},
            )
        self.files = list(self._files)

    def create(self) -> None:
        for file in self._files.values():
            file.create()
        if self._index is not None:
            path, index = self._index
            path.write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, piece: torch.Tensor, start: int = 0) -> None:
        self._files[self._file_of[key]].write(key, piece, start)

    @property
    def written(self) -> int:
        return sum(file.written for file in self._files.values())

    def digests(self) -> dict[str, str]:
        """{file name: SHA-256} of the files hashed while written (see `SafetensorsFile.sha256`)."""
        return {name: digest for name, file in self._files.items() if (digest := file.sha256)}

    @property
    def data_bytes(self) -> int:
        return sum(file.data_bytes for file in self._files.values())

    def close(self) -> None:
        for file in self._files.values():
            file.close()


@dataclass(frozen=True)
class SpooledPiece:
    """Where one piece of a spooled tensor lies: its key, its position in the key's pieces, its length."""

    key: str
    order: int
    length: int
    rank: int
    spool_offset: int


class ValueSpool:
    """One process's share of a safetensors file of 1-D tensors whose lengths are known only at the end.

    Each process spools its pieces (e.g. a task's kept values) to its own file; `assemble` then writes the
    header from every process's piece list and copies the pieces behind it in key order, then piece order.
    """

    def __init__(self, path: Path, dtype: torch.dtype, rank: int = 0):
        self.path = path
        self.dtype = dtype
        self.rank = rank
        self.spool_path = spool_path(path, rank)
        self.pieces: list[SpooledPiece] = []
        self._offset = 0
        self._spool = open(self.spool_path, "wb")  # noqa: SIM115 - closed by finish()

    def write(self, key: str, order: int, piece: torch.Tensor) -> None:
        data = tensor_bytes(piece.to(self.dtype))
        self.pieces.append(SpooledPiece(key, order, piece.numel(), self.rank, self._offset))
        self._spool.write(data)
        self._offset += len(data)

    def finish(self) -> list[SpooledPiece]:
        self._spool.close()
        if not self.pieces:
            self.spool_path.unlink()
        return self.pieces


def spool_path(path: Path, rank: int) -> Path:
    return path.with_name(f"{path.name}.{rank}.spool")


def assemble_spooled(
    path: Path,
    dtype: torch.dtype,
    keys: list[str],
    pieces: list[SpooledPiece],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write the file of `ValueSpool`s: tensors in `keys` order, each the concatenation of its pieces."""
    by_key: dict[str, list[SpooledPiece]] = {key: [] for key in keys}
    for piece in pieces:
        by_key[piece.key].append(piece)
    slots = []
    for key, parts in by_key.items():
        parts.sort(key=lambda p: p.order)
        slots.append(Slot(key, dtype, (sum(p.length for p in parts),)))
    spools: dict[int, Path] = {p.rank: spool_path(path, p.rank) for p in pieces}
    with open(path, "wb") as out:
        out.write(safetensors_header(slots, metadata))
        handles = {rank: open(spool, "rb") for rank, spool in spools.items()}  # noqa: SIM115
        try:
            for parts in by_key.values():
                for part in parts:
                    handle = handles[part.rank]
                    handle.seek(part.spool_offset)
                    remaining = part.length * dtype.itemsize
                    while remaining:
                        chunk = handle.read(min(remaining, 1 << 24))
                        out.write(chunk)
                        remaining -= len(chunk)
        finally:
            for handle in handles.values():
                handle.close()
    for spool in spools.values():
        spool.unlink()


def copy_support_files(source: Path | None, destination: Path) -> None:
    """Config, tokenizer and generation files of the base, so an output loads like the base does."""
    if source is None:
        return
    for rel in support_files(source):
        (destination / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, destination / rel)
