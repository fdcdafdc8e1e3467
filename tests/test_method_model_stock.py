"""Model Stock against a whole-tensor computation of mergekit's formula, per tensor and per row, whatever the
piece size (the cosines come from a statistics pass)."""

from __future__ import annotations

import pytest
import torch

from hubmerge.errors import HubmergeError
from tests.method_inputs import make_models, merge

ATOL = 2e-6


def model_stock(base: torch.Tensor, thetas: list[torch.Tensor], filter_wise: bool) -> torch.Tensor:
    w0 = base.reshape(1, -1) if base.dim() == 1 or not filter_wise else base
    ws = [t.reshape(w0.shape) for t in thetas]
    if not filter_wise:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cos.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("block_entries", [1 << 21, 64])
def test_model_stock(tmp_path, filter_wise, block_entries):
    base, thetas = make_models(tmp_path, 3)
    out = merge(tmp_path, "model_stock", {"filter_wise": filter_wise}, 3, block_entries=block_entries)
    for key in base:
        expected = model_stock(base[key], [t[key] for t in thetas], filter_wise)
        torch.testing.assert_close(out[key], expected, rtol=0, atol=ATOL)


def test_model_stock_needs_two_fine_tunes(tmp_path):
    make_models(tmp_path, 1)
    with pytest.raises(HubmergeError, match="model_stock takes at least 2 fine-tuned models"):
        merge(tmp_path, "model_stock", {}, 1)
