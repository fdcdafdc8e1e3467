"""SLERP and NuSLERP against whole-tensor computations of mergekit's formulas, and the same
bytes whatever the piece size (their per-tensor sums come from a statistics pass)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from tests.method_inputs import make_models, merge

ATOL = 2e-6


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dim: int, flatten: bool) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif dim != -1:
        v0, v1 = v0.transpose(dim, -1), v1.transpose(dim, -1)
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    if dim != -1 and not flatten:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


@pytest.mark.parametrize("block_entries", [1 << 21, 64])
def test_slerp(tmp_path, block_entries):
    base, thetas = make_models(tmp_path, 1)
    out = merge(tmp_path, "slerp", {"t": 0.3}, 1, block_entries=block_entries)
    for key in base:
        torch.testing.assert_close(out[key], slerp(0.3, base[key], thetas[0][key]).float(), rtol=0, atol=ATOL)


def test_slerp_of_collinear_tensors_is_linear(tmp_path):
    base, _ = make_models(tmp_path, 1)
    save_file({k: 1.5 * v for k, v in base.items()}, tmp_path / "m0.safetensors")
    out = merge(tmp_path, "slerp", {"t": 0.25}, 1)
    for key in base:
        torch.testing.assert_close(out[key], base[key] * 1.125, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("flatten", "row_wise"), [(True, False), (False, False), (False, True)], ids=["flat", "rows", "columns"]
)
@pytest.mark.parametrize("block_entries", [1 << 21, 64])
def test_nuslerp(tmp_path, flatten, row_wise, block_entries):
    base, thetas = make_models(tmp_path, 2)
    params = {"weight": {"m0": 0.3, "m1": 0.7}, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    out = merge(tmp_path, "nuslerp", params, 2, block_entries=block_entries)
    for key in base:
        taus = [t[key] - base[key] for t in thetas]
        expected = base[key] + nuslerp(0.7, taus[0], taus[1], 0 if row_wise else -1, flatten)
        torch.testing.assert_close(out[key], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("method", "tasks"), [("slerp", 2), ("nuslerp", 3)])
def test_task_count_is_checked_with_the_recipe(tmp_path, method, tasks):
    from hubmerge.errors import HubmergeError

    make_models(tmp_path, tasks)
    with pytest.raises(HubmergeError, match=f"{method} takes"):
        merge(tmp_path, method, {}, tasks)
