"""The pure tensor functions, on cases whose answers are known from the reference's semantics."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hubmerge import parse_recipe, run_recipe
from hubmerge.artifacts import pack_bits, unpack_bits
from hubmerge.engine import row_blocks
from hubmerge.methods import METHODS
from hubmerge.methods.tall import agreement_histograms, consensus_mask, mask_count, tall_masks
from hubmerge.methods.task_arithmetic import apply_vector, sum_in_task_order, task_vectors
from hubmerge.methods.ties import disjoint_merge, elect_sign, resolve_zero_signs, trim
from hubmerge.methods.topk import (
    high_codes_,
    high_histogram,
    kth_rank,
    locate,
    low_codes_,
    low_histogram,
    magnitude_bits,
    tensor_threshold,
    threshold_value,
    topk_mask,
)
from hubmerge.sources import TensorInfo


def radix_threshold(pieces: list[torch.Tensor], density: float) -> float | None:
    d = sum(p.numel() for p in pieces)
    rank = kth_rank(d, density)
    if rank == 0:
        return None
    high = sum(high_histogram(high_codes_(magnitude_bits(p))) for p in pieces)
    bucket, within = locate(high, rank)
    low = sum(low_histogram(low_codes_(magnitude_bits(p), bucket)) for p in pieces)
    return threshold_value(bucket, locate(low, within)[0])


@pytest.mark.parametrize(
    ("values", "density", "kept"),
    [
        (list(range(1, 11)), 0.2, 3),
        ([1, 2, 2, 2, 3], 0.2, 4),
        ([0, 0, 0, 0, 5], 0.2, 5),
        ([4, -4, 1], 1.0, 3),
    ],
)
def test_topk_keeps_ties_at_the_threshold(values, density, kept):
    x = torch.tensor(values, dtype=torch.float32)
    assert int(topk_mask(x, radix_threshold([x], density)).sum()) == kept
    assert int(topk_mask(x, tensor_threshold(x, density)).sum()) == kept


floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(floats, st.sampled_from([0.0, -0.0, 2.0**-12, -(2.0**-12), 1e-40])),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([0.01, 0.1, 0.2, 0.5, 0.9, 1.0]),
    st.integers(1, 7),
)
def test_radix_selection_equals_kthvalue_over_pieces(values, density, num_pieces):
    x = torch.tensor(values, dtype=torch.float32)
    rank = kth_rank(x.numel(), density)
    expected = None if rank == 0 else x.abs().kthvalue(rank).values.item()
    assert radix_threshold(list(x.tensor_split(num_pieces)), density) == expected


def test_kth_rank_uses_int_of_the_double_product():
    assert kth_rank(193_377, 0.2) == 154_702  # golden T4: int(d·p) = 38,675
    assert kth_rank(113_448_705, 0.2) == 113_448_705 - 22_689_741
    assert kth_rank(10, 1.0) == 0


def test_ties_zero_majority_keeps_negative_entries():
    """The reference's quirk: with a model-wide majority of 0, s = 0 coordinates keep negative entries."""
    taus = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([0.0, 0.0, -2.0])]
    trimmed = trim(taus, [None, None])
    signs = elect_sign(trimmed)
    assert signs.tolist() == [1.0, -1.0, 0.0]
    resolved = resolve_zero_signs(signs, majority=int(signs.sum().sign()))
    assert disjoint_merge(trimmed, resolved, "sum").tolist() == [1.0, -1.0, -2.0]
    assert disjoint_merge(trimmed, resolved, "mean").tolist() == [1.0, -1.0, -2.0]
    assert disjoint_merge(trimmed, resolved, "max").tolist() == [1.0, -1.0, 0.0]


def test_ties_mean_divides_by_agreeing_nonzero_entries():
    taus = [torch.tensor([3.0, 1.0]), torch.tensor([1.0, -5.0]), torch.tensor([0.0, -1.0])]
    signs = elect_sign(taus)
    assert disjoint_merge(taus, signs, "mean").tolist() == [2.0, -3.0]


def test_ties_negative_majority_resolves_cancellations_through_the_engine(tmp_path):
    """Coordinate 3 cancels (+1 − 1); three coordinates vote −1, so it keeps the negative entry."""
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([-1.0, -1.0, -1.0, 1.0])}, {"w": torch.tensor([-1.0, -1.0, -1.0, -1.0])}]
    result, merged = run_ties(tmp_path, base, models, "sum")
    assert result.record["stats"]["ties_sign_total"] == -3
    assert result.record["bytes_read"] == 2 * 3 * 4 * 4  # the sample (its only piece) guessed right: 1 pass
    assert merged["w"].tolist() == [-2.0, -2.0, -2.0, -1.0]


