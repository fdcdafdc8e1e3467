"""hubmerge reproduces the reference implementation's outputs on the golden T4 fixture.

Masks are compared exactly; merged models within half a float32 spacing of θ0 (exact on dyadic tensors).
Runs through the Python API (`run_recipe`, `CompressedMerge`) and the public CLI (`hubmerge run/materialize`).
"""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from hubmerge import CompressedMerge, parse_recipe, run_recipe
from hubmerge.cli import app
from tests.golden import (
    LAMBDAS,
    TASKS,
    assert_masks_equal,
    assert_written_vector,
    diagnostics,
    expected,
    recipe,
    scaled,
)

runner = CliRunner()


def run_api(tmp_path, method, parameters=None, **kwargs):
    result = run_recipe(parse_recipe(recipe(method, parameters)), output=tmp_path / "out", **kwargs)
    return result.output, result.record


def run_cli(tmp_path, method, parameters=None, *args):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe(method, parameters), "output": str(tmp_path / "out")}))
    result = runner.invoke(app, ["run", str(path), "-q", *args])
    assert result.exit_code == 0, result.output
    return tmp_path / "out", json.loads((tmp_path / "out" / "hubmerge.json").read_text())


@pytest.mark.parametrize(
    ("method", "parameters", "vector", "scaling"),
    [
        ("task_arithmetic", {}, "ta-merged_tv", 1.0),
        ("task_arithmetic", {"scaling": 0.3}, "ta-merged_tv", 0.3),
        ("weight_average", {}, "ta-merged_tv", 0.25),
        ("ties", {}, "ties-k20-dis-mean-merged_tv", 1.0),
        ("ties", {"merge": "sum", "scaling": 0.7}, "ties-k20-dis-sum-merged_tv", 0.7),
        ("ties", {"merge": "max", "density": 0.2}, "ties-k20-dis-max-merged_tv", 1.0),
        ("consensus", {"k": 1}, "consensus-ta-k1-merged_tv", 1.0),
        ("consensus", {"k": 2, "lambda": 0.4, "scaling": 0.5}, "consensus-ta-k2-merged_tv", 0.5),
        ("consensus", {"merge": "ties", "k": 1}, "consensus-ties-k1-merged_tv", 1.0),
        ("consensus", {"merge": "ties", "k": 2}, "consensus-ties-k2-merged_tv", 1.0),
    ],
)
def test_merged_models_match_reference(tmp_path, method, parameters, vector, scaling):
    out, _ = run_api(tmp_path, method, parameters)
    written = load_file(out / "model.safetensors")
    assert_written_vector(written, expected(vector), f"{method} {parameters}", scaling)


def test_ties_statistics_match_reference_diagnostics(tmp_path):
    _, record = run_api(tmp_path, "ties", {"merge": "sum"})
    trim = diagnostics()["ties_trim"]["per_task"]
    assert record["stats"]["topk_thresholds"] == [trim[t]["threshold"] for t in TASKS]
    assert record["stats"]["ties_sign_total"] == diagnostics()["ties_signs"]["sum_of_elected_signs"] == 230


@pytest.mark.parametrize("merge", ["ta", "ties"])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_tall_masks_exact_through_cli(tmp_path, merge, lam):
    parameters = {"merge": "task_arithmetic" if merge == "ta" else "ties", "lambda": lam}
    out, record = run_cli(tmp_path, "tall_masks", parameters)
    artifact = CompressedMerge.from_pretrained(out)
    assert artifact.tasks == TASKS
    for task in TASKS:
        assert_masks_equal(artifact.mask(task), f"tall_mask-{merge}-lambda{lam}-{task}")
    if lam == 0.4:
        votes = diagnostics()["consensus_vote_histogram"][merge]
        assert record["stats"]["agreement_histogram"] == [votes[str(c)] for c in range(5)]


@pytest.mark.parametrize("merge", ["ta", "ties"])
def test_tall_reconstruction_through_materialize(tmp_path, merge):
    parameters = {"merge": "task_arithmetic" if merge == "ta" else "ties", "lambda": 0.4}
    out, _ = run_cli(tmp_path, "tall_masks", parameters)
    vector_name = "ta-merged_tv" if merge == "ta" else "ties-k20-dis-sum-merged_tv"
    assert load_file(out / "tau_mtl.safetensors").keys() == expected(vector_name).keys()
    for key, value in load_file(out / "tau_mtl.safetensors").items():
        assert value.equal(expected(vector_name)[key]), key
    for task in TASKS:
        model_dir = tmp_path / f"model-{task}"
        result = runner.invoke(app, ["materialize", str(out), "--task", task, "--output", str(model_dir)])
        assert result.exit_code == 0, result.output
        reconstruction = scaled(vector_name, f"tall_mask-{merge}-lambda0.4-{task}")
        assert_written_vector(load_file(model_dir / "model.safetensors"), reconstruction, f"{merge} {task}")


def test_tall_per_task_lambda_map(tmp_path):
    lambdas = dict(zip(TASKS, [0.2, 0.6, 0.4, 0.3], strict=True))
    out, record = run_api(tmp_path, "tall_masks", {"lambda": lambdas})
    artifact = CompressedMerge.from_pretrained(out)
    for task, lam in lambdas.items():
        assert_masks_equal(artifact.mask(task), f"tall_mask-ta-lambda{lam}-{task}")
    assert [t["lambda"] for t in record["tasks"]] == list(lambdas.values())


def test_consensus_with_per_task_lambdas(tmp_path):
    lambdas = dict(zip(TASKS, [0.2, 0.6, 0.4, 0.3], strict=True))
    out, _ = run_api(tmp_path, "consensus", {"k": 2, "lambda": lambdas})
    masks = [expected(f"tall_mask-ta-lambda{lam}-{t}") for t, lam in lambdas.items()]
    vector = {
        k: v * (sum(m[k].int() for m in masks) >= 2).float() for k, v in expected("ta-merged_tv").items()
    }
    assert_written_vector(load_file(out / "model.safetensors"), vector, "consensus per-task λ")


@pytest.mark.parametrize("method", ["magnitude_masking", "magnitude_pruning"])
def test_magnitude_methods(tmp_path, method):
    out, record = run_api(tmp_path, method, {"density": 0.1})
    artifact = CompressedMerge.from_pretrained(out)
    per_task = diagnostics()["magnitude_topk_k10"]
    assert [t["mask_kept"] for t in record["tasks"]] == [per_task[t]["kept"] for t in TASKS]
    for task in TASKS:
        assert_masks_equal(artifact.mask(task), f"mag_mask-k10-{task}")
        if method == "magnitude_masking":
            vector = scaled("ta-merged_tv", f"mag_mask-k10-{task}")
        else:
            vector = expected(f"magnitude_pruned_tv-k10-{task}")
        assert_written_vector(artifact.materialize(task), vector, f"{method} {task}")


def test_small_blocks_give_identical_bytes(tmp_path):
    """Row blocks of a few entries (pieces of every tensor) change nothing in the output."""
    whole, _ = run_api(tmp_path / "whole", "tall_masks", {"merge": "ties"})
    pieces, _ = run_api(tmp_path / "pieces", "tall_masks", {"merge": "ties"}, block_entries=1000)
    for name in ["tau_mtl.safetensors", *(f"masks/{t}.safetensors" for t in TASKS)]:
        assert (whole / name).read_bytes() == (pieces / name).read_bytes(), name
