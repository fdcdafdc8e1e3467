"""Resolve model sources (local dir, single file, Hub id) and read their tensors lazily, piece by piece."""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import re
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from hubmerge import hub
from hubmerge.errors import SourceError
from hubmerge.hub import (
    ADAPTER_CONFIG,
    BIN_INDEX,
    CARD_FILE,
    OPEN_CLIP_CONFIG,
    SAFETENSORS_INDEX,
    SUPPORT_FILES,
    HubSource,
)
from hubmerge.recipe import is_hub_id

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
INHERITED_CARD_KEYS = ("license", "license_name", "license_link", "pipeline_tag")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}


Rows = tuple[int, int] | None  # a row range [start, stop) of a tensor's first dimension; None: all of it


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class Provenance:
    """Where a checkpoint came from: recorded with every output so that a run can be repeated."""

    source: str  # as written in the recipe
    location: str  # absolute local path, or the Hub repo id
    revision: str | None = None  # resolved commit sha for Hub sources

    def as_dict(self) -> dict[str, str | None]:
        return {"source": self.source, "location": self.location, "revision": self.revision}


@dataclass
class Checkpoint:
    """A model's weights, opened lazily: shapes and dtypes come from file headers, data on request."""

    provenance: Provenance
    root: Path  # the model directory (or the single file)
    weight_files: list[Path]
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    _key_file: dict[str, Path] = field(default_factory=dict)
    _readers: dict[Path, SafetensorsReader | PickledReader] = field(default_factory=dict)
    card_metadata: dict[str, str] = field(default_factory=dict)  # what a merge inherits from this card

    @property
    def name(self) -> str:
        return self.provenance.source

    @property
    def directory(self) -> Path | None:
        """The model directory holding config/tokenizer files, or None for a bare weights file."""
        return self.root if self.root.is_dir() else None

    @property
    def is_open_clip(self) -> bool:
        """An open_clip checkpoint (its directory has open_clip_config.json) rather than a transformers one."""
        return self.directory is not None and (self.directory / OPEN_CLIP_CONFIG).is_file()

    @property
    def weights_stem(self) -> str:
        """The weight file name outputs of this base use: what its own library looks for when loading."""
        return "open_clip_model" if self.is_open_clip else "model"

    def output_shard_size(self, requested: int | str) -> int | str | None:
        """The shard limit for outputs of this base: None (one file) for open_clip, which loads no shards."""
        return None if self.is_open_clip else requested

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def stored_bytes(self) -> int:
        """The bytes of its tensors as stored (what a task's fine-tuned copy takes)."""
        return sum(info.nbytes for info in self.infos.values())

    def read(self, key: str, rows: tuple[int, int] | None = None, pin_memory: bool = False) -> torch.Tensor:
        """One tensor, or the row range [start, stop) of its first dimension, as stored (no upcast).

        `pin_memory` reads safetensors data straight into page-locked memory, for a fast copy to a GPU.
        """
        return self._reader(self._key_file[key]).read(key, rows, pin_memory)

    def _reader(self, path: Path) -> SafetensorsReader | PickledReader:
        if path not in self._readers:
            self._readers[path] = (
                SafetensorsReader(path) if path.suffix == ".safetensors" else PickledReader(path)
            )
        return self._readers[path]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _offsets_text(start: int, end: int) -> str:
    return f"data_offsets [{start}, {end}]"


def _naturals(value: object) -> bool:
    """A JSON list of non-negative integers (true/false are integers to Python, not to the format)."""
    return isinstance(value, list) and all(type(n) is int and n >= 0 for n in value)


def _tensor_entry(entry: object) -> tuple[TensorInfo, int, int] | str:
    """(info, start, end) of one header entry, or what is malformed in it."""
    if not isinstance(entry, dict):
        return "its entry is not a JSON object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        return f"unsupported dtype {dtype!r} (supported: {', '.join(SAFETENSORS_DTYPES)})"
    if not _naturals(shape):
        return f"malformed shape {shape!r} (a list of non-negative integers)"
    if not _naturals(offsets) or len(offsets) != 2:
        return f"malformed data_offsets {offsets!r} (two non-negative integers)"
    start, end = offsets
    info = TensorInfo(tuple(shape), SAFETENSORS_DTYPES[dtype])
    if end < start:
        return f"{_offsets_text(start, end)} end before they start"
    if end - start != info.nbytes:
        return (
            f"{_offsets_text(start, end)} hold {end - start} bytes, but dtype {dtype} and shape {shape} "
            f"take {info.nbytes}"
        )
    return info, start, end


