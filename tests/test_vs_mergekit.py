"""hubmerge's mergekit methods against mergekit 0.1.5's own outputs on the same inputs (tests/data/mergekit/,
made by its make_expected.py): every tensor equal within float32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hubmerge import parse_recipe, run_recipe

DATA = Path(__file__).parent / "data" / "mergekit"
CASES = sorted(p.name for p in (DATA / "expected").iterdir())
# mergekit parameters that hubmerge takes per task ({task: value}) or once for all tasks
PER_TASK = {"weight", "density"}
SHARED_PER_MODEL = {"gamma", "epsilon"}


def hubmerge_recipe(config: dict) -> dict:
    """The hubmerge recipe of a mergekit config: same method and parameter names; the base model is not a
    task; per-model values become {task: value} maps (or one value where hubmerge takes one)."""
    base = config["base_model"]
    entries = [m for m in config["models"] if m["model"] != base]
    names = [Path(m["model"]).name for m in entries]
    parameters = dict(config.get("parameters") or {})
    per_model: dict[str, dict[str, float]] = {}
    for name, entry in zip(names, entries, strict=True):
        for key, value in (entry.get("parameters") or {}).items():
            per_model.setdefault(key, {})[name] = value
    for key, values in per_model.items():
        if key in SHARED_PER_MODEL or (config["merge_method"].startswith("breadcrumbs") and key == "density"):
            assert len(set(values.values())) == 1, f"{key} differs between models"
            parameters[key] = next(iter(values.values()))
        else:
            assert key in PER_TASK, key
            parameters[key] = values
    if config["merge_method"] == "task_arithmetic":  # hubmerge's: θ0 + α·Σ τ_t, unit weights
        assert set(parameters.pop("weight").values()) == {1.0} and parameters.pop("normalize") is False
        parameters = {"scaling": parameters.pop("lambda")}
    return {
        "version": 1,
        "base": str(DATA / base),
        "models": [
            {"source": str(DATA / m["model"]), "name": n} for m, n in zip(entries, names, strict=True)
        ],
        "method": config["merge_method"],
        "parameters": parameters,
    }


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
