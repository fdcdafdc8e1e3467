"""Ready models from a compressed artifact: one task loaded (`load_task_model`), or one resident copy that serves
every task by rewriting its merged tensors in place (`switchable_model`).

A model is built empty on the meta device (Accelerate's `init_empty_weights`) and filled tensor by tensor as the
artifact rebuilds them, so loading holds one model plus one tensor, never a state dict beside the model.

Switching keeps θ0, τ_MTL and every task's bit-packed mask of the merged tensors resident (on the model's
device), plus each task's own tensors (heads) and the config values that differ between tasks (label maps).
`set_task` rebuilds each merged tensor piece by piece into the parameter's own storage, with the same float32
arithmetic and the same casts as `load_task_model`, so a switched model equals the loaded one bit for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hubmerge.artifacts import OUTPUT_DTYPES, rebuild_packed_into, rebuild_sparse, unpack_bits_on
from hubmerge.compressed import CompressedMerge
from hubmerge.errors import HubmergeError
from hubmerge.hub import OPEN_CLIP_CONFIG
from hubmerge.sources import TensorInfo
from hubmerge.task_reader import TaskReader


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """`float32`/`bfloat16`/`float16` or a torch dtype; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in OUTPUT_DTYPES:
        raise HubmergeError(f"dtype {dtype!r}: choose {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[dtype]


# -- building the model ----------------------------------------------------------------------------------------


def _default_dtype(infos: dict[str, TensorInfo]) -> torch.dtype:
    """The dtype most float entries of a task model have: the model is created in it, like `from_pretrained`."""
    counts: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.is_float:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _empty_model(files: dict[str, Path], model_class: type | None, dtype: torch.dtype, task: str) -> Any:
    """The task's model on the meta device (buffers real), from its config."""
    from accelerate import init_empty_weights

    if OPEN_CLIP_CONFIG in files:
        if model_class is not None:
            raise HubmergeError(
                f"task {task!r} is an open_clip model; model_class= chooses among transformers classes"
            )
        return _empty_open_clip(files[OPEN_CLIP_CONFIG], dtype, task)
    import transformers
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    if "config.json" not in files:
        raise HubmergeError(
            f"task {task!r}: no config.json in the artifact or its base; cannot build a model"
        )
    config = transformers.AutoConfig.from_pretrained(files["config.json"].parent)
    if model_class is None:
        names = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, names[0], None) if names else transformers.AutoModel
        if model_class is None:
            raise HubmergeError(
                f"task {task!r}: transformers has no class {names[0]!r} (its config's architectures); "
                "pass model_class="
            )
    with init_empty_weights():
        if issubclass(model_class, _BaseAutoModelClass):
            return model_class.from_config(config, dtype=dtype)
        return model_class._from_config(config, dtype=dtype)


def _empty_open_clip(config_file: Path, dtype: torch.dtype, task: str) -> Any:
    """The model open_clip's factory (`create_model("local-dir:...")`) builds from the config's `model_cfg`, on
    the meta device with its buffers in `dtype`.

    As the factory does for a full checkpoint: CLIP, CustomTextCLIP (`custom_text`, or a Hugging Face text tower)
    or CoCa (custom text with a `multimodal_cfg`), no pretrained tower weights fetched (timm, Hugging Face), and
    the preprocessing config (`preprocess_cfg` over open_clip's defaults, the vision tower's image size) set on
    the model. Every weight is loaded in one dtype, like open_clip's `pure_*` precisions: no mixed-precision
    cast dtype, the model built in float32 and its buffers cast after (as `model.to(dtype)` does)."""
    import json

    from accelerate import init_empty_weights

    try:
        import open_clip
        from open_clip.transform import PreprocessCfg, merge_preprocess_dict
    except ImportError as err:
        raise HubmergeError(
            f"task {task!r} is an open_clip model; install the clip extra: pip install 'hubmerge[clip]'"
        ) from err
    config = json.loads(config_file.read_text())
    model_cfg = copy.deepcopy(config["model_cfg"])
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    hf_text = "hf_model_name" in text_cfg
    if hf_text:
        text_cfg["hf_model_pretrained"] = False
    if model_cfg.pop("custom_text", False) or hf_text:
        model_class = open_clip.CoCa if "multimodal_cfg" in model_cfg else open_clip.CustomTextCLIP
    else:
        model_class = open_clip.CLIP
    with init_empty_weights():
        model = model_class(**model_cfg)
    model.to(dtype)
    preprocess = merge_preprocess_dict(PreprocessCfg(), config.get("preprocess_cfg", {}))
    image_size = getattr(getattr(model, "visual", None), "image_size", None)
    if image_size is not None:
        preprocess["size"] = image_size
    open_clip.set_model_preprocess_cfg(model, preprocess)
    return model


