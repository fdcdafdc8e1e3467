"""mergekit configurations: recognised with one line instead of a dozen schema errors, and converted into the
hubmerge recipe computing the same merge, checked against mergekit's formulas on real weights.

The reference below follows mergekit 0.1.5 (`merge_methods/linear.py`, `generalized_task_arithmetic.py`):
linear = Σ w_i θ_i / Σ w_i; task arithmetic = θ0 + λ·Σ w_t τ_t (÷ Σ w_t with normalize); TIES = the weighted
deltas, the sign of their sum (≥ 0: +1), the agreeing ones summed, divided by their weights with normalize,
times λ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hubmerge import parse_recipe, run_recipe
from hubmerge.errors import HubmergeError
from hubmerge.mergekit import convert_mergekit, convert_mergekit_file
from tests.test_bad_input import Workspace, assert_refused, invoke, snapshot

Tensors = dict[str, torch.Tensor]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


def write_config(ws: Workspace, config: dict[str, Any]) -> Path:
    path = ws.root / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_converted(ws: Workspace, config: dict[str, Any]) -> Tensors:
    recipe = yaml.safe_load(convert_mergekit_file(write_config(ws, config)))
    run_recipe(parse_recipe(recipe), output=ws.output, model_card=False)
    return load_file(ws.output / "model.safetensors")


def weights_of(directory: Path) -> Tensors:
    return load_file(directory / "model.safetensors")


def mergekit_linear(models: list[Tensors], weights: list[float], key: str) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float32)
    return sum(wi * m[key] for wi, m in zip(w, models, strict=True)) / w.sum()


def mergekit_task_arithmetic(
    base: Tensors, models: list[Tensors], w: float, lam: float, key: str
) -> torch.Tensor:
    return base[key] + lam * sum(w * (m[key] - base[key]) for m in models)


def mergekit_ties(
    base: Tensors, models: list[Tensors], w: float, lam: float, normalize: bool, key: str
) -> torch.Tensor:
    """Density 1 (no trim): mergekit's sign election and disjoint merge."""
    deltas = torch.stack([w * (m[key] - base[key]) for m in models])
    majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == majority
    mixed = (deltas * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0)
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    return base[key] + lam * mixed


def float_keys(tensors: Tensors) -> list[str]:
    return [k for k, v in tensors.items() if v.is_floating_point()]


# -- recognised, with one line -------------------------------------------------------------------------------

TIES_CONFIG = {
    "merge_method": "ties",
    "base_model": "org/base",
    "models": [
        {"model": "org/math", "parameters": {"density": 0.5, "weight": 0.5}},
        {"model": "org/code", "parameters": {"density": 0.5, "weight": 0.5}},
    ],
    "parameters": {"normalize": True, "int8_mask": True},
    "dtype": "bfloat16",
}


def test_a_mergekit_config_is_recognised_in_one_line() -> None:
    with pytest.raises(HubmergeError) as caught:
        parse_recipe(TIES_CONFIG, "recipe.yaml")
    assert str(caught.value) == (
        "recipe.yaml: this looks like a mergekit config (merge_method, base_model); hubmerge recipes look like "
        "'version: 1 / base: / models: / method:'; convert it with: hubmerge convert-mergekit recipe.yaml"
    )


def test_run_on_a_mergekit_config_says_so_and_writes_nothing(ws: Workspace) -> None:
    path = write_config(ws, TIES_CONFIG)
    before = snapshot(ws.root)
    assert_refused(
        invoke("run", path, "--output", ws.output, "-q"),
        f"{path}: this looks like a mergekit config (merge_method, base_model)",
        f"hubmerge convert-mergekit {path}",
    )
    assert snapshot(ws.root) == before


def test_conversion_text(ws: Workspace) -> None:
    path = write_config(ws, TIES_CONFIG)
    text = convert_mergekit_file(path)
    assert text.startswith(f"# hubmerge recipe converted from the mergekit config {path} (ties)\n")
    assert "# run it with: hubmerge run <this file>" in text
    assert "int(n*density) + 1 entries" in text  # the documented difference of the per-tensor trim
    assert yaml.safe_load(text) == {
        "version": 1,
        "base": "org/base",
        "models": ["org/math", "org/code"],
        "method": "ties",
        "parameters": {"density": 0.5, "trim": "tensor", "merge": "mean", "scaling": 1.0},
        "dtype": "bfloat16",
        "output": "out/mergekit",
    }


# -- converted, and the same merge --------------------------------------------------------------------------


