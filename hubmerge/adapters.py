"""PEFT adapters as task models: a LoRA adapter reads as the fine-tuned model it stands for.

A LoRA task's tensor is θ_t = θ0 + ΔW, formed piece by piece when the engine reads it (never the whole
model's ΔW at once), with ΔW = transpose(B @ A, fan_in_fan_out) · scaling as PEFT's `get_delta_weight` forms
it, in float32. For a float32 base and a tensor read whole (up to the engine's piece size, 2^21 entries by
default) that is the weight `PeftModel.merge_and_unload()` gives, bit for bit; a tensor read in row pieces gets
the products of those rows, which BLAS may round a few float32 ulps of ΔW differently from the whole product.
For a bfloat16/float16 base θ_t stays float32 (PEFT would round it back to the base's dtype, losing most of a
small ΔW). Weights the
adapter does not touch read as the base's, so their τ_t is exactly 0; tensors it saves whole
(`modules_to_save`, trained biases) replace the base's.

(IA)³ adapters are merged in adapter space instead (`hubmerge.ia3`): their vectors scale activations, so a
weight-space ΔW would not be low-rank nor additive across tasks.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hubmerge.errors import RecipeError, SourceError
from hubmerge.hub import ADAPTER_CONFIG
from hubmerge.sources import Checkpoint, Rows, TensorInfo

if TYPE_CHECKING:
    from hubmerge.recipe import Recipe

log = logging.getLogger("hubmerge")

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT saves every tensor under the PeftModel's attribute path to the wrapped model.
PEFT_PREFIX = "base_model.model."
SUPPORTED_TYPES = ("LORA", "IA3")
# LoRA variants whose merge is not transpose(B @ A) · scaling (or that add tensors that are not weights).
UNSUPPORTED_LORA_OPTIONS = {
    "use_dora": "DoRA (use_dora: true)",
    "layer_replication": "LoRA with layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_qalora": "QALoRA (use_qalora: true)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
}
# Initialisations after which PEFT rewrites the base weight (W − B0·A0, or a quantised W) when loading.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "lora-ga")
LORA_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_embedding_A": "A",
    ".lora_embedding_B": "B",
    ".lora_B.bias": "bias",
}


@dataclass(frozen=True)
class AdapterConfig:
    """What hubmerge needs of an `adapter_config.json`."""

    peft_type: str
    raw: dict[str, Any]

    @property
    def base_model(self) -> str | None:
        base = self.raw.get("base_model_name_or_path")
        return base if isinstance(base, str) and base else None

    @property
    def base_spec(self) -> str | None:
        """The base as a recipe source: `org/name@revision` when the adapter records its base's revision."""
        revision = self.raw.get("revision")
        if self.base_model is None:
            return None
        return f"{self.base_model}@{revision}" if isinstance(revision, str) and revision else self.base_model


def is_adapter_directory(path: Path) -> bool:
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def is_adapter(ckpt: Checkpoint, kind: str | None) -> bool:
    """Whether an opened source is a PEFT adapter: as the recipe's `kind` says, else from its files."""
    if kind is not None:
        return kind == "adapter"
    return ckpt.directory is not None and is_adapter_directory(ckpt.directory)