def _placement(model: torch.nn.Module) -> Callable[[str], str | None]:
    """Maps a rebuilt tensor's key to the model's name for it, with the key renamings `from_pretrained`
    applies (transformers' conversion mapping of the model's classes, the base model prefix added or removed);
    None where the model has no such tensor. Buffers the model does not save (`non_persistent`) are names too:
    older checkpoints hold some (`position_ids`), which loading skips."""
    names = {**model.state_dict(), **dict.fromkeys(non_persistent(model))}
    if not hasattr(model, "config"):  # open_clip: checkpoints use the module names
        return lambda key: key if key in names else None
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def place(key: str) -> str | None:
        if key in names:
            return key
        renamed, _ = rename_source_key(key, renamings, [], prefix, names)
        return renamed if renamed in names else None

    return place


def non_persistent(model: torch.nn.Module) -> set[str]:
    """Names of the model's buffers that are not part of its state dict."""
    return {name for name, _ in model.named_buffers()} - set(model.state_dict())


def _finish(model: torch.nn.Module, device: torch.device, task: str) -> torch.nn.Module:
    """Tie weights, check that nothing is left on the meta device, move the buffers, eval mode."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, tensor in model.state_dict().items() if tensor.device.type == "meta"]
    if empty:
        raise HubmergeError(
            f"task {task!r}: the artifact has no tensor {empty[0]!r} of {type(model).__name__}"
            + (f" (+{len(empty) - 1} more)" if len(empty) > 1 else "")
        )
    return model.to(device).eval()


def load_task_model(
    merge: CompressedMerge,
    task: str,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    model_class: type | None = None,
) -> torch.nn.Module:
    """See `CompressedMerge.load_model`."""
    from accelerate.utils import set_module_tensor_to_device

    device = torch.device(device or "cpu")
    wanted = torch_dtype(dtype)
    reader = TaskReader(merge, task)
    model = _empty_model(merge.task_files(task), model_class, wanted or _default_dtype(reader.infos), task)
    place, skipped = _placement(model), non_persistent(model)
    for key, info in reader.infos.items():
        name = place(key)
        if name is None:
            raise HubmergeError(
                f"task {task!r}: tensor {key!r} has no place in {type(model).__name__} (built from the task's "
                "config); pass model_class= for another class"
            )
        if name in skipped:  # computed by the model itself, as from_pretrained leaves it
            continue
        target = wanted if wanted is not None and info.is_float else info.dtype
        if device.type == "cpu":  # rebuilt straight into the parameter's own memory
            tensor = torch.empty(info.shape, dtype=target)
            reader.read_into(key, tensor)
        else:
            tensor = reader.read(key)
        set_module_tensor_to_device(model, name, device, value=tensor, dtype=target)
    return _finish(model, device, task)


# -- switching ------------------------------------------------------------------------------------------------


class TaskSwitcher:
    """What every task's model needs beyond the model itself, resident on one device.

    Args:
        merge: the artifact.
        device: where the resident tensors live.
        keys: the merged tensors to keep (default: all of them).
        theta0: θ0 of those tensors, when the caller holds it already (any float dtype); else read from the base.
    """

    def __init__(
        self,
        merge: CompressedMerge,
        device: torch.device,
        keys: list[str] | None = None,
        theta0: dict[str, torch.Tensor] | None = None,
    ):
        self.merge = merge
        self.tasks = merge.tasks
        self.device = device
        shapes = merge.mask_shapes(self.tasks[0])
        self.keys = list(shapes) if keys is None else keys
        self.shapes = {k: tuple(shapes[k]) for k in self.keys}
        base = merge.base
        self.theta0 = {
            k: (theta0[k] if theta0 is not None else base.read(k)).to(device).reshape(-1) for k in self.keys
        }
        self.shared_vector = merge.manifest["vector"] is not None
        if self.shared_vector:
            readers = merge.vector_readers()
            self.tau = {k: readers[k].read(k).to(device).reshape(-1) for k in self.keys}
            self.values: dict[str, dict[str, torch.Tensor]] = {}
        else:
            self.tau = {}
            self.values = {
                task: {k: v.to(device) for k, v in merge.values(task).items() if k in self.shapes}
                for task in self.tasks
            }
        self.packed = {
            task: {k: p.to(device) for k, p in merge.packed_masks(task).items() if k in self.shapes}
            for task in self.tasks
        }
        # merged tensors' dtypes as each task's model stores them (the fine-tune's, or the recipe's dtype)
        infos = {task: merge.task_infos(task) for task in self.tasks}
        self.stored = {task: {k: infos[task][k].dtype for k in self.keys} for task in self.tasks}
        # a switchable model's other tensors that differ between tasks (heads, ...), per task
        self.others: dict[str, dict[str, torch.Tensor]] = {task: {} for task in self.tasks}

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held per part: θ0, τ_MTL (or kept values), packed masks, the tasks' own tensors."""

        def size(tensors: Any) -> int:
            if isinstance(tensors, dict):
                return sum(size(t) for t in tensors.values())
            return tensors.numel() * tensors.element_size()

        shared = {t.data_ptr(): t for others in self.others.values() for t in others.values()}  # counted once
        return {
            "theta0": size(self.theta0),
            "tau_mtl" if self.shared_vector else "values": size(self.tau) + size(self.values),
            "masks": size(self.packed),
            "own": size(shared),
        }

    def rebuild_into(self, task: str, key: str, out: torch.Tensor) -> None:
        """Write task `task`'s tensor `key` into `out` (contiguous, any dtype): rebuilt in float32, cast to
        the dtype the task's model stores it in, then to `out`'s dtype (`rebuild_packed_into`)."""
        stored, flat = self.stored[task][key], out.view(-1)
        packed, theta0 = self.packed[task][key], self.theta0[key]
        if not self.shared_vector:
            mask = unpack_bits_on(packed, theta0.numel())
            flat.copy_(rebuild_sparse(theta0, self.values[task][key], mask).to(stored))
            return
        rebuild_packed_into(theta0, self.tau[key], packed, stored, flat)

    def overlay(self, task: str) -> dict[str, torch.Tensor]:
        """Task `task`'s merged tensors, as its model stores them (for scoring)."""
        out = {}
        for key in self.keys:
            out[key] = torch.empty(self.shapes[key], dtype=self.stored[task][key], device=self.device)
            self.rebuild_into(task, key, out[key])
        return out


