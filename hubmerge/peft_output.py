"""`output_format: peft`: a merge of LoRA adapters written back as one LoRA adapter of rank r.

The merged update of each adapted module, α·τ_MTL (what a merged model adds to θ0), is factored by a
truncated SVD: B = U_r·√S_r, A = √S_r·V_rᵀ, with lora_alpha = r so that PEFT's scaling is 1 and B @ A is the
best rank-r approximation of the update (Eckart–Young). The share of the update's energy (Σ_{i≤r} s_i² / Σ s_i²)
kept per module is recorded in hubmerge.json. Tensors the adapters save whole (`modules_to_save`) are written
whole, as PEFT saves them. Every other tensor has τ_t = 0 for every task, so it is not read at all.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from hubmerge.adapters import PEFT_PREFIX, LoraTask
from hubmerge.errors import RecipeError

if TYPE_CHECKING:
    from hubmerge.engine import Engine
    from hubmerge.planning import MergeJob

ADAPTER_FILE = "adapter_model.safetensors"


def lora_tasks(job: MergeJob) -> list[LoraTask]:
    """The job's models, which `output_format: peft` needs to be LoRA adapters (checked before any read)."""
    recipe = job.recipe
    full = [name for name, m in zip(job.task_names, job.models, strict=True) if not isinstance(m, LoraTask)]
    if full:
        raise RecipeError(
            f"output_format: peft merges LoRA adapters; {', '.join(map(repr, full))} "
            f"{'is a full checkpoint' if len(full) == 1 else 'are full checkpoints'} (write a merged model)",
            field="output_format",
        )
    if recipe.lora_rank is None:
        raise RecipeError(
            "lora_rank: needed with output_format: peft (the merged adapter's rank)", field="lora_rank"
        )
    tasks = [m for m in job.models if isinstance(m, LoraTask)]
    for name, task in zip(job.task_names, tasks, strict=True):
        if task.layout.biases or task.config.raw.get("bias", "none") != "none":
            raise RecipeError(
                f"output_format: peft: adapter {name!r} trains biases (bias/lora_bias), which a merged LoRA "
                "adapter cannot carry; write a merged model instead",
                field="output_format",
            )
    fan_in_fan_out = {bool(t.config.raw.get("fan_in_fan_out")) for t in tasks}
    if len(fan_in_fan_out) > 1:
        raise RecipeError(
            "output_format: peft: the adapters disagree on fan_in_fan_out", field="output_format"
        )
    return tasks


@dataclass(frozen=True)
class AdaptedModule:
    """A module of the merged adapter, named as the base's module (what base_model_name_or_path loads)."""

    module: str  # the base key without `.weight`
    transposed: bool
    embedding: bool

    @property
    def a_key(self) -> str:
        return PEFT_PREFIX + self.module + (".lora_embedding_A" if self.embedding else ".lora_A.weight")

    @property
    def b_key(self) -> str:
        return PEFT_PREFIX + self.module + (".lora_embedding_B" if self.embedding else ".lora_B.weight")


def adapted_modules(tasks: list[LoraTask]) -> tuple[dict[str, AdaptedModule], list[str]]:
    """({base weight key: its module in the merged adapter}, the base keys saved whole: modules_to_save)."""
    adapted: dict[str, AdaptedModule] = {}
    whole: set[str] = set()
    for task in tasks:
        for key, lora in task.layout.modules.items():
            adapted.setdefault(
                key, AdaptedModule(key.removesuffix(".weight"), lora.transposed, lora.embedding)
            )
        whole.update(task.layout.replaced)
    return adapted, sorted(whole - set(adapted))