def parse_safetensors_header(header: dict, data_size: int, origin: str) -> dict[str, tuple[TensorInfo, int]]:
    """Every tensor of a safetensors header with its data offset, checked as strictly as `safetensors` does.

    Positioned reads trust the offsets, so a header whose byte ranges overlap, leave gaps, or do not cover the
    data section exactly would otherwise be read as silently wrong tensors.

    Args:
        header: the parsed header JSON object.
        data_size: bytes after the header (file size − 8 − header size).
        origin: the file, named in errors.

    Returns:
        {tensor name: (shape and dtype, start offset within the data section)}.
    """
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SourceError(f"{origin}: __metadata__ must map strings to strings", path=origin)
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, tuple[TensorInfo, int]] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        parsed = _tensor_entry(entry)
        if isinstance(parsed, str):
            raise SourceError(f"{origin}: tensor {key!r}: {parsed}", path=origin)
        info, start, end = parsed
        entries[key] = (info, start)
        spans.append((start, end, key))
    covered, previous = 0, None
    for start, end, key in sorted(spans):
        if start < covered:
            raise SourceError(
                f"{origin}: tensor {key!r} overlaps {previous!r} ({_offsets_text(start, end)})", path=origin
            )
        if start > covered:
            after = f"after {previous!r}" if previous else "at the start of the data"
            raise SourceError(
                f"{origin}: tensor {key!r} ({_offsets_text(start, end)}) leaves {start - covered} bytes "
                f"{after} that belong to no tensor",
                path=origin,
            )
        covered, previous = end, key
    if covered > data_size:
        raise SourceError(
            f"{origin}: tensor {previous!r} ends at byte {covered} of a data section of {data_size} bytes "
            "(the file is truncated)",
            path=origin,
        )
    if covered < data_size:
        last = f"the last tensor, {previous!r}" if previous else "an empty header"
        raise SourceError(
            f"{origin}: {data_size - covered} bytes after {last} belong to no tensor "
            f"(the data section holds {data_size}, the header accounts for {covered})",
            path=origin,
        )
    return entries


class SafetensorsReader:
    """A safetensors file read with positioned reads instead of a memory map.

    A memory-mapped file keeps every page it has read counted in the process's resident memory until it is
    closed, so a merge that maps T+1 checkpoints shows (T+1) × model size of RSS. Reading the byte range of
    each piece into a fresh buffer keeps resident memory at the pieces in use.
    """

    MAX_HEADER = 100_000_000

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_size = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 < header_size <= min(self.MAX_HEADER, size - 8):
                raise SourceError(f"{path}: not a safetensors file (bad header size)", path=path)
            raw = f.read(header_size)
        if not raw.startswith(b"{"):
            raise SourceError(
                f"{path}: not a safetensors file (the header does not start with '{{')", path=path
            )
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SourceError(
                f"{path}: not a safetensors file (unreadable header: {err})", path=path
            ) from err
        self._data_start = 8 + header_size
        entries = parse_safetensors_header(header, size - self._data_start, str(path))
        self.infos: dict[str, TensorInfo] = {key: info for key, (info, _) in entries.items()}
        self._offsets: dict[str, int] = {key: start for key, (_, start) in entries.items()}
        self._fd = os.open(path, os.O_RDONLY)
        self._finalizer = weakref.finalize(self, os.close, self._fd)

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file, in memory (not a memory map: what is kept resident is really in memory)."""
        return {key: self.read(key) for key in self.infos}

    def read(self, key: str, rows: tuple[int, int] | None = None, pin_memory: bool = False) -> torch.Tensor:
        info = self.infos[key]
        offset, shape = self._data_start + self._offsets[key], info.shape
        if rows is not None and shape:
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            offset += rows[0] * row_bytes
            shape = (rows[1] - rows[0], *shape[1:])
        piece = TensorInfo(shape, info.dtype)
        buffer = torch.empty(piece.nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        view, done = memoryview(buffer.numpy()), 0
        while done < piece.nbytes:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise SourceError(f"{self.path}: file ended while reading {key!r}", path=self.path)
            done += got
        return buffer.view(info.dtype).reshape(shape)

    def close(self) -> None:
        self._finalizer()


class PickledReader:
    """A .bin checkpoint loaded through torch's weights-only unpickler (memory-mapped when possible)."""

    def __init__(self, path: Path):
        self._tensors = _load_pickled_weights(path)
        self.infos = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in self._tensors.items()}

    def read(self, key: str, rows: tuple[int, int] | None = None, pin_memory: bool = False) -> torch.Tensor:
        tensor = self._tensors[key]  # already in memory: pinning a copy would gain nothing
        return tensor if rows is None or tensor.dim() == 0 else tensor[rows[0] : rows[1]]

    def close(self) -> None:
        self._tensors = {}


