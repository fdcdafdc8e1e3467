"""The fused CPU kernels give the same bits as the tensor functions they replace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hubmerge import fused, parse_recipe, run_recipe
from hubmerge.methods.tall import agreement_histograms, consensus_mask, mask_count, tall_masks
from hubmerge.methods.task_arithmetic import apply_vector, sum_in_task_order, task_vectors
from hubmerge.methods.ties import disjoint_merge, elect_sign, resolve_zero_signs, sign_count, trim
from hubmerge.methods.topk import (
    high_codes_,
    high_histogram,
    locate,
    low_codes_,
    low_histogram,
    magnitude_bits,
)
from tests.test_streaming_property import same_bits

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C compiler for the fused kernels")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SPECIAL = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 65504.0]


def pieces(
    n: int, tasks: int, dtypes: list[torch.dtype], seed: int, special: bool = True
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """θ0 and θ_t on a coarse grid, so task vectors tie, cancel and sit exactly on thresholds; with
    signed zeros, infinities, NaN and subnormals sprinkled in."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 9, (n,), generator=generator).float() / 4
    models = [base + torch.randint(-3, 4, (n,), generator=generator).float() / 8 for _ in range(tasks)]
    tensors = [base, *models]
    if special:
        for tensor in tensors:
            where = torch.randint(0, n, (len(SPECIAL) * 2,), generator=generator)
            tensor[where] = torch.tensor(SPECIAL * 2)
    base_dtype, *model_dtypes = (dtypes * (tasks + 1))[: tasks + 1]
    return tensors[0].to(base_dtype), [m.to(d) for m, d in zip(tensors[1:], model_dtypes, strict=True)]