def read_adapter_config(directory: Path, name: str, require_weights: bool = True) -> AdapterConfig:
    """The adapter config of a PEFT adapter directory, checked for a type hubmerge merges exactly.

    Args:
        directory: holds adapter_config.json and adapter_model.safetensors (or .bin).
        name: the source as the recipe names it, for errors.
        require_weights: check that the adapter's weights are beside its config.
    """
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise SourceError(f"{name}: not a PEFT adapter (no {ADAPTER_CONFIG} in {directory})", path=directory)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SourceError(f"{path}: not valid JSON ({err})", path=path) from err
    if not isinstance(raw, dict):
        raise SourceError(f"{path}: expected a JSON object", path=path)
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type not in SUPPORTED_TYPES:
        shown = raw.get("peft_type") or "no peft_type"
        raise SourceError(
            f"{name}: not supported: {shown} adapters (hubmerge merges LORA and IA3 adapters)", path=path
        )
    if peft_type == "LORA":
        for option, what in UNSUPPORTED_LORA_OPTIONS.items():
            if raw.get(option):
                raise SourceError(f"{name}: not supported: {what}", path=path)
        init = raw.get("init_lora_weights")
        if raw.get("loftq_config") or (
            isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS)
        ):
            raise SourceError(
                f"{name}: not supported: LoRA initialised with {init!r}, which changes the base weights too "
                "(convert it to plain LoRA with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...))",
                path=path,
            )
    if require_weights and not any((directory / f).is_file() for f in ADAPTER_WEIGHTS):
        raise SourceError(
            f"{name}: adapter weights missing: {directory} has {ADAPTER_CONFIG} but no "
            f"{' or '.join(ADAPTER_WEIGHTS)}",
            path=directory,
        )
    return AdapterConfig(peft_type=peft_type, raw=raw)


def module_key(adapter_key: str) -> str:
    """An adapter tensor's name within the wrapped model (PEFT's prefix removed)."""
    return adapter_key[len(PEFT_PREFIX) :] if adapter_key.startswith(PEFT_PREFIX) else adapter_key


@dataclass
class LoraModule:
    """One LoRA-adapted module: ΔW = transpose(B @ A, transposed) · scaling."""

    a_key: str
    b_key: str
    scaling: float
    transposed: bool
    embedding: bool  # saved as lora_embedding_A/B (PEFT's Embedding layer)
    bias_key: str | None = None  # lora_bias: the module's bias gains lora_B.bias · scaling


@dataclass
class LoraLayout:
    """Which base tensors an adapter changes, and how."""

    modules: dict[str, LoraModule] = field(default_factory=dict)  # base weight key → its LoRA
    biases: dict[str, LoraModule] = field(default_factory=dict)  # base bias key → the LoRA with lora_bias
    # base (or own) key → adapter key of a tensor saved whole: modules_to_save, trained biases, and the base
    # weight of an adapted embedding layer (PEFT saves those whole, and loads ΔW on top of the saved weight)
    replaced: dict[str, str] = field(default_factory=dict)


def _pattern_value(patterns: Any, module: str, default: Any) -> Any:
    """PEFT's per-module `rank_pattern`/`alpha_pattern` lookup, by PEFT's own matching rule."""
    if not isinstance(patterns, dict) or not patterns:
        return default
    from peft.utils.other import get_pattern_key

    return patterns.get(get_pattern_key(list(patterns), module), default)


def _key_mappings(
    updates: dict[str, tuple[int, int]], base_infos: dict[str, TensorInfo]
) -> list[tuple[str, str]]:
    """Every (prefix to remove, prefix to add) that puts each adapted module's weight among the base's keys,
    with the shape of its update.

    An adapter made on `BertForSequenceClassification` names `bert.encoder...`, a `BertModel` checkpoint
    `encoder...` (and the other way round).
    """
    modules = sorted(updates)
    firsts = sorted({k.split(".", 1)[0] + "." for k in base_infos if "." in k})
    candidates = [("", "")]
    candidates += [(m.split(".", 1)[0] + ".", "") for m in modules[:1] if "." in m]
    candidates += [("", prefix) for prefix in firsts]
    return [
        (remove, add)
        for remove, add in dict.fromkeys(candidates)
        if all(
            (info := base_infos.get(add + m.removeprefix(remove) + ".weight")) is not None
            and info.shape == updates[m]
            for m in modules
        )
    ]


def _update_shape(name: str, module: str, a: TensorInfo, b: TensorInfo, transposed: bool) -> tuple[int, int]:
    """The shape of a module's ΔW as the base stores it."""
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise SourceError(f"{name}: not supported: LoRA on a convolution ({module})", name)
    if b.shape[1] != a.shape[0]:
        raise SourceError(
            f"{name}: module {module}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}", name
        )
    return (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])


