"""The reference outputs of nik-dim/tall_masks @ d10af8b on the T4 fixture (copied from shared/golden)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from safetensors.torch import load_file

GOLDEN = Path(__file__).parent / "data" / "golden"
FIXTURE = GOLDEN / "fixture"
EXPECTED = GOLDEN / "expected"
TASKS = ["task_00", "task_01", "task_02", "task_03"]
LAMBDAS = [0.2, 0.3, 0.4, 0.5, 0.6]


def recipe(method: str, parameters: dict | None = None) -> dict:
    return {
        "version": 1,
        "base": str(FIXTURE / "base.safetensors"),
        "models": [str(FIXTURE / f"{t}.safetensors") for t in TASKS],
        "method": method,
        "parameters": parameters or {},
    }


@cache
def expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(EXPECTED / f"{name}.safetensors")


@cache
def base() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "base.safetensors")


@cache
def diagnostics() -> dict:
    return json.loads((EXPECTED / "manifest.json").read_text())["diagnostics"]


def assert_masks_equal(mask: dict[str, torch.Tensor], name: str) -> None:
    """Masks exactly: 0 differing bits."""
    ref = expected(name)
    assert set(mask) == set(ref), name
    for key, value in ref.items():
        differing = int(((mask[key] != 0) != (value != 0)).sum())
        assert differing == 0, f"{name} {key}: {differing} mask bits differ"


def assert_written_vector(
    written: dict[str, torch.Tensor], vector: dict[str, torch.Tensor], name: str, scaling: float = 1.0
) -> None:
    """A written model equals θ0 + α·v bit for bit, computed in float32 as the reference applies a vector.

    That is stricter than the golden README's tolerance (half a float32 spacing of θ0 after reading v back);
    the support is checked on its own: θ0 unchanged where v = 0, changed wherever α·v is
    above θ0's float32 spacing.
    """
    theta0 = base()
    assert set(written) == set(vector), name
    for key, v in vector.items():
        out, b = written[key], theta0[key]
        assert out.dtype == torch.float32 and out.shape == v.shape, key
        want = b + v * scaling
        differing = int((out != want).sum())
        assert differing == 0, (
            f"{name} {key}: {differing} entries differ, max {float((out - want).abs().max())}"
        )
        zero = v == 0
        assert torch.equal(out[zero], b[zero]), f"{name} {key}: entries with v = 0 changed θ0"
        spacing = torch.nextafter(b.abs(), torch.tensor(float("inf"))) - b.abs()
        visible = (v * scaling).abs() > spacing
        assert bool((out[visible] != b[visible]).all()), f"{name} {key}: a nonzero entry left θ0 unchanged"


def scaled(name: str, mask_name: str | None = None) -> dict[str, torch.Tensor]:
    """An expected vector, optionally multiplied by an expected mask (reconstructions, consensus)."""
    vector = expected(name)
    if mask_name is None:
        return vector
    mask = expected(mask_name)
    return {k: v * mask[k].float() for k, v in vector.items()}