def single_file_recipe(tmp_path, base: dict, models: list[dict], method: str, parameters: dict | None = None):
    """The recipe of `method` over base and models saved as single safetensors files in tmp_path."""
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"t{i}.safetensors")
    return parse_recipe(
        {
            "version": 1,
            "base": str(tmp_path / "base.safetensors"),
            "models": [str(tmp_path / f"t{i}.safetensors") for i in range(len(models))],
            "method": method,
            "parameters": parameters or {},
        }
    )


def run_ties(tmp_path, base: dict, models: list[dict], merge: str, block_entries: int = 1 << 21):
    """TIES with density 1 on single-file models through the engine: (run result, merged tensors)."""
    recipe = single_file_recipe(tmp_path, base, models, "ties", {"density": 1.0, "merge": merge})
    result = run_recipe(recipe, output=tmp_path / "out", block_entries=block_entries)
    return result, load_file(tmp_path / "out" / "model.safetensors")


@pytest.mark.parametrize("merge", ["mean", "sum"])
def test_ties_output_pass_runs_again_after_a_wrong_majority_guess(tmp_path, merge):
    """Plain TIES guesses the majority from every 16th piece: here only piece "a", which cancels exactly, so
    the guess is 0 (keep negatives); the output pass counts +4 in "b", so it must run again."""
    base = {"a": torch.zeros(2), "b": torch.zeros(4)}
    models = [
        {"a": torch.tensor([2.0, -3.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])},
        {"a": torch.tensor([-2.0, 3.0]), "b": torch.tensor([1.0, 1.0, 1.0, 1.0])},
    ]
    result, merged = run_ties(tmp_path, base, models, merge, block_entries=2)
    assert result.record["stats"]["ties_sign_total"] == 4
    assert merged["a"].tolist() == [2.0, 3.0]  # the positive entries: the majority is +1
    assert merged["b"].tolist() == ([1.0] * 4 if merge == "mean" else [2.0] * 4)
    one_pass = 3 * 6 * 4  # 3 checkpoints, 6 float32 entries
    piece_a = 3 * 2 * 4
    assert result.record["bytes_read"] == piece_a + 2 * one_pass  # sample, output, output again


def test_tall_mask_is_strict_and_uses_weight_form():
    base = torch.tensor([0.5, 0.5, 0.5, 0.5])
    finetuned = torch.tensor([0.5, 0.75, 1.0, 0.25])
    tau_mtl = torch.tensor([0.0, 0.25, 1.0, 0.25])
    at_zero, at_half = tall_masks(base, [finetuned, finetuned], tau_mtl, [0.0, 0.5])
    assert at_zero.tolist() == [False, True, True, True]
    # |θ0 − θ| vs λ·|θ0 + τ_MTL − θ|: [0 > 0, .25 > 0, .5 > .25, .25 > .25]
    assert at_half.tolist() == [False, True, True, False]


def test_lambda_multiplies_in_float32():
    """A float64 product rounded afterwards flips near-tie bits; the reference multiplies in float32."""
    lam = 0.6
    distance = torch.rand(10_000, generator=torch.Generator().manual_seed(0))
    product32 = distance * lam
    product64 = (distance.double() * lam).float()
    # θ0 = λ·distance (float32), θ_t = 0, τ_MTL = distance − θ0 (exact by Sterbenz since λ >= 1/2), so
    # |θ0 − θ_t| equals the float32 product exactly: a strict > never holds.
    (mask,) = tall_masks(product32, [torch.zeros(10_000)], distance - product32, [lam])
    assert not bool(mask.any())
    assert bool((product32 > product64).any()), "a float64 product would have set some of these bits"


def test_consensus_and_agreement_counts():
    masks = [torch.tensor([1, 1, 0, 0], dtype=torch.bool), torch.tensor([1, 0, 1, 0], dtype=torch.bool)]
    count = mask_count(masks)
    assert count.tolist() == [2, 1, 1, 0]
    assert consensus_mask(count, 2).tolist() == [True, False, False, False]
    assert consensus_mask(count, 0).all() and not consensus_mask(count, 3).any()
    all_entries, active = agreement_histograms(count, torch.tensor([True, True, False, False]), 2)
    assert all_entries.tolist() == [1, 2, 1] and active.tolist() == [0, 1, 1]


def test_task_order_sum_is_sequential():
    parts = [torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])]
    assert sum_in_task_order(parts).item() == 0.0  # (1e8 + 1) rounds to 1e8 in float32


