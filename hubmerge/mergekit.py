"""Convert a mergekit configuration into the hubmerge recipe that computes the same merge.

Only what means the same in both tools is converted, following mergekit 0.1.5:

* `linear`: Σ w_i θ_i / Σ w_i over the listed models, plus `base_model` when it is given (mergekit adds it to
  the inputs). With equal weights this is a plain average: hubmerge `weight_average` over the models when
  there is no base model, else `task_arithmetic` with scaling 1/n on the base, since
  θ0 + (1/n)·Σ (θ_t − θ0) = (θ0 + Σ θ_t)/n for the n averaged models.
* `task_arithmetic`: θ0 + λ·Σ w_t τ_t (divided by Σ w_t with `normalize`). With one weight w for every model
  this is hubmerge `task_arithmetic` with scaling λ·w (λ/T normalized).
* `ties`: per-tensor magnitude trim to `density`, the sign of the weighted sum elected, the agreeing entries
  summed, divided by their weights with `normalize` (the default), times λ. With one weight w > 0 and one
  density this is hubmerge `ties` with `trim: tensor`, `merge: mean` and scaling λ (`merge: sum` and λ·w
  without normalize).

Anything else (slices, modules, gradients and filters, different per-model weights or densities, LoRA,
other methods) is refused with a one-line error saying what is not supported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from hubmerge.errors import RecipeError
from hubmerge.recipe import default_task_name, parse_recipe, read_yaml

METHODS = ("linear", "task_arithmetic", "ties")
# Per method: the parameters mergekit 0.1.5 reads, with their defaults (None: required, per model).
PARAMETERS: dict[str, dict[str, Any]] = {
    "linear": {"weight": None, "normalize": True},
    "task_arithmetic": {
        "weight": None,
        "normalize": False,
        "lambda": 1.0,
        "density": 1.0,
        "rescale": False,
        "int8_mask": False,
    },
    "ties": {
        "weight": None,
        "density": 1.0,
        "normalize": True,
        "lambda": 1.0,
        "rescale": False,
        "int8_mask": False,
    },
}
PER_MODEL = ("weight", "density")
TOP_LEVEL = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
DTYPES = ("float32", "bfloat16", "float16")
SUPPORTED = (
    "supported: merge_method linear, task_arithmetic or ties; base_model; models with one weight (and one "
    "density) for all; top-level parameters normalize, lambda, int8_mask; dtype/out_dtype float32, bfloat16, "
    "float16"
)


def _refuse(origin: str, what: str) -> RecipeError:
    return RecipeError(f"{origin}: {what} ({SUPPORTED})", path=None if origin.startswith("<") else origin)


def _reference(value: Any, origin: str, where: str) -> str:
    """A mergekit model reference as a hubmerge source: `path[@revision]`; LoRA references are refused."""
    if isinstance(value, dict) and set(value) <= {"model", "lora"}:
        if value.get("lora") is not None:
            raise _refuse(origin, f"{where}: LoRA adapters are not supported")
        value = value.get("model")
    if isinstance(value, dict) and isinstance(value.get("path"), str) and set(value) <= {"path", "revision"}:
        value = value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
    if not isinstance(value, str) or not value:
        raise _refuse(origin, f"{where}: expected a model path or Hub id, got {value!r}")
    if "+" in value:
        raise _refuse(origin, f"{where}: {value!r} applies a LoRA adapter, which is not supported")
    return value


def _scalar(value: Any, origin: str, where: str) -> bool | int | float:
    if isinstance(value, list | dict):
        raise _refuse(
            origin, f"{where}: gradients and filters (one value per layer or tensor) are not supported"
        )
    if not isinstance(value, bool | int | float):
        raise _refuse(origin, f"{where}: expected a number or true/false, got {value!r}")
    return value


def _parameters(raw: Any, method: str, origin: str, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _refuse(origin, f"{where}: expected a mapping, got {raw!r}")
    for name in raw:
        if name not in allowed:
            known = ", ".join(PARAMETERS[method])
            scope = "" if name not in PARAMETERS[method] else " here (it applies to the whole merge)"
            raise _refuse(
                origin,
                f"{where}.{name}: not a parameter of mergekit's {method}{scope}; {method} has: {known}",
            )
    return {name: _scalar(value, origin, f"{where}.{name}") for name, value in raw.items()}


def _one(values: dict[str, Any], name: str, origin: str) -> Any:
    """The value every model has for `name`: hubmerge applies one value to all task vectors."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) > 1:
        shown = ", ".join(f"{model}: {value}" for model, value in values.items())
        raise _refuse(
            origin,
            f"models have different {name} values ({shown}); hubmerge applies one {name} to every model",
        )
    return distinct[0]


