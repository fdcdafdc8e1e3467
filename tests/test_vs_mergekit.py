"""hubmerge's mergekit methods against mergekit 0.1.5's own outputs on the same inputs (tests/data/mergekit/,
made by its make_expected.py): every tensor equal within float32 rounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hubmerge import parse_recipe, run_recipe

DATA = Path(__file__).parent / "data" / "mergekit"
# Cases hubmerge cannot express, and why; every other case in expected/ must match.
UNSUPPORTED = {
    "nuslerp_nobase": "hubmerge always merges relative to a base (NuSLERP of the task vectors)",
    "nuslerp_nobase_rows": "hubmerge always merges relative to a base (NuSLERP of the task vectors)",
    "ties_weighted": "a density per model: hubmerge's per-tensor selections take one density for all tasks",
}
CASES = sorted(p.name for p in (DATA / "expected").iterdir() if p.is_dir() and p.name not in UNSUPPORTED)
# mergekit parameters that hubmerge takes per task ({task: value}) or once for all tasks
PER_TASK = {"weight", "density"}
SHARED_PER_MODEL = {"gamma", "epsilon"}


def hubmerge_recipe(config: dict) -> dict:
    """The hubmerge recipe of a mergekit config: same parameter names; the base model is not a task;
    per-model values become {task: value} maps (or one value where hubmerge takes one).

    mergekit's `task_arithmetic` with weights or `normalize` is hubmerge's `dare_linear` at density 1
    (generalized task arithmetic without a drop); mergekit's per-tensor `ties` is `breadcrumbs_ties` with
    gamma 0 (hubmerge's `ties` is the paper's, trimmed over the whole model).
    """
    base = config["base_model"]
    entries = [m for m in config["models"] if m["model"] != base]
    names = [Path(m["model"]).name for m in entries]
    method = config["merge_method"]
    parameters = {k: v for k, v in (config.get("parameters") or {}).items() if k != "int8_mask"}  # no effect
    per_model: dict[str, dict[str, float]] = {}
    for name, entry in zip(names, entries, strict=True):
        for key, value in (entry.get("parameters") or {}).items():
            per_model.setdefault(key, {})[name] = value
    if method == "ties":
        method, per_model["gamma"] = "breadcrumbs_ties", dict.fromkeys(names, 0.0)
    if method == "task_arithmetic":
        if set(per_model["weight"].values()) == {1.0} and not parameters.get("normalize"):
            return recipe(base, entries, names, "task_arithmetic", {"scaling": parameters["lambda"]})
        method = "dare_linear"
        parameters.setdefault("rescale", False)
    for key, values in per_model.items():
        if key in SHARED_PER_MODEL or (method.startswith("breadcrumbs") and key == "density"):
            assert len(set(values.values())) == 1, f"{key} differs between models"
            parameters[key] = next(iter(values.values()))
        else:
            assert key in PER_TASK, key
            parameters[key] = values
    return recipe(base, entries, names, method, parameters)


def recipe(base: str, entries: list[dict], names: list[str], method: str, parameters: dict) -> dict:
    return {
        "version": 1,
        "base": str(DATA / base),
        "models": [
            {"source": str(DATA / m["model"]), "name": n} for m, n in zip(entries, names, strict=True)
        ],
        "method": method,
        "parameters": parameters,
    }


def test_every_reference_case_is_compared_or_explained():
    cases = {p.name for p in (DATA / "expected").iterdir() if p.is_dir()}
    assert set(UNSUPPORTED) <= cases
    assert len(CASES) >= 15


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_entries", [1 << 21, 256])
def test_hubmerge_equals_mergekit(case, block_entries, tmp_path):
    config = yaml.safe_load((DATA / "expected" / case / "mergekit.yaml").read_text())
    run_recipe(parse_recipe(hubmerge_recipe(config)), output=tmp_path / "out", block_entries=block_entries)
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = load_file(DATA / "expected" / case / "model.safetensors")
    base = load_file(DATA / "inputs" / "base" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        change = (theirs[key] - base[key]).abs().max().item()
        # float32 rounding: of the weights, and of mergekit's float32 sums against hubmerge's float64 ones
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6 + 1e-5 * change, msg=key)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_drops_keep_what_mergekit_keeps_and_rescale_alike(method, tmp_path):
    """mergekit's random streams cannot be reproduced: compare, over the same four seeds, the share of the
    nonzero τ entries kept and the rescaling (the tensor's L1 ratio) with mergekit's (random_stats.json)."""
    stats = json.loads((DATA / "expected" / "random_stats.json").read_text())["methods"][method]
    config = stats["config"]
    seeds = json.loads((DATA / "expected" / "random_stats.json").read_text())["seeds"]
    theirs_kept = sum(
        rate * t["nonzero_tau"] for t in stats["tensors"].values() for rate in t["keep_rate"]
    ) / sum(t["nonzero_tau"] * len(t["keep_rate"]) for t in stats["tensors"].values())
    base = load_file(DATA / "inputs" / "base" / "model.safetensors")
    tuned = load_file(DATA / config["models"][0]["model"] / "model.safetensors")
    kept = nonzero = 0
    for seed in seeds:
        recipe = hubmerge_recipe(config)
        recipe["parameters"]["seed"] = seed
        run_recipe(parse_recipe(recipe), output=tmp_path / str(seed))
        ours = load_file(tmp_path / str(seed) / "model.safetensors")
        for key, theta in tuned.items():
            tau, delta = theta - base[key], ours[key] - base[key]
            on = tau != 0
            kept += int((delta[on] != 0).sum())
            nonzero += int(on.sum())
            if (delta != 0).any():  # rescaled to the task vector's L1 norm, as mergekit's scale_l1
                ratio = tau.abs().sum(dtype=torch.float64) / tau[delta != 0].abs().sum(dtype=torch.float64)
                torch.testing.assert_close(
                    delta[delta != 0], tau[delta != 0] * ratio.item(), rtol=1e-4, atol=1e-6
                )
    assert abs(kept / nonzero - theirs_kept) < 0.02, (kept / nonzero, theirs_kept)
