"""Property: the streaming engine equals a whole-model implementation on random small models.

Random key names (sorted order differs from file order), 0-d and empty tensors, dyadic values (ties at thresholds, exact
cancellations), bf16 inputs, sharded inputs, a non-float buffer, and row blocks down to one entry.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from hubmerge import CompressedMerge, parse_recipe, run_recipe
from tests.reference_impl import reference_outputs, unflatten

SHAPES = [(), (1,), (7,), (3, 5), (9, 4), (2, 3, 4), (17, 3), (8, 2), (0,), (0, 3)]
KEY = st.from_regex(r"[a-z]{1,3}\.(1[0-2]|[0-9])\.[a-z]{1,4}", fullmatch=True)


@st.composite
def method_and_parameters(draw, num_tasks: int) -> tuple[str, dict]:
    method = draw(
        st.sampled_from(
            [
                "weight_average",
                "task_arithmetic",
                "ties",
                "consensus",
                "tall_masks",
                "magnitude_masking",
                "magnitude_pruning",
            ]
        )
    )
    density = draw(st.sampled_from([0.05, 0.1, 0.2, 0.5, 1.0]))
    scaling = draw(st.sampled_from([1.0, 0.3, 0.7]))
    if method == "task_arithmetic":
        return method, {"scaling": scaling}
    if method == "ties":
        merge = draw(st.sampled_from(["mean", "sum", "max"]))
        trim = draw(st.sampled_from(["global", "tensor"]))
        return method, {"density": density, "merge": merge, "trim": trim, "scaling": scaling}
    if method in ("tall_masks", "consensus"):
        params: dict = {"lambda": draw(st.sampled_from([0.0, 0.2, 0.4, 0.6]))}
        if draw(st.booleans()):
            params["merge"] = "ties"
            params["ties"] = {
                "density": density,
                "merge": draw(st.sampled_from(["mean", "sum", "max"])),
                "trim": draw(st.sampled_from(["global", "tensor"])),
            }
        if method == "consensus":
            params["k"] = draw(st.integers(0, num_tasks))
            params["scaling"] = scaling
        return method, params
    if method.startswith("magnitude"):
        return method, {"density": density}
    return method, {}


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal dtype, shape and bit patterns: unlike torch.equal, −0.0 differs from 0.0."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if not got.is_floating_point():
        return torch.equal(got, want)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    return torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


@st.composite
def problems(draw) -> dict:
    keys = draw(st.lists(KEY, min_size=1, max_size=5, unique=True))
    num_tasks = draw(st.integers(1, 4))
    method, params = draw(method_and_parameters(num_tasks))
    return {
        # one non-empty tensor at least: a base without float entries is refused
        "shapes": {k: draw(st.sampled_from(SHAPES[:-2] if i == 0 else SHAPES)) for i, k in enumerate(keys)},
        "num_tasks": num_tasks,
        "dtype": draw(st.sampled_from([torch.float32, torch.bfloat16])),
        "dyadic": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
        "shards": draw(st.integers(1, 3)),
        "block_entries": draw(st.sampled_from([1, 5, 16, 1 << 22])),
        # None: the CPU default (one span per piece here); 0: whole pieces, as on a GPU; small spans cut
        # pieces at any entry
        "span_entries": draw(st.sampled_from([None, 0, 1, 3, 8])),
        # the fused CPU kernels (where they compile) or torch operations only
        "fused_kernels": draw(st.booleans()),
        "method": method,
        "params": params,
    }


def make_models(problem: dict) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(problem["seed"])
    base, models = {}, [{} for _ in range(problem["num_tasks"])]
    for key, shape in problem["shapes"].items():
        if problem["dyadic"]:
            theta0 = torch.randint(-64, 65, shape, generator=gen).float() / 64
        else:
            theta0 = torch.randn(shape, generator=gen)
        base[key] = theta0.to(problem["dtype"])
        for model in models:
            if problem["dyadic"]:
                delta = torch.randint(-6, 7, shape, generator=gen).float() / 256
            else:
                delta = torch.randn(shape, generator=gen) * 0.05
            delta *= torch.rand(shape, generator=gen) < 0.6
            model[key] = (theta0 + delta).to(problem["dtype"])
    base["buffers.ids"] = torch.arange(6, dtype=torch.int64)
    for model in models:
        model["buffers.ids"] = base["buffers.ids"].clone()
    return base, models


def save_sharded(state: dict, directory: Path, shards: int, seed: int) -> None:
    """File order is a permutation of the keys, so sorted order differs from storage order."""
    directory.mkdir(parents=True)
    order = [
        list(state)[i] for i in torch.randperm(len(state), generator=torch.Generator().manual_seed(seed))
    ]
    groups = [order[i::shards] for i in range(shards) if order[i::shards]]
    if len(groups) == 1:
        save_file({k: state[k] for k in groups[0]}, directory / "model.safetensors")
        return
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({k: state[k] for k in group}, directory / name)
        weight_map.update(dict.fromkeys(group, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def load_dir(directory: Path) -> dict:
    state = {}
    for f in directory.glob("model*.safetensors"):
        state.update(load_file(f))
    return state


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_streaming_equals_whole_model(problem):
    base, models = make_models(problem)
    names = [f"t{i}" for i in range(problem["num_tasks"])]
    params = dict(problem["params"])
    if "lambda" in params and problem["seed"] % 2:
        params["lambda"] = {n: [0.2, 0.5, 0.3, 0.6][i] for i, n in enumerate(names)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_sharded(base, root / "base", problem["shards"], problem["seed"])
        for name, model in zip(names, models, strict=True):
            save_sharded(model, root / name, problem["shards"], problem["seed"] + 1)
        recipe = parse_recipe(
            {
                "version": 1,
                "base": str(root / "base"),
                "models": [{"source": str(root / n), "name": n} for n in names],
                "method": problem["method"],
                "parameters": params,
            }
        )
        result = run_recipe(
            recipe,
            output=root / "out",
            block_entries=problem["block_entries"],
            span_entries=problem["span_entries"],
            fused_kernels=problem["fused_kernels"],
        )
        ref = reference_outputs(base, models, problem["method"], params)
        keys = ref["keys"]

        def expected_model(vector: torch.Tensor, scaling: float) -> dict:
            merged = unflatten(ref["theta0"] + vector * scaling, base, keys)
            return {k: v.to(problem["dtype"]) for k, v in merged.items()} | {
                "buffers.ids": base["buffers.ids"]
            }

        if result.record["result"] == "merged":
            written = load_dir(root / "out")
            want = expected_model(ref["vector"], ref["scaling"])
            assert written.keys() == want.keys()
            for k, v in want.items():
                assert same_bits(written[k], v), k
            return
        artifact = CompressedMerge.from_pretrained(root / "out")
        if ref["vector"] is not None:
            tau = _tau_mtl(root / "out")
            assert same_bits(torch.cat([tau[k].reshape(-1) for k in keys]), ref["vector"])
        for i, name in enumerate(names):
            mask = artifact.mask(name)
            assert torch.equal(torch.cat([mask[k].reshape(-1) for k in keys]), ref["masks"][i]), name
            source = ref["vector"] if ref["vector"] is not None else ref["taus"][i]
            want = expected_model(source * ref["masks"][i], 1.0)
            got = artifact.materialize(name)
            for k, v in want.items():
                assert same_bits(got[k], v), (name, k)


def _tau_mtl(directory: Path) -> dict:
    state = {}
    for f in directory.glob("tau_mtl*.safetensors"):
        state.update(load_file(f))
    return state