# n: one block, a block and a tail, and enough entries to be split across threads
SIZES = [1, 511, 1300, 200_003]
DTYPE_MIXES = [
    [torch.bfloat16],
    [torch.float16],
    [torch.float32],
    [torch.float32, torch.bfloat16, torch.float16],
]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
def test_histograms_match_the_radix_codes(n, dtypes):
    base, thetas = pieces(n, 3, dtypes, seed=n)
    taus = task_vectors(base, thetas)
    high = torch.zeros(3, 1 << 15, dtype=torch.int64)
    fused.magnitude_histograms(base, thetas, None, high)
    for tau, counts in zip(taus, high, strict=True):
        assert torch.equal(counts, high_histogram(high_codes_(magnitude_bits(tau))))
    buckets = [locate(h, max(1, n // 2))[0] for h in high]
    low = torch.zeros(3, (1 << 16) + 2, dtype=torch.int64)
    fused.magnitude_histograms(base, thetas, buckets, low)
    for tau, counts, bucket in zip(taus, low, buckets, strict=True):
        codes = low_codes_(magnitude_bits(tau), bucket)
        assert torch.equal(counts[1:-1], low_histogram(codes))
        assert int(counts[0]) == int((codes == 0).sum()) and int(counts[-1]) == int((codes > 1 << 16).sum())


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
def test_task_arithmetic_matches_the_task_order_sum(n, dtypes):
    base, thetas = pieces(n, 5, dtypes, seed=3 * n)
    vector = sum_in_task_order(task_vectors(base, thetas))
    for scaling, expected in ((None, vector), (0.3, apply_vector(base, vector, 0.3))):
        out = torch.empty(n)
        fused.task_arithmetic(base, thetas, out, scaling)
        assert same_bits(out, expected)


def torch_ties(base, thetas, thresholds, majority, merge, scaling):
    trimmed = trim(task_vectors(base, thetas), thresholds)
    elected = elect_sign(trimmed)
    merged = disjoint_merge(trimmed, resolve_zero_signs(elected, majority), merge)
    return (merged if scaling is None else apply_vector(base, merged, scaling)), sign_count(elected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
@pytest.mark.parametrize("majority", [-1, 0, 1])
def test_ties_matches_trim_elect_and_disjoint_merge(n, dtypes, merge, majority):
    # NaN payloads of `max` follow torch's vector and scalar loops differently, so no NaN there
    base, thetas = pieces(n, 4, dtypes, seed=n + majority, special=merge != "max")
    thresholds = [0.25, None, 0.125, 0.375]
    for scaling in (None, 0.3):
        expected, expected_signs = torch_ties(base, thetas, thresholds, majority, merge, scaling)
        out = torch.empty(n)
        signs = fused.ties(base, thetas, thresholds, majority, merge, out, scaling)
        assert same_bits(out, expected), (merge, scaling)
        assert signs == expected_signs
    assert fused.ties(base, thetas, thresholds, majority, None) == expected_signs


def torch_tall(base, thetas, lambdas, tau_mtl, k, scaling):
    taus = task_vectors(base, thetas)
    if tau_mtl is None:
        tau_mtl = sum_in_task_order(taus)
    masks = tall_masks(base, thetas, tau_mtl, lambdas, taus)
    count = mask_count(masks)
    active = taus[0] != 0
    for tau in taus[1:]:
        active |= tau != 0
    histogram, histogram_active = agreement_histograms(count, active, len(thetas))
    kept = 0
    if k is not None:
        keep = consensus_mask(count, k)
        kept = int(keep.sum())
        tau_mtl = tau_mtl * keep
    result = tau_mtl if scaling is None else apply_vector(base, tau_mtl, scaling)
    return result, torch.stack(masks), histogram, histogram_active, kept


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("given_vector", [False, True])
@pytest.mark.parametrize("k", [None, 0, 2])
def test_tall_matches_masks_statistics_and_consensus(n, dtypes, given_vector, k):
    base, thetas = pieces(n, 3, dtypes, seed=2 * n + (k or 0))
    lambdas = [0.4, 0.2, 1.0]
    tau_mtl = None
    if given_vector:
        tau_mtl = torch.randint(-4, 5, (n,), generator=torch.Generator().manual_seed(n)).float() / 8
        tau_mtl[: min(n, 3)] = torch.tensor([-0.0, float("nan"), 0.0])[: min(n, 3)]
    for scaling in (None, 0.7):
        result, masks, histogram, active, kept = torch_tall(base, thetas, lambdas, tau_mtl, k, scaling)
        out = torch.empty(n)
        got_masks = torch.empty(3, n, dtype=torch.bool)
        counts = fused.tall(base, thetas, lambdas, tau_mtl, k, got_masks, out, scaling)
        assert same_bits(out, result)
        assert torch.equal(got_masks, masks)
        assert torch.equal(counts[:4] + counts[4:8], histogram) and torch.equal(counts[4:8], active)
        assert counts[8:11].tolist() == masks.sum(1).tolist()
        assert int(counts[11]) == kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernels_count_the_nonfinite_inputs_they_load(dtype):
    """Every kernel reports the NaN/±Inf entries of the inputs it loaded; `nonfinite_count` counts a piece."""
    n = 300_001  # split across threads
    base = torch.randn(n).to(dtype)
    thetas = [torch.randn(n).to(dtype) for _ in range(3)]
    base[7], thetas[0][200_000], thetas[2][n - 1] = float("nan"), float("inf"), float("-inf")
    thetas[1][5] = float("nan")
    out = torch.empty(n)
    fused.take_nonfinite()
    fused.task_arithmetic(base, thetas, out)
    assert fused.take_nonfinite() == 4 and fused.take_nonfinite() == 0
    fused.magnitude_histograms(base, thetas, None, torch.zeros(3, 1 << 16, dtype=torch.int64))
    assert fused.take_nonfinite() == 4
    fused.tall(base, thetas, [0.4] * 3)
    assert fused.take_nonfinite() >= 4  # loads the task vectors twice without a given τ_MTL
    fused.ties(base, thetas, [None] * 3, 0, "mean", out)
    assert fused.take_nonfinite() == 4
    assert [fused.nonfinite_count(x) for x in (base, *thetas)] == [1, 1, 1, 1]
    clean = [torch.randn(n).to(dtype) for _ in range(2)]
    fused.task_arithmetic(clean[0], clean[1:], out)
    assert fused.take_nonfinite() == 0 and fused.nonfinite_count(clean[0]) == 0


def test_tall_writes_in_place_over_its_vector():
    base, thetas = pieces(1300, 3, [torch.bfloat16], seed=5)
    tau_mtl = torch.linspace(-1, 1, 1300)
    expected = torch_tall(base, thetas, [0.4] * 3, tau_mtl, 2, None)[0]
    fused.tall(base, thetas, [0.4] * 3, tau_mtl, 2, None, tau_mtl)
    assert same_bits(tau_mtl, expected)


def test_unsupported_inputs_are_left_to_torch():
    x = torch.zeros(4, 4)
    assert fused.supports(x, x.to(torch.bfloat16))
    assert not fused.supports(x, x.double())
    assert not fused.supports(x.t())
    assert not fused.supports(x.to(torch.float8_e4m3fn))


def test_without_a_compiler_the_kernels_are_off_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler-hubmerge")
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path))
    fused.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler-hubmerge"):
            assert fused.library() is None
        monkeypatch.setenv("HUBMERGE_FUSED", "0")
        fused.library.cache_clear()
        assert fused.library() is None
    finally:
        monkeypatch.undo()
        fused.library.cache_clear()
    assert fused.library() is not None


def test_the_compiled_library_is_cached_by_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path))
    fused.library.cache_clear()
    try:
        assert fused.library() is not None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left beside it
        assert built[0].stat().st_mode & 0o555 == 0o555, "other users of a shared cache can load it"
        fused.library.cache_clear()
        stamp = built[0].stat().st_mtime_ns
        assert fused.library() is not None and built[0].stat().st_mtime_ns == stamp
    finally:
        monkeypatch.undo()
        fused.library.cache_clear()


