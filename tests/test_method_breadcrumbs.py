"""Model Breadcrumbs (`breadcrumbs`, `breadcrumbs_ties`) against a sort-based computation of the same band,
per tensor, whatever the piece size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge import parse_recipe, run_recipe
from hubmerge.methods.breadcrumbs import band
from hubmerge.methods.generalized import mix


def sorted_band(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """τ outside the band zeroed by sorting |τ|, as mergekit selects it."""
    bottom, top = band(tau.numel(), density, gamma)
    order = tau.abs().reshape(-1).sort().indices
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[order[bottom : tau.numel() - top]] = True
    return tau * keep.reshape(tau.shape)


@pytest.mark.parametrize(
    ("count", "density", "gamma"), [(100, 0.9, 0.01), (100, 0.5, 0.1), (10, 0.95, 0.2), (7, 1.0, 0.0)]
)
def test_band_counts_as_mergekit(count, density, gamma):
    bottom, top = band(count, density, gamma)
    assert bottom >= 0 and top >= 0
    assert count - bottom - top == min(count, int(density * count)) if bottom > 0 else True
    assert top <= int(gamma * count)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("block_entries", [1 << 21, 4096])
def test_breadcrumbs_equals_the_sorted_band(tmp_path, method, block_entries):
    gen = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(256, 96, generator=gen), "b": torch.randn(96, generator=gen)}
    save_file(base, tmp_path / "base.safetensors")
    thetas = []
    for i in range(3):
        thetas.append({k: v + (i + 1) * 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
        save_file(thetas[-1], tmp_path / f"m{i}.safetensors")
    weights = [1.0, 0.6, 1.4]
    params = {
        "density": 0.6,
        "gamma": 0.05,
        "weight": dict(zip(["m0", "m1", "m2"], weights, strict=True)),
        "lambda": 0.9,
    }
    recipe = parse_recipe(
        {
            "version": 1,
            "base": str(tmp_path / "base.safetensors"),
            "models": [{"source": str(tmp_path / f"m{i}.safetensors"), "name": f"m{i}"} for i in range(3)],
            "method": method,
            "parameters": params,
        }
    )
    run_recipe(recipe, output=tmp_path / "out", block_entries=block_entries)
    out = load_file(tmp_path / "out" / "model.safetensors")
    for key in base:
        deltas = [sorted_band(theta[key] - base[key], 0.6, 0.05).reshape(-1) for theta in thetas]
        vector = mix(deltas, weights, method == "breadcrumbs_ties", False).reshape(base[key].shape)
        torch.testing.assert_close(out[key], base[key] + 0.9 * vector, rtol=0, atol=1e-6)
