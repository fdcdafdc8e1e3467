"""Reading a compressed artifact: any task's model, rebuilt tensor by tensor, as a state dict, a directory or a
ready model (`hubmerge.serving`).

Task t's model is its fine-tune's tensors: θ0 + m_t ⊙ τ_MTL on the merged ones, its own tensors (heads, ...)
as stored, the base's where the fine-tune left them unchanged; its config and tokenizer are the base's files
with the task's own on top. Artifacts written before tasks kept their own part (format version 1) rebuild
every base tensor and take the base's files.
"""

from __future__ import annotations

import fnmatch
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelHubMixin
from huggingface_hub import constants as hf_constants
from safetensors import safe_open

from hubmerge.artifacts import (
    FORMAT,
    FORMAT_VERSION,
    MASK_DIR,
    OUTPUT_DTYPES,
    RECIPE_FILE,
    TASK_FORMAT,
    VALUE_DIR,
    VECTOR_STEM,
    output_dtype,
    unpack_bits,
)
from hubmerge.errors import ArtifactFormatError, HubmergeError, SourceError
from hubmerge.hub import ADAPTER_CONFIG
from hubmerge.ia3 import ia3_base_of
from hubmerge.integrity import record_hashes, verify_files, weights_sha256
from hubmerge.output import MANIFEST, atomic_directory, read_manifest
from hubmerge.private import PRIVATE_DIR, TASK_FILES_DIR
from hubmerge.record import RunRecord
from hubmerge.sources import (
    SAFETENSORS_DTYPES,
    Checkpoint,
    SafetensorsReader,
    TensorInfo,
    resolve_source,
    support_files,
)
from hubmerge.task_reader import TaskReader
from hubmerge.writer import ShardedFiles, Slot, parse_shard_size

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
    f"{PRIVATE_DIR}/*.safetensors",
    f"{TASK_FILES_DIR}/*",
]
READABLE_VERSIONS = (1, FORMAT_VERSION)


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
        >>> model = merge.load_model("sst2")            # a ready transformers model
        >>> served = merge.switchable(device="cuda")    # one resident copy for every task
        >>> served.set_task("cola")
    """

    def __init__(self, directory: Path):
        # Only a Path argument: the mixin would otherwise serialize JSON-able init arguments into config.json.
        self.directory = Path(directory)
        manifest = self.directory / MANIFEST
        self.manifest = read_manifest(self.directory, what="artifact")
        self.record: RunRecord = RunRecord.model_validate(self.manifest)
        record = self.record
        if record.result == "task":
            raise ArtifactFormatError(
                f"{self.directory} is task {record.task!r}'s model, already rebuilt from an artifact: "
                f"it loads as it is (e.g. AutoModel.from_pretrained({str(self.directory)!r}))",
                path=manifest,
            )
        if record.result == "merged":
            raise ArtifactFormatError(
                f"{self.directory} is a merged model ({record.method}), not a compressed artifact: it "
                f"is complete as it is (e.g. AutoModel.from_pretrained({str(self.directory)!r})); only "
                "tall_masks and magnitude_* outputs rebuild task models",
                path=manifest,
            )
        if record.format != FORMAT or record.format_version not in READABLE_VERSIONS:
            raise ArtifactFormatError(
                f"{manifest}: unsupported format {record.format!r} version {record.format_version!r}",
                path=manifest,
            )
        self._verified: set[str] = set()
        self._base: Checkpoint | None = None
        self._base_spec: str | None = None  # where `base=` points instead of the recorded base
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
        for path in sorted(self.directory.rglob("*")):
            name = path.relative_to(self.directory).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in ARTIFACT_PATTERNS):
                target = save_directory / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def method(self) -> str:
        return self.manifest["method"]

    def task_record(self, task: str) -> dict[str, Any]:
        """What the run record says of task `task`; an unknown name is an error listing the tasks."""
        for record in self.manifest["tasks"]:
            if record["name"] == task:
                return record
        raise HubmergeError(f"unknown task {task!r}; this artifact has: {', '.join(self.tasks)}")

    # -- the base ---------------------------------------------------------------------------------------------

    def use_base(self, base: str | Path | None) -> None:
        """Rebuild tasks from `base` (a local path or Hub id) instead of the recorded base, e.g. a local mirror
        of it or the same base moved; None goes back to the recorded one. It is checked on first use."""
        spec = None if base is None else str(base)
        if spec != self._base_spec:
            if self._base is not None:
                self._base.close()
            self._base_spec, self._base = spec, None

    @property
    def base(self) -> Checkpoint:
        """The base, opened (headers only) and checked against the artifact on first use."""
        if self._base is None and self.is_ia3:
            self._base = ia3_base_of(self.record)  # the vectors' initialisation: nothing to fetch
        if self._base is None:
            base = resolve_source(self._base_location(), token=self._token, endpoint=self._endpoint)
            try:
                self._check_base(base)
            except HubmergeError:
                base.close()
                raise
            self._base = base
        return self._base

    @property
    def is_ia3(self) -> bool:
        """An artifact of (IA)³ vectors: its tasks are (IA)³ adapters, rebuilt from ones."""
        return self.record.adapter is not None and self.record.adapter.peft_type == "IA3"

    def _base_location(self) -> str:
        if self._base_spec is not None:
            return self._base_spec
        info = self.manifest["base"]
        if info.get("revision"):
            return f"{info['location']}@{info['revision']}"
        for candidate in (info["location"], info["source"]):
            if Path(candidate).expanduser().exists():
                return candidate
        raise SourceError(
            f"the base of this artifact, {info['source']} (a local path, at {info['location']} when it was "
            "made), is not there; point to it with base= (or --base)",
            info["source"],
            "not there",
            missing=True,
            path=info["location"],
        )

    def _check_base(self, base: Checkpoint) -> None:
        """The base must be the one the artifact was made from: its content hash (a local base's), and the
        dtype and shape of every tensor the tasks take from it."""
        recorded = self.manifest["base"].get("sha256")
        if recorded is not None and weights_sha256(base.weight_files) != recorded:
            raise SourceError(
                f"base {base.name}: not the base this artifact was made from (its weights' SHA-256 differs from "
                f"the recorded {recorded[:12]}…); pass the original base with base= (or --base)",
                base.name,
            )
        # the dtype and shape of every base tensor the tasks use (recorded since format version 2)
        expected = {k: (None, shape) for k, shape in self.mask_shapes(self.tasks[0]).items()}
        for record in self.manifest["tasks"]:
            expected.update({k: (None, None) for k in record.get("from_base", [])})
        expected.update({k: tuple(v) for k, v in self.manifest["base"].get("tensors", {}).items()})
        for key, (dtype, shape) in sorted(expected.items()):
            info = base.infos.get(key)
            if info is None:
                raise SourceError(f"base {base.name}: lacks tensor {key!r} of this artifact", base.name)
            if shape is not None and info.shape != tuple(shape):
                raise SourceError(
                    f"base {base.name}: tensor {key!r} is {list(info.shape)}, this artifact's is {list(shape)}",
                    base.name,
                )
            if dtype is not None and info.dtype != SAFETENSORS_DTYPES[dtype]:
                raise SourceError(
                    f"base {base.name}: tensor {key!r} is {info.dtype}, this artifact's base stores it as {dtype}",
                    base.name,
                )

    # -- files --------------------------------------------------------------------------------------------------

    def _task_file(self, folder: str, task: str) -> Path:
        self.task_record(task)
        return self._checked(self.directory / folder / f"{task}.safetensors")

    def _checked(self, path: Path) -> Path:
        """`path`, a file of the artifact, once it is there and matches the hash of the run record."""
        name = path.relative_to(self.directory).as_posix()
        if name not in self._verified:
            if not path.is_file():
                raise ArtifactFormatError(f"{path}: missing; the artifact is incomplete", path=path)
            verify_files(self.directory, self.manifest, [name])
            self._verified.add(name)
        return path

    def mask_shapes(self, task: str) -> dict[str, list[int]]:
        """{merged tensor: shape}, from the task's mask file's metadata, checked against its packed sizes."""
        path = self._task_file(MASK_DIR, task)
        with safe_open(path, framework="pt") as f:
            shapes = json.loads(f.metadata()["hubmerge.shapes"])
        packed = SafetensorsReader(path).infos
        for key, shape in shapes.items():
            if key not in packed or packed[key].numel != math.ceil(math.prod(shape) / 8):
                raise ArtifactFormatError(
                    f"{path}: the mask of {key!r} does not fit its shape {shape}; the artifact is damaged",
                    path=path,
                )
        return shapes

    def mask(self, task: str) -> dict[str, torch.Tensor]:
        """The task's mask m_t as bool tensors, one per merged tensor."""
        with safe_open(self._task_file(MASK_DIR, task), framework="pt") as f:
            shapes = json.loads(f.metadata()["hubmerge.shapes"])
            return {
                key: unpack_bits(f.get_tensor(key), math.prod(shape)).reshape(shape)
                for key, shape in shapes.items()
            }

    def packed_masks(self, task: str) -> dict[str, torch.Tensor]:
        """The task's mask as stored: per merged tensor, uint8 with 8 entries per byte (`pack_bits`)."""
        return SafetensorsReader(self._task_file(MASK_DIR, task)).read_all()

    def _vector_file_of(self) -> dict[str, Path]:
        index = self.directory / f"{VECTOR_STEM}.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(self._checked(index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ArtifactFormatError(f"{index}: malformed shard index ({err})", path=index) from err
            return {k: self._checked(self.directory / f) for k, f in weight_map.items()}
        single = self._checked(self.directory / f"{VECTOR_STEM}.safetensors")
        with safe_open(single, framework="pt") as f:
            return dict.fromkeys(f.keys(), single)

    def vector_readers(self) -> dict[str, SafetensorsReader]:
        """{merged tensor: the reader of the τ_MTL file that holds it}; positioned reads, not a memory map, so
        only what is read stays in memory."""
        files = self._vector_file_of()
        readers = {path: SafetensorsReader(path) for path in set(files.values())}
        shapes = self.mask_shapes(self.tasks[0])
        for key, shape in shapes.items():
            info = readers[files[key]].infos.get(key) if key in files else None
            if info is None or info.shape != tuple(shape):
                raise ArtifactFormatError(
                    f"{files.get(key, VECTOR_STEM)}: τ_MTL of {key!r} is "
                    f"{'missing' if info is None else list(info.shape)}, its mask's shape is {shape}; the artifact is damaged",
                    path=files.get(key, self.directory / f"{VECTOR_STEM}.safetensors"),
                )
        return {key: readers[path] for key, path in files.items()}

    def values(self, task: str) -> dict[str, torch.Tensor]:
        """Magnitude pruning: the task's kept τ values per merged tensor, in the mask's row-major order."""
        return SafetensorsReader(self._task_file(VALUE_DIR, task)).read_all()

    def _private_file(self, task: str) -> Path | None:
        private = self.task_record(task).get("private")
        return None if private is None else self._checked(self.directory / private["file"])

    def private_tensors(self, task: str) -> dict[str, torch.Tensor]:
        """The task's own tensors (heads, tensors the recipe excluded that its training changed), as stored."""
        path = self._private_file(task)
        return {} if path is None else SafetensorsReader(path).read_all()

    def task_files(self, task: str) -> dict[str, Path]:
        """{relative name: file} of the task model's config, tokenizer and generation files: the base's, with
        the task's own (`tasks/<task>/`) on top."""
        record = self.task_record(task)
        files = {}
        if self.base.directory is not None:
            files = {rel.as_posix(): self.base.directory / rel for rel in support_files(self.base.directory)}
        for rel in record.get("files", []):
            files[rel] = self._checked(self.directory / TASK_FILES_DIR / task / rel)
        if self.is_ia3:
            files[ADAPTER_CONFIG] = self._checked(self.directory / ADAPTER_CONFIG)
        return files

    # -- task models ----------------------------------------------------------------------------------------------

    def _legacy(self, task: str) -> bool:
        """An artifact from before tasks kept their own part: every base tensor, the base's dtypes."""
        return "from_base" not in self.task_record(task)

    def task_infos(self, task: str, dtype: str | None = None) -> dict[str, TensorInfo]:
        """Shape and output dtype of every tensor of task `task`'s model (sorted keys), reading headers only.

        Args:
            task: a task of the artifact.
            dtype: `auto` (each tensor's own, the fine-tune's for merged ones), float32, bfloat16 or float16;
                default: the recipe's.
        """
        dtype = self._dtype(dtype)
        base, record = self.base, self.task_record(task)
        merged = self.mask_shapes(task)
        if self._legacy(task):
            stored = dict(base.infos)
        else:
            stored = {k: base.infos[k] for k in [*merged, *record["from_base"]]}
            for key, name in record["merged_dtypes"].items():
                stored[key] = TensorInfo(base.infos[key].shape, SAFETENSORS_DTYPES[name])
            path = self._private_file(task)
            if path is not None:
                stored.update(SafetensorsReader(path).infos)
        return {
            key: TensorInfo(info.shape, output_dtype(dtype, info.dtype) if info.is_float else info.dtype)
            for key, info in sorted(stored.items())
        }

    def _dtype(self, dtype: str | None) -> str:
        dtype = dtype or self.manifest["dtype"]
        if dtype != "auto" and dtype not in OUTPUT_DTYPES:
            raise HubmergeError(f"dtype {dtype}: choose auto, {', '.join(OUTPUT_DTYPES)}")
        return dtype

    def iter_materialized(self, task: str, dtype: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) of task `task`'s model in sorted key order, one tensor at a time (its mask, τ_MTL
        and own tensors are read tensor by tensor too); merged tensors are θ0 + m_t ⊙ τ_MTL computed in
        float32, then stored in `dtype` (see `task_infos`)."""
        reader = TaskReader(self, task, dtype)
        for key in reader.infos:
            yield key, reader.read(key)

    def materialize(self, task: str, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """The full state dict of task `task`'s model (see `iter_materialized`)."""
        return dict(self.iter_materialized(task, dtype))

    def load_model(
        self,
        task: str,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model_class: type | None = None,
        base: str | Path | None = None,
    ) -> torch.nn.Module:
        """Task `task`'s model, ready: built empty, filled tensor by tensor, in eval mode on `device`.

        Args:
            task: a task of the artifact.
            device: where the weights go (default: the CPU).
            dtype: every weight's dtype (default: each as rebuilt, see `task_infos`: the fine-tune's, where
                `from_pretrained` would give its `dtype` default); for open_clip, like its `pure_*` precisions.
            model_class: a transformers class (an Auto class or a concrete one); default: the class the task's
                config names in `architectures`. open_clip artifacts build open_clip models.
            base: the base to rebuild from instead of the recorded one (a moved or mirrored copy; checked), for
                this and later calls (`use_base`).
        """
        from hubmerge.serving import load_task_model

        if base is not None:
            self.use_base(base)
        return load_task_model(self, task, device=device, dtype=dtype, model_class=model_class)

    def switchable(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        model_class: type | None = None,
        base: str | Path | None = None,
    ) -> torch.nn.Module:
        """One model for every task: `.set_task(name)` rewrites its merged tensors (and heads, label maps) in
        place from θ0, τ_MTL and the packed masks kept in memory (on `device`), reading no file. The model
        starts as the first task. Arguments as for `load_model`."""
        from hubmerge.serving import switchable_model

        if base is not None:
            self.use_base(base)
        return switchable_model(self, device=device, dtype=dtype, model_class=model_class)

    def save_task(
        self,
        task: str,
        output: str | Path,
        *,
        overwrite: bool = False,
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
        base: str | Path | None = None,
    ) -> Path:
        """Write task `task`'s model as a directory (weights + the task's config and tokenizer files).

        Streams one tensor at a time; the directory appears only when complete. It holds a small run record
        (hubmerge.json: the artifact and task it came from, its files' hashes), so `--overwrite` may later
        replace it. The output may not be, contain or lie inside the artifact, the base or the Hub cache.
        """
        if base is not None:
            self.use_base(base)
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
        dtype = self._dtype(dtype)
        parse_shard_size(max_shard_size)
        infos = self.task_infos(task, dtype)
        files_of_task = self.task_files(task)
        with atomic_directory(target, overwrite, protected, inside) as staging:
            files = ShardedFiles(
                staging,
                [Slot(k, info.dtype, info.shape) for k, info in infos.items()],
                self.base.output_shard_size(max_shard_size),
                stem=self.base.weights_stem,
            )
            files.create()
            try:
                for key, tensor in self.iter_materialized(task, dtype):
                    files.write(key, tensor)
            finally:
                files.close()
            for rel, source in files_of_task.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, staging / rel)
            record = {
                "format": TASK_FORMAT,
                "format_version": FORMAT_VERSION,
                "result": "task",
                "task": task,
                "method": self.method,
                "dtype": dtype,
                "artifact": {k: self.manifest.get(k) for k in ("created", "hubmerge_version", "parameters")},
                "base": self.manifest["base"] if self._base_spec is None else self.base.provenance.as_dict(),
            }
            record_hashes(staging, record, files.digests())
        return target

    def agreement_histogram(self) -> list[int]:
        """hist[c] = entries contained in exactly c task masks, c = 0..T (over all counted entries)."""
        return list(self.manifest["stats"]["agreement_histogram"])