ENGINE_RECIPES = [
    ("task_arithmetic", {"scaling": 0.3}),
    ("weight_average", {}),
    ("ties", {"density": 0.3, "merge": "mean"}),
    ("ties", {"density": 0.3, "merge": "max", "trim": "tensor"}),
    ("tall_masks", {"lambda": 0.4}),
    ("tall_masks", {"merge": "ties", "lambda": {"t0": 0.2, "t1": 0.5, "t2": 1.0}}),
    ("consensus", {"k": 2, "scaling": 0.7}),
    ("magnitude_masking", {"density": 0.25}),
]


@pytest.mark.parametrize(("method", "parameters"), ENGINE_RECIPES, ids=lambda x: str(x))
def test_engine_output_is_the_same_with_and_without_the_kernels(tmp_path, method, parameters):
    """Every output byte and statistic; the float64 tensor is computed with torch operations within the
    same passes as the fused pieces (small blocks: many pieces of each)."""
    shapes = {"a.weight": (40, 24), "b.bias": (24,), "c.weight": (33, 7), "d.weight": (16, 16)}
    dtypes = {"a.weight": torch.bfloat16, "b.bias": torch.float16, "c.weight": torch.float32}
    generator = torch.Generator().manual_seed(7)
    tensors: list[dict] = []
    for _ in range(4):
        tensors.append({})
        for key, shape in shapes.items():
            grid = torch.randint(-6, 7, shape, generator=generator).double() / 8
            tensors[-1][key] = grid.to(dtypes.get(key, torch.float64))
    base = tensors[0]
    models = [{k: base[k] + m[k] for k in shapes} for m in tensors[1:]]
    for model in models:
        model["a.weight"][0, :3] = torch.tensor([float("nan"), -0.0, float("inf")])
    names = {"models": [{"source": str(tmp_path / f"t{i}.safetensors"), "name": f"t{i}"} for i in range(3)]}
    save_file(base, tmp_path / "base.safetensors")
    for i, model in enumerate(models):
        save_file(model, tmp_path / f"t{i}.safetensors")
    recipe = parse_recipe(
        {"version": 1, "base": str(tmp_path / "base.safetensors"), "method": method, "parameters": parameters}
        | names
    )
    outputs = {}
    for kernels in (True, False):
        out = tmp_path / f"out-{kernels}"
        result = run_recipe(
            recipe,
            output=out,
            block_entries=64,
            fused_kernels=kernels,
            model_card=False,
            allow_nonfinite=True,
        )
        files = {
            str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.suffix != ".json"
        }
        statistics = {k: v for k, v in result.record.items() if k not in ("seconds", "created", "bytes_read")}
        outputs[kernels] = files, statistics
    assert outputs[True][0] and outputs[True][0].keys() == outputs[False][0].keys()
    for name, content in outputs[True][0].items():
        assert content == outputs[False][0][name], name
    assert outputs[True][1] == outputs[False][1]
    assert [(r["model"], r["tensor"], r["count"]) for r in outputs[True][1]["nonfinite"]] == [
        (f"t{i}", "a.weight", 2) for i in range(3)
    ]


def test_the_cache_directory_needs_no_home_when_it_is_named(tmp_path, monkeypatch):
    """Containers often run as a user without a home directory; XDG_CACHE_HOME or HUBMERGE_CACHE suffice."""

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv("HUBMERGE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(Path, "home", no_home)
    assert fused.cache_directory() == tmp_path / "hubmerge"
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "kernels-here"))
    assert fused.cache_directory() == tmp_path / "kernels-here"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtypes", DTYPE_MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["stored32", "storedbf16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["out32", "outbf16"])
def test_rebuild_matches_the_artifact_rebuild_and_its_casts(n, dtypes, stored, out_dtype):
    from hubmerge.artifacts import pack_bits, rebuild

    base, (theta,) = pieces(n, 1, dtypes, seed=n, special=False)
    tau = theta.float() - base.float()
    generator = torch.Generator().manual_seed(n + 1)
    where = torch.randint(0, n, (len(SPECIAL),), generator=generator)
    tau[where] = torch.tensor(SPECIAL[: len(where)])  # NaN/Inf/±0/subnormal τ, in and out of the mask
    mask = torch.rand(n, generator=generator) < 0.5
    out = torch.full((n,), 7.0, dtype=out_dtype)
    assert fused.rebuild_into(base, tau, pack_bits(mask), stored, out)
    expected = rebuild(base, tau, mask).to(stored).to(out_dtype)
    finite = ~expected.isnan()
    assert torch.equal(
        out.isnan(), ~finite
    )  # a NaN's payload follows torch's vectorized cast, not its tail's
    assert same_bits(out[finite], expected[finite])


def test_rebuild_leaves_float16_and_gpu_cases_to_torch():
    base, tau, packed = torch.zeros(16), torch.ones(16), torch.zeros(2, dtype=torch.uint8)
    assert not fused.rebuild_into(base, tau, packed, torch.float16, torch.empty(16))
    assert not fused.rebuild_into(base, tau, packed, torch.float32, torch.empty(16, dtype=torch.float16))