def _config_differences(configs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per task, the top-level config values that differ between tasks (label maps, problem type, ...); not
    private attributes (`_name_or_path`) nor sub-configs, which modules of the model hold on to."""
    from transformers import PretrainedConfig

    names = {name for config in configs.values() for name in vars(config) if not name.startswith("_")}
    varying = [
        n
        for n in sorted(names)
        if len({repr(getattr(c, n, None)) for c in configs.values()}) > 1
        and not any(isinstance(getattr(c, n, None), PretrainedConfig) for c in configs.values())
    ]
    return {task: {n: copy.deepcopy(getattr(c, n, None)) for n in varying} for task, c in configs.items()}


def switchable_model(
    merge: CompressedMerge,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    model_class: type | None = None,
) -> torch.nn.Module:
    """See `CompressedMerge.switchable`."""
    device = torch.device(device or "cpu")
    tasks = merge.tasks
    first = tasks[0]
    keysets = {task: merge.task_infos(task) for task in tasks}
    for task in tasks[1:]:
        if keysets[task].keys() != keysets[first].keys():
            differ = sorted(keysets[task].keys() ^ keysets[first].keys())
            raise HubmergeError(
                f"tasks {first!r} and {task!r} have different tensors ({differ[0]!r}); one switchable model "
                "needs tasks of one architecture: load each with load_model"
            )
    if model_class is None:
        classes = {task: _architectures(merge, task) for task in tasks}
        if len(set(classes.values())) > 1:
            other = next(t for t in tasks if classes[t] != classes[first])
            raise HubmergeError(
                f"tasks {first!r} and {other!r} are different models ({classes[first]} and {classes[other]}); one "
                "switchable model needs tasks of one class: load each with load_model"
            )
    if dtype is None:
        for task in tasks[1:]:
            differ = [k for k, i in keysets[task].items() if i.dtype != keysets[first][k].dtype]
            if differ:
                raise HubmergeError(
                    f"tasks {first!r} and {task!r} store {differ[0]!r} as {keysets[first][differ[0]].dtype} and "
                    f"{keysets[task][differ[0]].dtype}; pass dtype= to serve them in one"
                )
    model = load_task_model(merge, first, device=device, dtype=dtype, model_class=model_class)
    place = _placement(model)
    params = model.state_dict(keep_vars=True)
    switcher = TaskSwitcher(merge, device)
    # per task, the other tensors that are not the same in every task: its own ones, and the base's (one copy)
    # where another task has its own
    own = {task: merge.private_tensors(task) for task in tasks}
    varying = sorted({k for task in tasks for k in own[task] if place(k) in params})
    base = merge.base
    from_base: dict[str, torch.Tensor] = {}
    for task in tasks:
        for key in varying:
            stored = keysets[task][key].dtype
            if key in own[task]:
                tensor = own[task][key]
            elif key in from_base:
                switcher.others[task][key] = from_base[key]
                continue
            else:
                tensor = base.read(key)
            target = params[place(key)].dtype if tensor.is_floating_point() else stored
            switcher.others[task][key] = tensor.to(stored).to(device=device, dtype=target)
            if key not in own[task]:
                from_base[key] = switcher.others[task][key]
    configs = _task_configs(merge, model, tasks)
    counting_labels = [m for m in model.modules() if "num_labels" in vars(m)]

    @torch.no_grad()
    def set_task(task: str) -> None:
        if task not in switcher.packed:
            raise HubmergeError(f"unknown task {task!r}; this artifact has: {', '.join(tasks)}")
        for key in switcher.keys:
            switcher.rebuild_into(task, key, params[place(key)].data)
        for key, tensor in switcher.others[task].items():
            parameter = params[place(key)]
            if parameter.shape == tensor.shape:
                parameter.data.copy_(tensor)
            else:
                parameter.data = tensor.clone()
                _resize_owner(model, place(key), tensor.shape)
        if configs is not None:
            for name, value in configs[task].items():
                setattr(model.config, name, copy.deepcopy(value))
            for module in counting_labels:  # heads copy `num_labels` from the config when built
                module.num_labels = model.config.num_labels
        model.task = task

    model.set_task = set_task
    model.task = first
    model.tasks = list(tasks)
    model.task_switcher = switcher
    return model


def _architectures(merge: CompressedMerge, task: str) -> str:
    """The model class a task's config names (open_clip: its config file)."""
    import json

    files = merge.task_files(task)
    if "config.json" not in files:
        return OPEN_CLIP_CONFIG if OPEN_CLIP_CONFIG in files else "?"
    return ", ".join(json.loads(files["config.json"].read_text()).get("architectures") or ["?"])


def _task_configs(merge: CompressedMerge, model: torch.nn.Module, tasks: list[str]) -> dict[str, dict] | None:
    """The config values each task sets on switching (transformers models; None for open_clip)."""
    if not hasattr(model, "config"):
        return None
    import transformers

    configs = {
        task: transformers.AutoConfig.from_pretrained(merge.task_files(task)["config.json"].parent)
        for task in tasks
    }
    return _config_differences(configs)


def _resize_owner(model: torch.nn.Module, name: str, shape: torch.Size) -> None:
    """A linear layer whose weight or bias changed shape (a head of another label count) says so."""
    module = model.get_submodule(name.rpartition(".")[0])
    if isinstance(module, torch.nn.Linear) and name.endswith("weight"):
        module.out_features, module.in_features = shape[0], shape[1]