def _load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .bin checkpoint through torch's weights-only unpickler: never runs code from the file."""
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as err:
        raise SourceError(
            f"{path}: refusing to load: it needs unsafe unpickling ({_unpickling_reason(err)}); "
            "convert it to safetensors",
            path=path,
        ) from err
    except (RuntimeError, OSError, EOFError) as err:
        raise SourceError(f"{path}: not a readable PyTorch checkpoint ({err})", path=path) from err
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise SourceError(
            f"{path}: expected a flat mapping of tensor names to tensors (a state dict)", path=path
        )
    return data


def _unpickling_reason(err: Exception) -> str:
    """The line of torch's weights-only error that names what the file wanted to run."""
    lines = [ANSI_ESCAPE.sub("", line).strip() for line in str(err).splitlines()]
    named = [line for line in lines if line.startswith("Unsupported global") or "GLOBAL" in line]
    return (named or [line for line in lines if line] or ["unsupported pickle content"])[0]


def _weight_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise SourceError(f"{root}: not a weights file (.safetensors, .bin, .pt, .pth)", path=root)
        return [root]
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = root / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise SourceError(f"{index}: malformed shard index ({err})", path=index) from err
            files = [root / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise SourceError(f"{index}: shard {f.name} is missing", path=f)
            return files
    singles = (
        "model.safetensors",
        "open_clip_model.safetensors",
        "adapter_model.safetensors",
        "pytorch_model.bin",
        "open_clip_pytorch_model.bin",
        "adapter_model.bin",
    )
    for single in singles:
        if (root / single).is_file():
            return [root / single]
    candidates = sorted(root.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates
    found = ", ".join(p.name for p in candidates) if candidates else "none"
    if (root / ADAPTER_CONFIG).is_file():  # a PEFT adapter directory (hubmerge.adapters)
        raise SourceError(
            f"{root}: adapter weights missing: {root} has {ADAPTER_CONFIG} but no "
            "adapter_model.safetensors or adapter_model.bin",
            path=root,
        )
    # PEFT saves an adapter of another name than "default" in a folder of that name
    named = sorted(p.parent.name for p in root.glob(f"*/{ADAPTER_CONFIG}"))
    hint = (
        f"; PEFT adapters are in its subfolders: {', '.join(str(root / n) for n in named)}" if named else ""
    )
    raise SourceError(
        f"{root}: no model weights found (looked for {SAFETENSORS_INDEX}, model.safetensors, {BIN_INDEX}, "
        f"pytorch_model.bin, open_clip_pytorch_model.bin, or a single *.safetensors; found: {found}){hint}",
        path=root,
    )


def open_local(path: Path, provenance: Provenance) -> Checkpoint:
    """Index a local model directory or weights file: reads headers only."""
    ckpt = Checkpoint(provenance=provenance, root=path, weight_files=_weight_files(path))
    for f in ckpt.weight_files:
        items = ckpt._reader(f).infos.items()
        for k, info in items:
            if k in ckpt.infos:
                raise SourceError(f"{path}: tensor {k!r} appears in more than one shard", path=path)
            ckpt.infos[k] = info
            ckpt._key_file[k] = f
    if path.is_dir():
        ckpt.card_metadata.update(inherited_card_metadata(path / CARD_FILE))
    return ckpt


def inherited_card_metadata(card: Path) -> dict[str, str]:
    """License and pipeline tag from a model card's front matter; an unreadable card gives nothing."""
    if not card.is_file():
        return {}
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(card) or {}
    except (ValueError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    return {k: v for k in INHERITED_CARD_KEYS if isinstance(v := metadata.get(k), str)}


def locate_source(spec: str, *, token: str | None = None, endpoint: str | None = None) -> Path | HubSource:
    """Where a recipe source is: a local path that exists, or a Hub id pinned to its current commit.

    Nothing is downloaded, so every source can be checked before the first weight arrives.
    """
    if not is_hub_id(spec):
        path = Path(os.path.expanduser(spec))
        if not path.exists():
            reason = "no such file or directory"
            hints = () if path.is_absolute() else (hub.relative_hint(),)
            detail = "; ".join((reason, *hints))
            raise SourceError(
                f"source not found: {spec} ({detail})", spec, reason, missing=True, hints=hints, path=path
            )
        return path
    return hub.resolve(spec, token=token, endpoint=endpoint)


def sources_error(errors: list[SourceError]) -> SourceError:
    """One error for every source that cannot be located: `3 sources not found: ./a (...), org/x (...)`.

    Args:
        errors: one per source, in recipe order.

    Returns:
        The error to raise: the source's own for a single one.
    """
    if len(errors) == 1:
        return errors[0]
    what = "not found" if all(e.missing for e in errors) else "cannot be used"
    listed = ", ".join(f"{e.spec} ({e.reason})" for e in errors)
    hints = "".join(f"; {h}" for h in dict.fromkeys(h for e in errors for h in e.hints))
    return SourceError(f"{len(errors)} sources {what}: {listed}{hints}", missing=what == "not found")


def provenance(spec: str, where: Path | HubSource) -> Provenance:
    """Where a located source is: its absolute path, or its repo id at the pinned commit."""
    if isinstance(where, Path):
        return Provenance(source=spec, location=str(where.resolve()))
    return Provenance(source=spec, location=where.repo_id, revision=where.sha)


def open_source(
    spec: str, where: Path | HubSource, *, token: str | None = None, endpoint: str | None = None
) -> Checkpoint:
    """Open a located source (downloading a Hub snapshot at its pinned commit); reads headers only."""
    if isinstance(where, Path):
        ckpt = open_local(where, provenance(spec, where))
    else:
        path = hub.download(where, token=token, endpoint=endpoint)
        ckpt = open_local(path, provenance(spec, where))
        if where.pipeline_tag:
            ckpt.card_metadata.setdefault("pipeline_tag", where.pipeline_tag)
    return ckpt


def resolve_source(spec: str, *, token: str | None = None, endpoint: str | None = None) -> Checkpoint:
    """Open a recipe source: a local directory or weights file, or a Hub `org/name[@revision]`."""
    return open_source(
        spec, locate_source(spec, token=token, endpoint=endpoint), token=token, endpoint=endpoint
    )


def _glob_of(key: str) -> str:
    """A glob for the module of tensor `key` (`classifier.out_proj.weight` -> `classifier.out_proj.*`)."""
    return key.rsplit(".", 1)[0] + ".*" if "." in key else key


def support_files(directory: Path) -> list[Path]:
    """Config, tokenizer and similar files of a model directory (relative paths), to copy into outputs."""
    found = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and any(fnmatch.fnmatch(rel, pattern) for pattern in SUPPORT_FILES):
            found.append(Path(rel))
    return found


def check_compatible(
    base: Checkpoint,
    models: list[Checkpoint],
    names: list[str],
    selected: Callable[[str], bool],
    *,
    own_tensors: bool = False,
) -> None:
    """Every model must have the base's selected float tensors, with their shapes; raises naming the first diffs.

    Non-float tensors and unselected ones are copied from the base, so a model may lack them (e.g. a
    `position_ids` buffer that only some checkpoints store). Tensors the base lacks are reported, unless
    `own_tensors` (a compressed artifact keeps each task's other tensors as they are).
    """
    merged = {k for k, info in base.infos.items() if info.is_float and selected(k)}
    if not any(base.infos[k].numel for k in merged):
        what = "selected by include/exclude" if merged or base.infos else "in the base"
        raise SourceError(
            f"base {base.name}: has no floating-point weights {what}, nothing to merge", base.name
        )

    def head(keys: list[str]) -> str:
        shown = ", ".join(keys[:3])
        return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

    for name, model in zip(names, models, strict=True):
        problems = []
        missing = sorted(merged - set(model.infos))
        extra = sorted(k for k in set(model.infos) - set(base.infos) if selected(k))
        if own_tensors and not missing:
            extra = []  # a task's own tensors; beside missing ones they hint at other names (prefixes)
        if missing:
            problems.append(f"missing keys {head(missing)}")
        if extra:
            problems.append(f"extra keys {head(extra)}")
        mismatched = [
            f"{k} {list(model.infos[k].shape)} vs base {list(base.infos[k].shape)}"
            for k in sorted(merged)
            if k in model.infos and model.infos[k].shape != base.infos[k].shape
        ]
        if mismatched:
            keep = (
                "each task then keeps its own"
                if own_tensors
                else "the base's is then copied; a compressed artifact keeps each task's own"
            )
            problems.append(
                f"shape mismatch {head(mismatched)} (exclude them to leave them unmerged, e.g. "
                f"exclude: ['{_glob_of(mismatched[0].split()[0])}']; {keep})"
            )
        kinds = [k for k in sorted(merged) if k in model.infos and not model.infos[k].is_float]
        if kinds:
            problems.append(f"float/non-float mismatch {head(kinds)}")
        if missing and not extra and len(missing) < len(merged):
            problems.append(
                "if the models are a part of the base (e.g. CLIPVisionModel fine-tunes of a CLIPModel), "
                "merge only that part with `include:` (e.g. include: ['vision_model.*'])"
            )
        if problems:
            raise SourceError(
                f"model {name!r} ({model.name}) does not match the base: " + "; ".join(problems), model.name
            )