def _no_mapping_error(
    name: str, updates: dict[str, tuple[int, int]], base_infos: dict[str, TensorInfo]
) -> str:
    """Why no prefix mapping puts the adapter on this base: a missing weight or a shape."""
    for module, shape in sorted(updates.items()):
        info = base_infos.get(module + ".weight")
        if info is None:
            return (
                f"adapted module {module} has no weight {module}.weight in the base (nor under another model "
                "prefix): is it an adapter of this base?"
            )
        if info.shape != shape:
            hint = "" if shape[::-1] != info.shape else " (a Conv1D layer needs fan_in_fan_out: true)"
            return f"module {module}: its LoRA gives a {list(shape)} update, the base's is {list(info.shape)}{hint}"
    return "its modules match the base under no single model prefix"


def lora_layout(
    name: str, config: AdapterConfig, adapter_infos: dict[str, TensorInfo], base_infos: dict[str, TensorInfo]
) -> LoraLayout:
    """Match an adapter's tensors to the base's and check their shapes.

    Args:
        name: the source as the recipe names it, for errors.
        config: its adapter config.
        adapter_infos: the adapter file's tensors.
        base_infos: the base checkpoint's tensors.
    """
    raw = config.raw
    parts: dict[str, dict[str, str]] = {}
    whole: list[str] = []
    for key in adapter_infos:
        inner = module_key(key)
        if "lora_magnitude_vector" in inner:
            raise SourceError(f"{name}: not supported: DoRA (tensor {key})", name)
        if ".original_module." in inner or ".modules_to_save." in inner:
            continue  # PEFT's wrapper copies of a module it also saves under the module's own name
        for suffix, part in LORA_SUFFIXES.items():
            if inner.endswith(suffix):
                parts.setdefault(inner[: -len(suffix)], {})[part] = key
                break
        else:
            whole.append(key)
    for module, found in sorted(parts.items()):
        if "A" not in found or "B" not in found:
            lacking = "lora_B" if "A" in found else "lora_A"
            raise SourceError(f"{name}: adapter weights missing: {lacking} of module {module}", name)
    embedding = {m: found["A"].endswith("lora_embedding_A") for m, found in parts.items()}
    transposed = {m: embedding[m] or bool(raw.get("fan_in_fan_out")) for m in parts}
    updates = {
        m: _update_shape(name, m, adapter_infos[f["A"]], adapter_infos[f["B"]], transposed[m])
        for m, f in parts.items()
    }
    mappings = _key_mappings(updates, base_infos)
    if not mappings:
        raise SourceError(f"{name}: {_no_mapping_error(name, updates, base_infos)}", name)
    if len(mappings) > 1:
        shown = " and ".join(
            f"'{add}{next(iter(sorted(updates))).removeprefix(remove)}'" for remove, add in mappings
        )
        raise SourceError(
            f"{name}: ambiguous: its modules fit the base as {shown}; merge one part with `include:`", name
        )
    remove, add = mappings[0]

    def base_key(inner: str) -> str:
        return add + inner.removeprefix(remove)

    layout = LoraLayout()
    for module, found in sorted(parts.items()):
        # PEFT's defaults (LoraConfig) where a config leaves them out
        rank = _pattern_value(raw.get("rank_pattern"), module, raw.get("r", 8))
        alpha = _pattern_value(raw.get("alpha_pattern"), module, raw.get("lora_alpha", 8))
        if rank != adapter_infos[found["A"]].shape[0]:
            raise SourceError(
                f"{name}: module {module}: the config gives rank {rank}, but lora_A is "
                f"{list(adapter_infos[found['A']].shape)}",
                name,
            )
        scaling = alpha / math.sqrt(rank) if raw.get("use_rslora") else alpha / rank
        lora = LoraModule(
            found["A"], found["B"], scaling, transposed[module], embedding[module], found.get("bias")
        )
        layout.modules[base_key(module) + ".weight"] = lora
        if lora.bias_key is not None:
            bias = base_key(module) + ".bias"
            if bias not in base_infos:
                raise SourceError(f"{name}: module {module} has lora_bias, but the base has no {bias}", name)
            layout.biases[bias] = lora
    for key in whole:
        # `base_layer.` names what PEFT saves of an adapted module itself (its bias, an embedding's weight)
        inner = module_key(key).replace(".base_layer.", ".")
        mapped = base_key(inner) if base_key(inner) in base_infos else inner
        layout.replaced[mapped] = key
    return layout