def test_linear_without_base_is_the_average(ws: Workspace) -> None:
    a, b, c = (str(m) for m in ws.models)
    config = {
        "merge_method": "linear",
        "models": [{"model": m, "parameters": {"weight": 0.7}} for m in (a, b, c)],
        "dtype": "float32",
    }
    assert convert_mergekit(config, "x")["method"] == "weight_average"
    merged = run_converted(ws, config)
    models = [weights_of(m) for m in ws.models]
    for key in float_keys(models[0]):
        torch.testing.assert_close(merged[key], mergekit_linear(models, [0.7] * 3, key), rtol=0, atol=1e-6)


def test_linear_with_base_averages_the_base_too(ws: Workspace) -> None:
    """mergekit adds base_model to a linear merge's inputs: (θ0 + θ_a + θ_b)/3."""
    config = {
        "merge_method": "linear",
        "base_model": str(ws.base),
        "models": [{"model": str(m)} for m in ws.models[:2]],
        "parameters": {"weight": 1.0},
    }
    recipe = convert_mergekit(config, "x")
    assert (recipe["method"], recipe["parameters"]) == ("task_arithmetic", {"scaling": 1 / 3})
    merged = run_converted(ws, config)
    inputs = [weights_of(m) for m in (*ws.models[:2], ws.base)]
    for key in float_keys(inputs[0]):
        torch.testing.assert_close(merged[key], mergekit_linear(inputs, [1.0] * 3, key), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("normalize", "lam"), [(False, 1.0), (False, 0.8), (True, 1.0)])
def test_task_arithmetic(ws: Workspace, normalize: bool, lam: float) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(ws.base),
        "models": [
            {"model": str(ws.base)},
            *({"model": str(m), "parameters": {"weight": 0.4}} for m in ws.models),
        ],
        "parameters": {"normalize": normalize, "lambda": lam},
    }
    merged = run_converted(ws, config)
    base, models = weights_of(ws.base), [weights_of(m) for m in ws.models]
    w = 0.4 / (3 * 0.4) if normalize else 0.4
    for key in float_keys(base):
        expected = mergekit_task_arithmetic(base, models, w, lam, key)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_without_trim(ws: Workspace, normalize: bool) -> None:
    config = {
        "merge_method": "ties",
        "base_model": str(ws.base),
        "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in ws.models],
        "parameters": {"normalize": normalize, "lambda": 0.9},
    }
    recipe = convert_mergekit(config, "x")
    assert recipe["parameters"] == {
        "density": 1.0,  # mergekit's default: no trim (hubmerge's own default is 0.2)
        "trim": "tensor",
        "merge": "mean" if normalize else "sum",
        "scaling": 0.9 if normalize else 0.45,
    }
    merged = run_converted(ws, config)
    base, models = weights_of(ws.base), [weights_of(m) for m in ws.models]
    for key in float_keys(base):
        expected = mergekit_ties(base, models, 0.5, 0.9, normalize, key)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)


def test_revisions_and_dtype(ws: Workspace) -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": {"model": {"path": "org/base", "revision": "v1"}},
        "models": [{"model": "org/a@main", "parameters": {"weight": 1}}],
        "out_dtype": "torch.float16",
        "dtype": "float32",
    }
    recipe = convert_mergekit(config, "x")
    assert (recipe["base"], recipe["models"], recipe["dtype"]) == ("org/base@v1", ["org/a@main"], "float16")


def test_clashing_task_names_are_made_explicit() -> None:
    config = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "models": [
            {"model": m, "parameters": {"weight": 1}} for m in ("lab-a/model", "lab-b/model@v2", "lab-c/x")
        ],
    }
    assert convert_mergekit(config, "x")["models"] == [
        {"source": "lab-a/model", "name": "lab-a-model"},
        {"source": "lab-b/model@v2", "name": "lab-b-model-v2"},
        {"source": "lab-c/x", "name": "lab-c-x"},
    ]


# -- what hubmerge cannot express ----------------------------------------------------------------------------

