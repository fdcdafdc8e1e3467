"""(IA)³ adapters, merged in adapter space (the paper's Table 6 setting).

An (IA)³ adapter holds one vector l per adapted module, which scales the module's output (W ↦ diag(l)·W) or,
for feed-forward modules, its input (W ↦ W·diag(l)). Its "base" is the vectors' initialisation, ones, so
τ_t = l_t − 1 and a merge gives l = 1 + α·τ_MTL: an (IA)³ adapter again, or a compressed artifact of the
vectors. For Task Arithmetic this is the same model as merging the tasks' weights (diag(1 + α·Σ τ_t)·W =
W + α·Σ diag(τ_t)·W). For every method that selects entries (TIES trimming and sign election, TALL and
consensus masks, DARE) it is not: they act on one entry per channel of the vector, where a weight-space merge
of the models diag(l_t)·W would act on every weight, with magnitudes |τ_t,i·W_ij| that depend on W.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hubmerge.adapters import ADAPTER_CONFIG, AdapterConfig, is_adapter, read_adapter_config
from hubmerge.errors import SourceError
from hubmerge.sources import Checkpoint, Provenance, Rows, TensorInfo

if TYPE_CHECKING:
    from hubmerge.record import RunRecord

ADAPTER_STEM = "adapter_model"
IA3_SUFFIX = ".ia3_l"


class Ia3Base(Checkpoint):
    """θ0 of a merge in (IA)³ space: every vector's initialisation (ones). Its provenance is the model the
    adapters adapt, which is never read."""

    def __init__(self, provenance: Provenance, infos: dict[str, TensorInfo]):
        super().__init__(provenance=provenance, root=Path(provenance.location), weight_files=[], infos=infos)

    @property
    def directory(self) -> Path | None:
        return None  # no config or tokenizer files: the output is an adapter, not a model

    @property
    def weights_stem(self) -> str:
        return ADAPTER_STEM

    def output_shard_size(self, requested: int | str) -> int | str | None:
        return None  # PEFT loads one adapter_model.safetensors

    def read(self, key: str, rows: Rows = None, pin_memory: bool = False) -> torch.Tensor:
        info = self.infos[key]
        shape = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
        return torch.ones(shape, dtype=info.dtype)


def ia3_configs(
    names: list[str], models: list[Checkpoint], kinds: list[str | None]
) -> list[AdapterConfig] | None:
    """The adapter configs when the models are (IA)³ adapters (None when none is); raises when only some
    are, when they adapt different modules, or when they save other tensors than their vectors."""
    configs = [
        read_adapter_config(m.directory or m.root, m.name) if is_adapter(m, kind) else None
        for m, kind in zip(models, kinds, strict=True)
    ]
    ia3 = [c is not None and c.peft_type == "IA3" for c in configs]
    if not any(ia3):
        return None
    if not all(ia3):
        other = next(n for n, is_ia3 in zip(names, ia3, strict=True) if not is_ia3)
        raise SourceError(
            f"model {other!r} is not an (IA)³ adapter: (IA)³ adapters are merged in adapter space, so every "
            "model of the recipe must be one",
            other,
        )
    first = models[0]
    for name, model in zip(names, models, strict=True):
        other = sorted(k for k in model.infos if not k.endswith(IA3_SUFFIX))
        if other:
            # θ0 of a saved head is the base model's, which a merge in adapter space does not read
            raise SourceError(
                f"model {name!r}: not supported: (IA)³ adapters that save other tensors than their vectors "
                f"({other[0]}{f' and {len(other) - 1} more' if len(other) > 1 else ''}: modules_to_save)",
                model.name,
            )
        if model.infos.keys() != first.infos.keys() or any(
            model.infos[k].shape != first.infos[k].shape for k in first.infos
        ):
            differing = sorted(set(model.infos) ^ set(first.infos)) or [
                k for k in first.infos if model.infos[k].shape != first.infos[k].shape
            ]
            raise SourceError(
                f"(IA)³ adapters {names[0]!r} and {name!r} adapt different modules (first difference: "
                f"{differing[0]}); merge adapters of the same target_modules",
                model.name,
            )
    return [c for c in configs if c is not None]


def ia3_base(provenance: Provenance, first: Checkpoint) -> Ia3Base:
    """θ0 (ones, float32) for the vectors of `first`, an (IA)³ adapter of the model `provenance` names."""
    return Ia3Base(provenance, {k: TensorInfo(info.shape, torch.float32) for k, info in first.infos.items()})


def write_ia3_config(directory: Path, model: Checkpoint, base: Provenance) -> dict[str, str]:
    """The merged adapter's config, the first adapter's pointed at the base (a Hub base at the commit the run
    pinned, a local one as the recipe names it); returns what the run record says of the adapter."""
    raw = dict(read_adapter_config(model.directory or model.root, model.name).raw)
    raw["base_model_name_or_path"] = base.location if base.revision else base.source
    raw["revision"] = base.revision
    raw["inference_mode"] = True
    (directory / ADAPTER_CONFIG).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return {"peft_type": "IA3"}


def ia3_base_of(record: RunRecord) -> Ia3Base:
    """θ0 of an artifact of (IA)³ vectors, from the shapes its run record keeps."""
    tensors = record.base.tensors or {}
    infos = {key: TensorInfo(tuple(shape), torch.float32) for key, (_, shape) in tensors.items()}
    return Ia3Base(Provenance(record.base.source, record.base.location, record.base.revision), infos)
