"""Compressed artifacts: τ_MTL + one bit-packed mask per task, written streaming and rebuilt per task.

Layout of an artifact directory:

    hubmerge.json                     manifest: format, method, parameters, base + tasks with revisions, stats
    tau_mtl.safetensors               τ_MTL in float32 (sharded + tau_mtl.safetensors.index.json when large)
    masks/<task>.safetensors          per tensor: uint8, 8 entries per byte, row-major, big-endian bit order
                                      (numpy.packbits), last byte zero-padded; shapes in the file metadata
    values/<task>.safetensors         magnitude pruning only: the task's kept τ values, row-major, float32
    README.md, hubmerge_recipe.yaml

Task t is rebuilt as θ0 + m_t ⊙ τ_MTL (magnitude pruning: θ0 + m_t ⊙ τ_t), computed in float32.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import ModelHubMixin
from huggingface_hub import constants as hf_constants
from safetensors import safe_open

from hubmerge.distributed import Group
from hubmerge.errors import HubmergeError
from hubmerge.integrity import record_hashes, verify_files
from hubmerge.output import MANIFEST, atomic_directory, read_manifest
from hubmerge.sources import Checkpoint, resolve_source
from hubmerge.writer import (
    SafetensorsFile,
    ShardedFiles,
    Slot,
    ValueSpool,
    assemble_spooled,
    copy_support_files,
    parse_shard_size,
)

FORMAT = "hubmerge-compressed"
TASK_FORMAT = "hubmerge-task"  # a task's model rebuilt from an artifact (`hubmerge materialize`)
FORMAT_VERSION = 1
RECIPE_FILE = "hubmerge_recipe.yaml"  # the pinned recipe, in every output
VECTOR_STEM = "tau_mtl"
MASK_DIR = "masks"
VALUE_DIR = "values"
# Folder and file names of the artifact itself, which exported task subfolders must not take.
RESERVED_NAMES = (MASK_DIR, VALUE_DIR, MANIFEST, RECIPE_FILE, "README.md", "mask_agreement.png")
PACKING = "per tensor, row-major, 8 entries per byte, big-endian bit order (numpy.packbits), zero-padded"
OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> uint8 on the CPU, 8 entries per byte, first entry in the most significant bit."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `numel` entries as a flat bool tensor."""
    return torch.from_numpy(np.unpackbits(packed.cpu().numpy(), count=numel).astype(bool))


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
        rank: int = 0,
    ):
        self.directory = directory
        self._keys = list(shapes)
        shape_meta = {
            "hubmerge.shapes": json.dumps({k: list(s) for k, s in shapes.items()}),
            "hubmerge.packing": PACKING,
        }
        self._vector = (
            ShardedFiles(
                directory,
                [Slot(k, torch.float32, s) for k, s in shapes.items()],
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
            self._values = [ValueSpool(path, torch.float32, self._rank) for path in self._value_paths]
        if self._vector is not None:
            self._vector.write(key, tau_mtl.to("cpu"), start)
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
                assemble_spooled(path, torch.float32, self._keys, task_pieces)
        group.barrier()


def storage_summary(
    d: int, num_tasks: int, base_bits: float, *, shared_vector: bool, kept_values: int = 0
) -> dict[str, Any]:
    """Storage in bits: this artifact, the paper's accounting (its App. C), and T fine-tuned copies."""
    artifact = d * num_tasks + (32 * d if shared_vector else 32 * kept_values)
    return {
        "parameters": d,
        "tasks": num_tasks,
        "artifact_bits": artifact,
        "paper_bits": (64 + num_tasks) * d if shared_vector else None,
        "finetuned_fp32_bits": 32 * num_tasks * d,
        "finetuned_stored_bits": round(base_bits * num_tasks * d),
        "base_bits_per_entry": base_bits,
    }


# What an artifact consists of; exported task subfolders and anything else in the repo are not downloaded.
ARTIFACT_PATTERNS = [
    MANIFEST,
    RECIPE_FILE,
    "README.md",
    "mask_agreement.png",
    f"{VECTOR_STEM}*.safetensors",
    f"{VECTOR_STEM}.safetensors.index.json",
    f"{MASK_DIR}/*.safetensors",
    f"{VALUE_DIR}/*.safetensors",
]


class CompressedMerge(
    ModelHubMixin,
    library_name="hubmerge",
    tags=["merge", "hubmerge"],
):
    """A compressed merge (TALL masks, magnitude masking or pruning): rebuild any task's model from it.

    A `huggingface_hub.ModelHubMixin`: `from_pretrained` takes a local artifact directory or a Hub repo id,
    `save_pretrained` and `push_to_hub` write the artifact's files as they are.

    Example:
        >>> merge = CompressedMerge.from_pretrained("user/tall-masks-8tasks")
        >>> state_dict = merge.materialize("sst2")
    """

    def __init__(self, directory: Path):
        # Only a Path argument: the mixin would otherwise serialize JSON-able init arguments into config.json.
        self.directory = Path(directory)
        if not (self.directory / MANIFEST).is_file():
            raise HubmergeError(f"{self.directory}: not a hubmerge artifact (no {MANIFEST})")
        manifest = read_manifest(self.directory)
        if manifest.get("result") == "task":
            raise HubmergeError(
                f"{self.directory} is task {manifest.get('task')!r}'s model, already rebuilt from an artifact: "
                f"it loads as it is (e.g. AutoModel.from_pretrained({str(self.directory)!r}))"
            )
        if manifest.get("result") == "merged":
            raise HubmergeError(
                f"{self.directory} is a merged model ({manifest.get('method')}), not a compressed artifact: it "
                f"is complete as it is (e.g. AutoModel.from_pretrained({str(self.directory)!r})); only "
                "tall_masks and magnitude_* outputs rebuild task models"
            )
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise HubmergeError(
                f"{self.directory / MANIFEST}: unsupported format {manifest.get('format')!r} "
                f"version {manifest.get('format_version')!r}"
            )
        self.manifest = manifest
        self._verified: set[str] = set()
        self._base: Checkpoint | None = None
        self._token: str | None = None
        self._endpoint: str | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        revision: str | None = None,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        endpoint: str | None = None,
    ) -> CompressedMerge:
        """Open an artifact: a directory written by `hubmerge run`, or a Hub repo `org/name` at `revision`.

        Only the artifact's files are downloaded (not exported task subfolders). The base model is fetched on
        first use, at the commit the artifact pins, with the same `token` and `endpoint`.

        Overrides the mixin's method, which first looks for a config.json that artifacts do not have (and,
        offline, fails without it).
        """
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            endpoint=endpoint,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        endpoint: str | None = None,
        **_: Any,
    ) -> CompressedMerge:
        if Path(model_id).is_dir():
            directory = Path(model_id)
        else:
            from huggingface_hub import snapshot_download

            from hubmerge.hub import hub_errors

            with hub_errors(model_id if revision is None else f"{model_id}@{revision}", endpoint):
                directory = Path(
                    snapshot_download(
                        model_id,
                        revision=revision,
                        allow_patterns=ARTIFACT_PATTERNS,
                        cache_dir=cache_dir,
                        force_download=force_download,
                        local_files_only=local_files_only,
                        token=token,
                        endpoint=endpoint,
                    )
                )
        merge = cls(directory)
        merge._token = token if isinstance(token, str) else None
        merge._endpoint = endpoint
        return merge

    def _save_pretrained(self, save_directory: Path) -> None:
        """Copy the artifact's files (exported task subfolders are not part of it)."""
        for pattern in ARTIFACT_PATTERNS:
            for path in sorted(self.directory.glob(pattern)):
                target = save_directory / path.relative_to(self.directory)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def method(self) -> str:
        return self.manifest["method"]

    @property
    def base(self) -> Checkpoint:
        if self._base is None:
            info = self.manifest["base"]
            spec = f"{info['location']}@{info['revision']}" if info.get("revision") else info["location"]
            self._base = resolve_source(spec, token=self._token, endpoint=self._endpoint)
        return self._base

    def _task_file(self, folder: str, task: str) -> Path:
        if task not in self.tasks:
            raise HubmergeError(f"unknown task {task!r}; this artifact has: {', '.join(self.tasks)}")
        return self._checked(self.directory / folder / f"{task}.safetensors")

    def _checked(self, path: Path) -> Path:
        """`path`, a file of the artifact, once it is there and matches the hash of the run record."""
        name = path.relative_to(self.directory).as_posix()
        if name not in self._verified:
            if not path.is_file():
                raise HubmergeError(f"{path}: missing; the artifact is incomplete")
            verify_files(self.directory, self.manifest, [name])
            self._verified.add(name)
        return path

    def mask(self, task: str) -> dict[str, torch.Tensor]:
        """The task's mask m_t as bool tensors, one per merged tensor."""
        with safe_open(self._task_file(MASK_DIR, task), framework="pt") as f:
            shapes = json.loads(f.metadata()["hubmerge.shapes"])
            return {
                key: unpack_bits(f.get_tensor(key), math.prod(shape)).reshape(shape)
                for key, shape in shapes.items()
            }

    def _vector_file_of(self) -> dict[str, Path]:
        index = self.directory / f"{VECTOR_STEM}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(self._checked(index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise HubmergeError(f"{index}: malformed shard index ({err})") from None
            return {k: self._checked(self.directory / f) for k, f in weight_map.items()}
        single = self._checked(self.directory / f"{VECTOR_STEM}.safetensors")
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)

    def iter_materialized(self, task: str, dtype: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) of θ0 + m_t ⊙ τ_MTL in sorted key order, one tensor at a time."""
        masks = self.mask(task)
        dtype = dtype or self.manifest["dtype"]
        base = self.base
        missing = sorted(set(masks) - set(base.infos))
        if missing:
            raise HubmergeError(f"base {base.name} lacks tensor {missing[0]!r} of this artifact")
        own_values = self.manifest["vector"] is None
        if own_values:
            values = safe_open(self._task_file(VALUE_DIR, task), framework="pt")
        else:
            vector_files = self._vector_file_of()
            handles = {f: safe_open(f, framework="pt") for f in set(vector_files.values())}
        for key in sorted(base.infos):
            stored = base.read(key)
            if key not in masks:
                yield (
                    key,
                    stored.to(output_dtype(dtype, stored.dtype)) if stored.is_floating_point() else stored,
                )
                continue
            merged = stored.float()
            if own_values:
                flat = merged.reshape(-1).clone()
                flat[masks[key].reshape(-1)] += values.get_tensor(key)
                merged = flat.reshape(merged.shape)
            else:
                merged = merged + handles[vector_files[key]].get_tensor(key) * masks[key]
            yield key, merged.to(output_dtype(dtype, stored.dtype))

    def materialize(self, task: str, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """The full state dict of task `task`: θ0 + m_t ⊙ τ_MTL (float tensors), the base's other tensors."""
        return dict(self.iter_materialized(task, dtype))

    def save_task(
        self,
        task: str,
        output: str | Path,
        *,
        overwrite: bool = False,
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
    ) -> Path:
        """Write task `task`'s model as a directory (weights + the base's config and tokenizer files).

        Streams one tensor at a time; the directory appears only when complete. It holds a small run record
        (hubmerge.json: the artifact and task it came from, its files' hashes), so `--overwrite` may later
        replace it. The output may not be, contain or lie inside the artifact, the base or the Hub cache.
        """
        protected = [
            ("the artifact", self.directory),
            ("the base", self.base.root),
            ("the Hugging Face cache", Path(hf_constants.HF_HUB_CACHE)),
        ]
        return self._write_task(
            task,
            Path(output),
            overwrite=overwrite,
            dtype=dtype,
            max_shard_size=max_shard_size,
            protected=protected,
        )

    def export_task(self, task: str, max_shard_size: int | str = "5GB") -> Path:
        """Write task `task`'s model into the artifact's own subfolder `<task>/` (`export: subfolders`)."""
        return self._write_task(
            task,
            self.directory / task,
            overwrite=True,
            dtype=None,
            max_shard_size=max_shard_size,
            protected=[("the base", self.base.root)],
            inside=self.directory,
        )

    def _write_task(
        self,
        task: str,
        target: Path,
        *,
        overwrite: bool,
        dtype: str | None,
        max_shard_size: int | str,
        protected: list[tuple[str, Path]],
        inside: Path | None = None,
    ) -> Path:
        dtype = dtype or self.manifest["dtype"]
        if dtype != "auto" and dtype not in OUTPUT_DTYPES:
            raise HubmergeError(f"--dtype {dtype}: choose auto, {', '.join(OUTPUT_DTYPES)}")
        parse_shard_size(max_shard_size)
        self._task_file(MASK_DIR, task)
        with atomic_directory(target, overwrite, protected, inside) as staging:
            infos = self.base.infos
            slots = [
                Slot(k, output_dtype(dtype, i.dtype) if i.is_float else i.dtype, i.shape)
                for k, i in sorted(infos.items())
            ]
            files = ShardedFiles(
                staging, slots, self.base.output_shard_size(max_shard_size), stem=self.base.weights_stem
            )
            files.create()
            try:
                for key, tensor in self.iter_materialized(task, dtype):
                    files.write(key, tensor)
            finally:
                files.close()
            copy_support_files(self.base.directory, staging)
            record = {
                "format": TASK_FORMAT,
                "format_version": FORMAT_VERSION,
                "result": "task",
                "task": task,
                "method": self.method,
                "dtype": dtype,
                "artifact": {k: self.manifest.get(k) for k in ("created", "hubmerge_version", "parameters")},
                "base": self.manifest["base"],
            }
            record_hashes(staging, record)
        return target

    def agreement_histogram(self) -> list[int]:
        """hist[c] = entries contained in exactly c task masks, c = 0..T (over all counted entries)."""
        return list(self.manifest["stats"]["agreement_histogram"])