class SharedBasePieces:
    """The last base piece read, shared by a job's LoRA tasks: the engine reads θ0 and every θ_t of one
    piece in a row, so the T tasks read θ0 once between them (the engine's own read of θ0 is the other)."""

    def __init__(self, base: Checkpoint):
        self.base = base
        self._lock = threading.Lock()
        self._last: tuple[str, Rows, torch.Tensor] | None = None

    def read(self, key: str, rows: Rows) -> torch.Tensor:
        with self._lock:
            if self._last is None or self._last[:2] != (key, rows):
                self._last = (key, rows, self.base.read(key, rows))
            return self._last[2]


class LoraTask(Checkpoint):
    """A LoRA adapter read as the fine-tuned model it stands for (see the module docstring)."""

    def __init__(self, adapter: Checkpoint, config: AdapterConfig, base: SharedBasePieces):
        layout = lora_layout(adapter.name, config, adapter.infos, base.base.infos)
        infos = dict(base.base.infos)
        for key, stored in layout.replaced.items():
            infos[key] = adapter.infos[stored]
        for key in (*layout.modules, *layout.biases):
            infos[key] = TensorInfo(infos[key].shape, torch.float32)
        super().__init__(
            provenance=adapter.provenance,
            root=adapter.root,
            weight_files=adapter.weight_files,
            infos=infos,
            card_metadata=adapter.card_metadata,
        )
        self.adapter = adapter
        self.config = config
        self.layout = layout
        self.shared_base = base

    @property
    def stored_bytes(self) -> int:
        """What the task takes on disk: its adapter file, not the model it stands for."""
        return self.adapter.weight_bytes

    def read(self, key: str, rows: Rows = None, pin_memory: bool = False) -> torch.Tensor:
        layout = self.layout
        saved = layout.replaced.get(key)
        if key in layout.modules or key in layout.biases:
            start = self.adapter.read(saved, rows) if saved else self.shared_base.read(key, rows)
            if key in layout.modules:
                return start.float() + self._delta(layout.modules[key], rows)
            lora = layout.biases[key]
            assert lora.bias_key is not None
            bias = self.adapter.read(lora.bias_key).float()
            bias = bias if rows is None else bias[rows[0] : rows[1]]
            return start.float() + bias * lora.scaling
        if saved is not None:
            return self.adapter.read(saved, rows, pin_memory)
        return self.shared_base.read(key, rows)  # untouched: θ_t = θ0, one read shared by the tasks

    def _delta(self, lora: LoraModule, rows: Rows) -> torch.Tensor:
        """Rows [start, stop) of transpose(B @ A) · scaling, each entry the dot product PEFT forms."""
        a = self.adapter.read(lora.a_key).float()
        if lora.transposed:
            b = self.adapter.read(lora.b_key).float()
            a = a if rows is None else a[:, rows[0] : rows[1]]
            return (b @ a).T * lora.scaling
        b = self.adapter.read(lora.b_key, rows).float()
        return (b @ a) * lora.scaling

    def close(self) -> None:
        self.adapter.close()
        super().close()