def _named(sources: list[str]) -> list[str | dict[str, str]]:
    """The models as recipe entries: explicit task names when the default ones (repo or directory names)
    clash, as `org-a/model` and `org-b/model` do."""
    names = [default_task_name(s) for s in sources]
    if len(set(names)) == len(names):
        return list(sources)
    return [{"source": s, "name": re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")} for s in sources]


def convert_mergekit(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """The hubmerge recipe computing the merge a mergekit configuration describes.

    Args:
        data: the loaded mergekit YAML.
        origin: the file, named in errors.

    Returns:
        The recipe mapping (version, base, models, method, parameters, dtype when given).

    Raises:
        RecipeError: one line naming what hubmerge cannot express.
    """
    if not isinstance(data, dict) or "merge_method" not in data:
        raise RecipeError(f"{origin}: not a mergekit config (it has no merge_method)", field="merge_method")
    for key in ("slices", "modules"):
        if data.get(key):
            raise _refuse(
                origin,
                f"{key}: layer slices and per-module merges are not supported; hubmerge merges whole models",
            )
    unknown = [k for k in data if k not in TOP_LEVEL and k not in ("slices", "modules")]
    if unknown:
        raise _refuse(origin, f"{unknown[0]}: not supported")
    if data.get("tokenizer_source") not in (None, "base"):
        raise _refuse(
            origin, "tokenizer_source: only the base model's tokenizer is supported (hubmerge copies it)"
        )
    method = data["merge_method"]
    if method not in METHODS:
        raise _refuse(origin, f"merge_method {method!r} is not supported")
    entries = data.get("models")
    if not isinstance(entries, list) or not entries:
        raise _refuse(origin, "models: expected a list of {model: ..., parameters: {...}}")
    per_model = tuple(p for p in PARAMETERS[method] if p in PER_MODEL)
    shared = tuple(p for p in PARAMETERS[method] if p not in PER_MODEL)
    settings = _parameters(data.get("parameters"), method, origin, "parameters", tuple(PARAMETERS[method]))
    base = _reference(data["base_model"], origin, "base_model") if data.get("base_model") else None

    inputs: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        where = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry or not set(entry) <= {"model", "parameters"}:
            raise _refuse(origin, f"{where}: expected {{model: ..., parameters: {{...}}}}, got {entry!r}")
        source = _reference(entry["model"], origin, f"{where}.model")
        if source in inputs:
            raise _refuse(origin, f"{where}: {source} is listed twice")
        own = _parameters(entry.get("parameters"), method, origin, f"{where}.parameters", per_model)
        inputs[source] = {p: own.get(p, settings.get(p, PARAMETERS[method][p])) for p in per_model}
    if base is not None and method == "linear" and base not in inputs:
        # mergekit adds the base model to the inputs of every method, linear included
        inputs[base] = {p: settings.get(p, PARAMETERS[method][p]) for p in per_model}
    options = {p: settings.get(p, PARAMETERS[method][p]) for p in shared}
    if method != "linear":
        if base is None:
            raise _refuse(
                origin, f"base_model: mergekit's {method} needs one (the task vectors are taken against it)"
            )
        inputs.pop(base, None)  # the base's own task vector is zero: mergekit leaves it out
    if not inputs or (method == "linear" and base is not None and len(inputs) < 2):
        raise _refuse(origin, "models: nothing to merge besides the base model")
    for source, values in inputs.items():
        if values["weight"] is None:
            raise _refuse(
                origin,
                f"{source}: no weight (mergekit needs one for every model; set it per model or in parameters)",
            )
    weight = float(_one({s: v["weight"] for s, v in inputs.items()}, "weight", origin))
    if options.get("rescale"):
        raise _refuse(
            origin, "parameters.rescale: true rescales the trimmed task vectors, which is not supported"
        )

    models = list(inputs)
    lam = float(options.get("lambda", 1.0))
    recipe: dict[str, Any] = {"version": 1}
    if method == "linear":
        n = len(models)
        if not options["normalize"] and abs(weight * n - 1) > 1e-9:
            raise _refuse(
                origin,
                f"linear without normalize and weights summing to {weight * n:g}, not 1, is not an average",
            )
        if weight == 0:
            raise _refuse(origin, "linear: the weights sum to 0")
        if base is None:
            recipe |= {"base": models[0], "models": models, "method": "weight_average"}
        else:
            others = [m for m in models if m != base]
            recipe |= {
                "base": base,
                "models": others,
                "method": "task_arithmetic",
                "parameters": {"scaling": 1 / n},
            }
    elif method == "task_arithmetic":
        divisor = len(models) * weight if options["normalize"] else 1.0
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor  # mergekit's guard against a zero weight sum
        recipe |= {
            "base": base,
            "models": models,
            "method": "task_arithmetic",
            "parameters": {"scaling": lam * weight / divisor},
        }
    else:
        if weight <= 0:
            raise _refuse(origin, f"ties with weight {weight:g}: only a positive weight is supported")
        density = float(_one({s: v["density"] for s, v in inputs.items()}, "density", origin))
        if density <= 0:
            raise _refuse(origin, f"ties with density {density:g}: it keeps nothing")
        parameters = {"density": min(density, 1.0), "trim": "tensor"}
        if options["normalize"]:
            parameters |= {"merge": "mean", "scaling": lam}
        else:
            parameters |= {"merge": "sum", "scaling": lam * weight}
        recipe |= {"base": base, "models": models, "method": "ties", "parameters": parameters}
    recipe["models"] = _named(recipe["models"])
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise _refuse(
                origin, f"dtype {dtype!r}: hubmerge writes float32, bfloat16 or float16 (or the base's dtype)"
            )
        recipe["dtype"] = dtype
    parse_recipe(recipe, origin)
    return recipe


def convert_mergekit_file(path: Path) -> str:
    """The YAML text of the hubmerge recipe equivalent to the mergekit config at `path`.

    Args:
        path: a mergekit YAML file.

    Returns:
        The recipe, starting with a comment that says where it came from and how to run it.
    """
    if not path.is_file():
        raise RecipeError(f"mergekit config not found: {path}", path=path)
    data = read_yaml(path)
    recipe = convert_mergekit(data, str(path))
    recipe["output"] = f"out/{path.stem}"
    lines = [
        f"# hubmerge recipe converted from the mergekit config {path} ({data['merge_method']})",
        "# run it with: hubmerge run <this file>   (--output overrides `output`)",
    ]
    if recipe["method"] == "ties":
        lines.append(
            "# differences from mergekit's ties: per tensor of n entries, hubmerge keeps |tau| >= the k-th "
            "smallest (k = n - int(n*density): int(n*density) + 1 entries, ties kept), mergekit exactly "
            "max(1, int(n*density)); where the trimmed vectors sum to exactly 0, hubmerge elects the "
            "model-wide majority sign, mergekit +1"
        )
    return "\n".join(lines) + "\n" + yaml.safe_dump(recipe, sort_keys=False)
