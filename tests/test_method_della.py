"""DELLA (`della`, `della_linear`): keep probabilities by magnitude rank within each row, L1 rescaling, the
consensus, and the same bytes whatever the piece size."""

from __future__ import annotations

import pytest
import torch

from hubmerge.methods.della import keep_probabilities
from hubmerge.methods.generalized import keyed_uniform, mix
from tests.method_inputs import make_models, merge


def test_keep_probabilities_rise_with_the_rank_in_each_row():
    tau = torch.tensor([[0.1, -0.5, 0.3, 0.0, 2.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    p = keep_probabilities(tau.reshape(-1), (2, 5), 0.5, 0.2).reshape(2, 5)
    expected_rows = torch.tensor([[0.4, 0.6, 0.5, 0.3, 0.7], [0.7, 0.6, 0.5, 0.4, 0.3]])
    torch.testing.assert_close(p, expected_rows)
    one_row = keep_probabilities(torch.tensor([3.0, 1.0, 2.0]), (3,), 0.5, 0.1)
    torch.testing.assert_close(one_row, torch.tensor([0.6, 0.4, 0.5]))


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_equals_a_direct_computation_at_any_piece_size(tmp_path, method):
    base, thetas = make_models(tmp_path, 3)
    params = {
        "density": 0.4,
        "epsilon": 0.1,
        "lambda": 0.8,
        "seed": 9,
        "weight": {"m0": 1.0, "m1": 2.0, "m2": 0.5},
    }
    outs = [merge(tmp_path, method, params, 3, name=str(b), block_entries=b) for b in (1 << 21, 64)]
    for key in base:
        assert torch.equal(outs[0][key], outs[1][key])
        shape = tuple(base[key].shape)
        deltas = []
        for t, theta in enumerate(thetas):
            tau = (theta[key] - base[key]).reshape(-1)
            p = keep_probabilities(tau, shape, 0.4, 0.1)
            keep = keyed_uniform(9, key, t, 0, tau.numel(), tau.device) < (p.double() * 2**32).round().long()
            kept = tau * keep
            deltas.append(
                kept * (tau.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)).item()
            )
        consensus = method == "della"
        vector = mix(deltas, [1.0, 2.0, 0.5], consensus, consensus).reshape(shape)
        torch.testing.assert_close(outs[0][key], base[key] + 0.8 * vector, rtol=0, atol=2e-6)


def test_della_keep_rate_is_the_density(tmp_path):
    base, thetas = make_models(tmp_path, 1)
    out = merge(tmp_path, "della_linear", {"density": 0.3, "epsilon": 0.2}, 1)
    tau = thetas[0]["w"] - base["w"]
    kept = (out["w"] - base["w"]) != 0
    assert abs(kept.float().sum() / (tau != 0).sum() - 0.3) < 0.05


def test_epsilon_beyond_the_density_is_refused(tmp_path):
    from hubmerge.errors import HubmergeError

    make_models(tmp_path, 2)
    with pytest.raises(HubmergeError, match=r"parameters.epsilon: density ± epsilon must lie in \(0, 1\)"):
        merge(tmp_path, "della", {"density": 0.1, "epsilon": 0.15}, 2)