def source_adapter_config(
    spec: str, kind: str | None, *, token: str | None = None, endpoint: str | None = None
) -> AdapterConfig | None:
    """The adapter config of a recipe source, or None for a full checkpoint; reads the config file only."""
    from hubmerge.hub import HubSource, download_file
    from hubmerge.sources import locate_source

    if kind == "checkpoint":
        return None
    where = locate_source(spec, token=token, endpoint=endpoint)
    if isinstance(where, HubSource):
        config = download_file(where, ADAPTER_CONFIG, token=token, endpoint=endpoint)
        if config is None:
            return _not_an_adapter(spec, kind, where.repo_id)
        return read_adapter_config(config.parent, spec, require_weights=False)
    if not is_adapter_directory(where):
        return _not_an_adapter(spec, kind, where)
    return read_adapter_config(where, spec)


def _not_an_adapter(spec: str, kind: str | None, where: object) -> None:
    if kind == "adapter":
        raise SourceError(f"{spec}: kind: adapter, but {where} has no {ADAPTER_CONFIG}", spec)
    return None


def with_base(recipe: Recipe, *, token: str | None = None, endpoint: str | None = None) -> Recipe:
    """The recipe with its base: as written, or, when it has none, the base every adapter's config names
    (`base_model_name_or_path`, at the config's `revision` when it records one)."""
    if recipe.base is not None:
        return recipe
    bases: dict[str, list[str]] = {}
    for name, entry in zip(recipe.task_names, recipe.entries, strict=True):
        config = source_adapter_config(entry.source, entry.kind, token=token, endpoint=endpoint)
        if config is None:
            raise RecipeError(
                f"base: missing, and model {name!r} ({entry.source}) is a full checkpoint: give `base:` "
                "(it may be omitted only when every model is a PEFT adapter)",
                field="base",
            )
        if config.base_spec is None:
            raise RecipeError(
                f"base: missing, and adapter {name!r} ({entry.source}) names no base_model_name_or_path: "
                "give `base:`",
                field="base",
            )
        bases.setdefault(config.base_spec, []).append(name)
    if len(bases) > 1:
        listed = "; ".join(f"{base} ({', '.join(names)})" for base, names in bases.items())
        raise RecipeError(
            f"base: missing, and the adapters name different bases: {listed}; give `base:` to merge them "
            "onto one",
            field="base",
        )
    return recipe.model_copy(update={"base": next(iter(bases))})


def same_base(named: str, base: str) -> bool:
    """Whether an adapter's recorded base is the recipe's base: the same Hub repo (any revision) or the same
    local directory."""
    from hubmerge.recipe import is_hub_id, split_revision

    if is_hub_id(named) and is_hub_id(base):
        return split_revision(named)[0] == split_revision(base)[0]
    if is_hub_id(named) or is_hub_id(base):
        return False
    return Path(named).expanduser().resolve() == Path(base).expanduser().resolve()


def task_models(recipe: Recipe, opened: dict[str, Checkpoint], base: Checkpoint) -> dict[str, Checkpoint]:
    """The recipe's models (those whose source is `opened`) by task name, as the engine reads them: full
    checkpoints as they are, LoRA adapters as the fine-tuned models they stand for. An adapter of another base
    than the recipe's is merged with a warning (the recipe named its base explicitly)."""
    assert recipe.base is not None
    shared = SharedBasePieces(base)
    models: dict[str, Checkpoint] = {}
    for name, entry in zip(recipe.task_names, recipe.entries, strict=True):
        if entry.source not in opened:
            continue
        ckpt = opened[entry.source]
        if not is_adapter(ckpt, entry.kind):
            models[name] = ckpt
            continue
        config = read_adapter_config(ckpt.directory or ckpt.root, entry.source)
        if config.peft_type != "LORA":
            raise SourceError(
                f"model {name!r}: {config.peft_type} adapters are merged in adapter space, not onto a base "
                "model: every model of the recipe must then be one",
                entry.source,
            )
        if config.base_model is not None and not same_base(config.base_model, recipe.base):
            log.warning(
                "model %r: adapter of %s, merged onto the recipe's base %s",
                name,
                config.base_model,
                recipe.base,
            )
        models[name] = LoraTask(ckpt, config, shared)
    return models