def test_pack_bits_layout_is_big_endian_within_bytes():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert pack_bits(mask).tolist() == [0b10000001, 0b11000000]


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 100), st.integers(0, 2**16))
def test_unpack_bits_inverts_pack_bits(numel, seed):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(seed)) < 0.3
    packed = pack_bits(mask)
    assert packed.numel() == (numel + 7) // 8
    assert torch.equal(unpack_bits(packed, numel), mask)


@pytest.mark.parametrize("shape", [(), (5,), (100, 3), (7, 9), (1000, 1), (3, 4, 5)])
@pytest.mark.parametrize("block_entries", [1, 10, 64, 1 << 22])
def test_row_blocks_cover_rows_in_multiples_of_eight_entries(shape, block_entries):
    info = TensorInfo(shape, torch.float32)
    blocks = row_blocks(info, block_entries)
    if blocks == [None]:
        return
    row = info.numel // shape[0]
    assert blocks[0][0] == 0 and blocks[-1][1] == shape[0]
    for (_, stop), (start, _) in itertools.pairwise(blocks):
        assert stop == start
    assert all((stop - start) * row % 8 == 0 for start, stop in blocks[:-1])


def test_defaults_are_the_reference_settings():
    def resolved(method, params=None):
        return METHODS[method].resolved_parameters(params or {}, ["a", "b"])

    assert resolved("ties") == {"density": 0.2, "merge": "mean", "trim": "global", "scaling": 1.0}
    assert resolved("tall_masks", {"merge": "ties"})["ties"] == {
        "density": 0.2,
        "merge": "sum",
        "trim": "global",
    }
    assert resolved("consensus") == {"merge": "task_arithmetic", "lambda": 0.4, "k": 2, "scaling": 1.0}
    assert resolved("magnitude_masking") == {"density": 0.1}
    assert METHODS["weight_average"].spec({}, ["a", "b", "c"]).scaling == 1.0 / 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_task_vector_and_apply_vector_equal_the_upcast_first_arithmetic_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(4096, generator=gen) * 3).to(dtype)
    theta = (base.double() + torch.randn(4096, generator=gen) * 1e-2).to(dtype)
    base[:3] = torch.tensor([0.0, -0.0, 1e-30]).to(dtype)
    theta[:3] = torch.tensor([-0.0, -0.0, -1e-30]).to(dtype)
    tau = task_vectors(base, [theta])[0]
    want = theta.float() - base.float()
    assert tau.dtype == torch.float32
    assert torch.equal(tau.view(torch.int32), want.view(torch.int32))
    # NaN on both sides of θ0 + α·τ: the sum keeps θ0's NaN, as θ0 comes first in the reference
    base[3] = float("nan")
    tau[3] = -torch.tensor(float("nan"))
    for scaling in (1.0, 0.3):
        got = apply_vector(base, tau, scaling)
        assert torch.equal(got.view(torch.int32), (base.float() + tau * scaling).view(torch.int32))


@pytest.mark.parametrize("method", ["ties", "tall_masks"])
def test_whole_piece_spans_as_on_a_gpu_handle_empty_tensors_and_match_small_spans(tmp_path, method):
    """span_entries=0 computes whole pieces (the GPU setting); an empty float tensor has no span at all."""
    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 5, generator=gen), "empty": torch.zeros(0, 3)}
    models = [{k: v + torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(3)]
    recipe = single_file_recipe(tmp_path, base, models, method)
    outputs = []
    for span_entries in (0, 4):
        out = tmp_path / f"out{span_entries}"
        run_recipe(recipe, output=out, block_entries=8, span_entries=span_entries)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.rglob("*.safetensors"))})
    assert outputs[0] and outputs[0] == outputs[1]


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16, torch.float16])
def test_rebuild_packed_into_matches_rebuild_with_and_without_the_kernel(stored, monkeypatch):
    from hubmerge import fused
    from hubmerge.artifacts import REBUILD_PIECE_ENTRIES, rebuild, rebuild_packed_into

    n = 2 * REBUILD_PIECE_ENTRIES + 13  # several pieces and a tail
    generator = torch.Generator().manual_seed(4)
    theta0 = torch.randn(n, generator=generator).to(torch.bfloat16)
    tau = 0.01 * torch.randn(n, generator=generator)
    mask = torch.rand(n, generator=generator) < 0.4
    expected = rebuild(theta0, tau, mask).to(stored).float()
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(fused, "rebuild_into", lambda *args: False)
        out = torch.empty(n)
        rebuild_packed_into(theta0, tau, pack_bits(mask), stored, out)
        assert torch.equal(out, expected), (stored, kernel)
