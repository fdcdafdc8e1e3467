"""DARE (`dare_linear`, `dare_ties`): keep rate, rescaling, the sign consensus, and the same bytes for any
piece size, process count and read-ahead (the random stream is keyed by tensor and entry)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge import parse_recipe, run_recipe
from hubmerge.methods.generalized import bernoulli_keep, keyed_uniform, mix
from tests.processes import hubmerge_cli


@pytest.fixture
def inputs(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(300, 200, generator=gen), "v": torch.randn(1000, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    thetas = []
    for i, scale in enumerate((0.01, 0.02, 0.03)):
        thetas.append({k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()})
        save_file(thetas[-1], tmp_path / f"m{i}.safetensors")
    return base, thetas


def recipe_dict(tmp_path, method: str, parameters: dict, t: int = 3) -> dict:
    return {
        "version": 1,
        "base": str(tmp_path / "base.safetensors"),
        "models": [{"source": str(tmp_path / f"m{i}.safetensors"), "name": f"m{i}"} for i in range(t)],
        "method": method,
        "parameters": parameters,
    }


def merged(tmp_path, method: str, parameters: dict, name: str = "out", t: int = 3, **kwargs) -> dict:
    run_recipe(parse_recipe(recipe_dict(tmp_path, method, parameters, t)), output=tmp_path / name, **kwargs)
    return load_file(tmp_path / name / "model.safetensors")


def test_keyed_stream_depends_on_entry_not_on_piece():
    whole = keyed_uniform(7, "w", 2, 0, 10_000, torch.device("cpu"))
    parts = [keyed_uniform(7, "w", 2, start, 1000, torch.device("cpu")) for start in range(0, 10_000, 1000)]
    assert torch.equal(whole, torch.cat(parts))
    assert not torch.equal(whole, keyed_uniform(7, "w", 1, 0, 10_000, torch.device("cpu")))
    assert not torch.equal(whole, keyed_uniform(8, "w", 2, 0, 10_000, torch.device("cpu")))
    # uniform: each of 16 bins within 5 % of its share
    counts = torch.bincount(whole >> 28, minlength=16).float()
    assert (counts / 625 - 1).abs().max() < 0.15


def test_dare_linear_keeps_density_and_rescales(tmp_path, inputs):
    base, thetas = inputs
    density = 0.3
    out = merged(tmp_path, "dare_linear", {"density": density, "seed": 3}, t=1)
    tau = thetas[0]["w"] - base["w"]
    delta = out["w"] - base["w"]
    kept = delta != 0
    assert abs(kept.float().mean().item() - density) < 0.01
    # rescaled as mergekit does: back to the task vector's L1 norm over the tensor (about 1/density)
    ratio = tau.abs().sum(dtype=torch.float64) / tau[kept].abs().sum(dtype=torch.float64)
    assert abs(ratio.item() * density - 1) < 0.02
    torch.testing.assert_close(delta[kept], tau[kept] * ratio.item(), rtol=1e-5, atol=5e-7)  # θ0 + δ rounds
    torch.testing.assert_close(delta.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    keep = bernoulli_keep(3, "w", 0, 0, density, tau.numel(), torch.device("cpu")).reshape(tau.shape)
    assert torch.equal(kept, keep & (tau != 0))


def test_dare_ties_equals_a_direct_computation(tmp_path, inputs):
    base, thetas = inputs
    weights = {"m0": 1.0, "m1": 0.5, "m2": 2.0}
    params = {"density": 0.5, "weight": weights, "lambda": 0.7, "normalize": True, "seed": 11}
    out = merged(tmp_path, "dare_ties", params)
    for key in base:
        taus = [(theta[key] - base[key]).reshape(-1) for theta in thetas]
        kept = [
            tau * bernoulli_keep(11, key, t, 0, 0.5, tau.numel(), torch.device("cpu"))
            for t, tau in enumerate(taus)
        ]
        dropped = [
            k * (tau.abs().sum(dtype=torch.float64) / k.abs().sum(dtype=torch.float64)).item()
            for tau, k in zip(taus, kept, strict=True)
        ]
        expected = base[key] + 0.7 * mix(dropped, list(weights.values()), True, True).reshape(base[key].shape)
        torch.testing.assert_close(out[key], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_bytes_do_not_depend_on_piece_or_span_size(tmp_path, inputs, method):
    params = {"density": 0.4, "seed": 5}
    default = merged(tmp_path, method, params, "default")
    small = merged(tmp_path, method, params, "small", block_entries=4096)
    plain = merged(tmp_path, method, params, "plain", block_entries=2048, span_entries=1000)
    for key in default:
        assert torch.equal(default[key], small[key]) and torch.equal(default[key], plain[key])


def test_dare_ties_two_processes_write_the_bytes_of_one(tmp_path, inputs):
    recipe = tmp_path / "dare.yaml"
    recipe.write_text(json.dumps(recipe_dict(tmp_path, "dare_ties", {"density": 0.4, "seed": 2})))
    one = hubmerge_cli("run", str(recipe), "-o", str(tmp_path / "one"), "-q")
    two = hubmerge_cli("run", str(recipe), "-o", str(tmp_path / "two"), "-q", "--num-processes", "2")
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "two" / "model.safetensors"
    ).read_bytes()


def test_consensus_over_dare_ties_and_tall_masks_over_breadcrumbs(tmp_path, inputs):
    """TALL masks and Consensus take any composable method's vector as τ_MTL."""
    from hubmerge.compressed import CompressedMerge

    params = {"merge": "dare_ties", "dare_ties": {"density": 0.5, "seed": 1}, "k": 2}
    run_recipe(parse_recipe(recipe_dict(tmp_path, "consensus", params)), output=tmp_path / "c")
    record = json.loads((tmp_path / "c" / "hubmerge.json").read_text())
    assert record["parameters"]["dare_ties"]["density"] == 0.5
    assert record["stats"]["consensus_kept"] > 0
    tall = {"merge": "breadcrumbs", "breadcrumbs": {"density": 0.5, "gamma": 0.1}, "lambda": 0.4}
    run_recipe(parse_recipe(recipe_dict(tmp_path, "tall_masks", tall)), output=tmp_path / "t")
    tau_mtl = load_file(tmp_path / "t" / "tau_mtl.safetensors")
    breadcrumbs = merged(tmp_path, "breadcrumbs", {"density": 0.5, "gamma": 0.1}, "b")
    base = load_file(tmp_path / "base.safetensors")
    for key in base:  # τ_MTL of the artifact is the breadcrumbs vector
        torch.testing.assert_close(tau_mtl[key], breadcrumbs[key] - base[key], rtol=0, atol=1e-6)
    masks = CompressedMerge.from_pretrained(tmp_path / "t").mask("m0")
    assert 0 < sum(int(m.sum()) for m in masks.values()) < sum(v.numel() for v in base.values())