BASE = {"base_model": "org/base"}
REFUSED = [
    (
        "slerp",
        {**BASE, "merge_method": "slerp", "models": [{"model": "org/a"}]},
        "merge_method 'slerp' is not",
    ),
    (
        "dare_ties",
        {**BASE, "merge_method": "dare_ties", "models": [{"model": "org/a", "parameters": {"weight": 1}}]},
        "merge_method 'dare_ties' is not supported",
    ),
    (
        "slices",
        {"merge_method": "linear", "slices": [{"sources": [{"model": "org/a", "layer_range": [0, 8]}]}]},
        "slices: layer slices and per-module merges are not supported",
    ),
    (
        "different-weights",
        {
            "merge_method": "linear",
            "models": [
                {"model": "org/a", "parameters": {"weight": 1.0}},
                {"model": "org/b", "parameters": {"weight": 0.3}},
            ],
        },
        "models have different weight values (org/a: 1.0, org/b: 0.3); hubmerge applies one weight to every model",
    ),
    (
        "different-densities",
        {
            **BASE,
            "merge_method": "ties",
            "models": [
                {"model": "org/a", "parameters": {"weight": 1, "density": 0.5}},
                {"model": "org/b", "parameters": {"weight": 1, "density": 0.3}},
            ],
        },
        "models have different density values (org/a: 0.5, org/b: 0.3)",
    ),
    (
        "gradient",
        {
            **BASE,
            "merge_method": "ties",
            "models": [{"model": "org/a", "parameters": {"weight": 1, "density": [1, 0.5]}}],
        },
        "models[0].parameters.density: gradients and filters",
    ),
    (
        "filter",
        {
            **BASE,
            "merge_method": "task_arithmetic",
            "models": [
                {"model": "org/a", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}}
            ],
        },
        "models[0].parameters.weight: gradients and filters",
    ),
    (
        "missing-weight",
        {**BASE, "merge_method": "task_arithmetic", "models": [{"model": "org/a"}]},
        "org/a: no weight (mergekit needs one for every model",
    ),
    (
        "linear-base-without-weight",
        {**BASE, "merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": 1}}]},
        "org/base: no weight",
    ),
    (
        "task-arithmetic-without-base",
        {"merge_method": "task_arithmetic", "models": [{"model": "org/a", "parameters": {"weight": 1}}]},
        "base_model: mergekit's task_arithmetic needs one",
    ),
    (
        "rescale",
        {
            **BASE,
            "merge_method": "ties",
            "models": [{"model": "org/a"}],
            "parameters": {"weight": 1, "rescale": True},
        },
        "parameters.rescale: true",
    ),
    (
        "lora",
        {
            **BASE,
            "merge_method": "ties",
            "models": [{"model": "org/a+org/adapter", "parameters": {"weight": 1}}],
        },
        "models[0].model: 'org/a+org/adapter' applies a LoRA adapter",
    ),
    (
        "unknown-parameter",
        {
            **BASE,
            "merge_method": "ties",
            "models": [{"model": "org/a", "parameters": {"weight": 1, "gamma": 0.1}}],
        },
        "models[0].parameters.gamma: not a parameter of mergekit's ties",
    ),
    (
        "shared-parameter-per-model",
        {
            **BASE,
            "merge_method": "ties",
            "models": [{"model": "org/a", "parameters": {"weight": 1, "lambda": 2}}],
        },
        "models[0].parameters.lambda: not a parameter of mergekit's ties here (it applies to the whole merge)",
    ),
    (
        "linear-sum",
        {
            "merge_method": "linear",
            "models": [{"model": m, "parameters": {"weight": 1}} for m in ("org/a", "org/b")],
            "parameters": {"normalize": False},
        },
        "linear without normalize and weights summing to 2, not 1",
    ),
    (
        "negative-ties-weight",
        {**BASE, "merge_method": "ties", "models": [{"model": "org/a", "parameters": {"weight": -1}}]},
        "ties with weight -1: only a positive weight is supported",
    ),
    (
        "float64",
        {
            **BASE,
            "merge_method": "ties",
            "models": [{"model": "org/a", "parameters": {"weight": 1}}],
            "dtype": "float64",
        },
        "dtype 'float64': hubmerge writes float32, bfloat16 or float16",
    ),
    (
        "union-tokenizer",
        {**BASE, "merge_method": "ties", "models": [{"model": "org/a"}], "tokenizer_source": "union"},
        "tokenizer_source: only the base model's tokenizer",
    ),
    (
        "listed-twice",
        {
            "merge_method": "linear",
            "models": [{"model": "org/a"}, {"model": "org/a"}],
            "parameters": {"weight": 1},
        },
        "models[1]: org/a is listed twice",
    ),
    (
        "only-the-base",
        {**BASE, "merge_method": "ties", "models": [{"model": "org/base", "parameters": {"weight": 1}}]},
        "models: nothing to merge besides the base model",
    ),
]


@pytest.mark.parametrize(("config", "fragment"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(HubmergeError) as caught:
        convert_mergekit(config, "mk.yaml")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("mk.yaml: "), message
    assert fragment in message, message
    assert message.endswith("dtype/out_dtype float32, bfloat16, float16)"), message  # says what is supported


def test_conversion_of_a_file_that_is_not_mergekit(ws: Workspace) -> None:
    path = ws.write()
    with pytest.raises(HubmergeError, match="not a mergekit config"):
        convert_mergekit_file(path)
    with pytest.raises(HubmergeError, match="mergekit config not found"):
        convert_mergekit_file(ws.root / "absent.yaml")
