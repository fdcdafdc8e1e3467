"""Small seeded base and fine-tunes for the method tests, saved as single safetensors files (not a test
module)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hubmerge import parse_recipe, run_recipe

SHAPES = {"w": (48, 40), "b": (40,), "conv": (6, 5, 4)}


def make_models(directory: Path, tasks: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    """θ0 and `tasks` fine-tunes θ0 + noise of growing scale, with some τ entries exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(shape, generator=gen) for k, shape in SHAPES.items()}
    save_file(base, directory / "base.safetensors")
    thetas = []
    for i in range(tasks):
        theta = {}
        for k, v in base.items():
            noise = (i + 1) * 0.01 * torch.randn(v.shape, generator=gen)
            theta[k] = v + noise * (torch.rand(v.shape, generator=gen) > 0.1)
        thetas.append(theta)
        save_file(theta, directory / f"m{i}.safetensors")
    return base, thetas


def merge(directory: Path, method: str, parameters: dict, tasks: int, name: str = "out", **kwargs) -> dict:
    """Run `method` over the models of `make_models` and return the merged tensors."""
    recipe = parse_recipe(
        {
            "version": 1,
            "base": str(directory / "base.safetensors"),
            "models": [
                {"source": str(directory / f"m{i}.safetensors"), "name": f"m{i}"} for i in range(tasks)
            ],
            "method": method,
            "parameters": parameters,
        }
    )
    run_recipe(recipe, output=directory / name, **kwargs)
    return load_file(directory / name / "model.safetensors")