def adapter_overlay(job: MergeJob, directory: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a merged LoRA adapter gives its base (θ0 + B @ A, scaling 1; saved tensors as they are),
    float32, for the tensors of `base` (θ0 as an overlay)."""
    adapted, whole = adapted_modules(lora_tasks(job))
    tensors = load_file(directory / ADAPTER_FILE)
    weights = dict(base)
    for key, module in adapted.items():
        if key in weights and module.a_key in tensors:
            update = tensors[module.b_key].float() @ tensors[module.a_key].float()
            weights[key] = base[key] + (update.T if module.transposed else update).to(base[key].device)
    for key in whole:
        if key in weights and PEFT_PREFIX + key in tensors:
            weights[key] = tensors[PEFT_PREFIX + key].float().to(base[key].device)
    return weights


def factor(update: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-`rank` LoRA factors of a module's update and the share of its energy they keep.

    Args:
        update: the module's merged update in PEFT's orientation ([out, in]: B @ A), float32.
        rank: the largest rank to keep (capped at the matrix's smaller side).

    Returns:
        (A [r, in], B [out, r], Σ_{i≤r} s_i² / Σ s_i²; 1 for a zero update).
    """
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    energy = s.square()
    total = float(energy.sum())
    kept = float(energy[:r].sum()) / total if total > 0 else 1.0
    return (root[:, None] * vh[:r]).contiguous(), (u[:, :r] * root).contiguous(), kept


class PeftSink:
    """The merged LoRA adapter: adapter_model.safetensors + adapter_config.json."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.modules: dict[str, dict[str, Any]] = {}

    def write(self, directory: Path) -> list[str]:
        engine, job, stream = self.engine, self.engine.job, self.engine.stream
        tasks = lora_tasks(job)
        if engine.group.is_distributed:
            raise RecipeError("output_format: peft runs in one process (leave out --num-processes)")
        rank = job.recipe.lora_rank
        assert rank is not None
        adapted, whole = adapted_modules(tasks)
        merged = set(job.merge_keys)
        keys = sorted(k for k in (*adapted, *whole) if k in merged)
        tensors: dict[str, torch.Tensor] = {}

        def output_pass(description: str) -> None:
            for key, rows, base, thetas in stream.read_ahead(stream.pieces(description, keys, whole=True)):
                update = engine.vector_piece(key, rows, base, thetas).reshape(job.base.infos[key].shape)
                if key not in adapted:  # saved whole, as PEFT saves modules_to_save
                    tensors[PEFT_PREFIX + key] = (base.float().reshape(update.shape) + update).cpu()
                    continue
                module = adapted[key]
                a, b, kept = factor(update.T if module.transposed else update, rank)
                tensors[module.a_key], tensors[module.b_key] = a.cpu(), b.cpu()
                self.modules[module.module] = {"rank": a.shape[0], "energy": round(kept, 6)}

        output_pass("merge and factor")
        if engine.guessed_wrong():
            output_pass("merge and factor (majority sign corrected)")
        engine.sum_statistics()
        out_dtype = None if job.recipe.dtype == "auto" else getattr(torch, job.recipe.dtype)
        if out_dtype is not None:
            tensors = {k: v.to(out_dtype) for k, v in tensors.items()}
        save_file(tensors, directory / ADAPTER_FILE, metadata={"format": "pt"})
        self._write_config(directory, tasks, rank)
        engine.digests = {ADAPTER_FILE: hashlib.sha256((directory / ADAPTER_FILE).read_bytes()).hexdigest()}
        return [ADAPTER_FILE]

    def _write_config(self, directory: Path, tasks: list[LoraTask], rank: int) -> None:
        from peft import LoraConfig

        base = self.engine.job.base.provenance
        low = {module: info["rank"] for module, info in self.modules.items() if info["rank"] != rank}
        saved = sorted({m for t in tasks for m in t.config.raw.get("modules_to_save") or []})
        first = tasks[0].config.raw
        config = LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=sorted(self.modules),
            rank_pattern=low,
            alpha_pattern=dict(low),
            fan_in_fan_out=bool(first.get("fan_in_fan_out")),
            modules_to_save=saved or None,
            # a Hub base at the commit the run pinned; a local one as the recipe names it
            base_model_name_or_path=base.location if base.revision else base.source,
            revision=base.revision,
            task_type=first.get("task_type"),
            lora_dropout=0.0,
            bias="none",
        )
        config.save_pretrained(str(directory))

    def record(self) -> dict[str, Any]:
        """What hubmerge.json says of the adapter: its type, rank, the energy kept per module, and the model
        class it adapts (the base's `architectures`, for the card's usage snippet)."""
        record = {"peft_type": "LORA", "rank": self.engine.job.recipe.lora_rank, "modules": self.modules}
        model_class = base_model_class(self.engine.job.base.directory)
        if model_class is not None:
            record["model_class"] = model_class
        return record


def base_model_class(directory: Path | None) -> str | None:
    """The transformers class a base directory was saved from (config.json `architectures`), if it says."""
    config = directory / "config.json" if directory is not None else None
    if config is None or not config.is_file():
        return None
    try:
        architectures = json.loads(config.read_text()).get("architectures")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return architectures[0] if isinstance(architectures, list) and architectures else None
