"""Real transformers checkpoints: a tiny BERT base and three "fine-tunes" generated here, merged end to end.

The expected results are computed in this file directly, in float32, the way the reference implementations
(TIES-Merging, TALL masks / Consensus) do it on flattened vectors, and compared exactly (`torch.equal`): the
engine streams the same elementwise float32 operations per tensor, so nothing but a real difference changes
a bit. Outputs are loaded back with `transformers.AutoModel` as a user would.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModel, BertConfig, BertModel
from typer.testing import CliRunner

from hubmerge import CompressedMerge, parse_recipe, run_recipe
from hubmerge.cli import app

TASKS = ["cola", "sst2", "mrpc"]
SCALING = 0.7
LAMBDA = 0.4  # the TALL default
CANCEL_KEY, CANCEL_N = "encoder.layer.0.output.LayerNorm.weight", 8
runner = CliRunner()


# -- the checkpoints ----------------------------------------------------------------------------------------


@dataclass
class Models:
    root: Path
    base: Path
    tasks: list[Path]
    base_bin: Path
    tasks_bin: list[Path]
    theta0: dict[str, torch.Tensor]  # as stored, every tensor (int buffer included)
    thetas: list[dict[str, torch.Tensor]]

    @property
    def float_keys(self) -> list[str]:
        return sorted(k for k, v in self.theta0.items() if v.is_floating_point())

    @property
    def d(self) -> int:
        return sum(self.theta0[k].numel() for k in self.float_keys)


def add_position_ids(directory: Path) -> None:
    """Store the (non-persistent in recent transformers) int64 `position_ids` buffer, as older checkpoints do."""
    path = directory / "model.safetensors"
    sd = load_file(path)
    sd["embeddings.position_ids"] = torch.arange(512, dtype=torch.int64).unsqueeze(0)
    save_file(sd, str(path), metadata={"format": "pt"})


def save_bin_copy(directory: Path, target: Path) -> Path:
    """The same model as config.json + pytorch_model.bin (transformers 5 always writes safetensors)."""
    target.mkdir(parents=True)
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        if (directory / name).is_file():
            shutil.copyfile(directory / name, target / name)
    torch.save(load_file(directory / "model.safetensors"), target / "pytorch_model.bin")
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99
    )
    base_model = BertModel(config).eval()
    base = root / "base"
    base_model.save_pretrained(base)
    add_position_ids(base)
    (base / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n"
    )
    (base / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))

    g = torch.Generator().manual_seed(1)
    tasks = []
    keys = sorted(base_model.state_dict())
    untouched_everywhere = {"pooler.dense.bias", "encoder.layer.1.output.LayerNorm.bias"}
    for t, name in enumerate(TASKS):
        model = BertModel(config).eval()
        model.load_state_dict(base_model.state_dict())
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in keys:
                # some tensors untouched (by every task, or by this one), the rest on a random subset of entries;
                # mostly negative changes, so that TIES' model-wide majority sign is -1, not the default-looking +1
                if key in untouched_everywhere or torch.rand(1, generator=g).item() < 0.2:
                    continue
                p = params[key]
                subset = torch.rand(p.shape, generator=g) < 0.6
                p += subset * (torch.randn(p.shape, generator=g) - 0.5) * 0.02 * (1 + t)
            # exact cancellation (LayerNorm weights are 1.0, ±0.25 is exact): TIES' elected sign is 0 on these
            # entries and the majority sign decides which of the two survives
            cancel = params[CANCEL_KEY]
            cancel[:CANCEL_N] = 1.0 + (0.25, -0.25, 0.0)[t]
        directory = root / name
        model.save_pretrained(directory)
        add_position_ids(directory)
        tasks.append(directory)

    theta0 = load_file(base / "model.safetensors")
    thetas = [load_file(d / "model.safetensors") for d in tasks]
    for key in untouched_everywhere:
        assert all(torch.equal(th[key], theta0[key]) for th in thetas)
    assert torch.equal(theta0[CANCEL_KEY][:CANCEL_N], torch.ones(CANCEL_N))
    taus = [th[CANCEL_KEY][:CANCEL_N] - 1.0 for th in thetas]
    assert torch.equal(taus[0], -taus[1]) and not taus[2].any()
    return Models(
        root=root,
        base=base,
        tasks=tasks,
        base_bin=save_bin_copy(base, root / "bin" / "base"),
        tasks_bin=[save_bin_copy(d, root / "bin" / d.name) for d in tasks],
        theta0=theta0,
        thetas=thetas,
    )


# -- the reference computations, on flattened float32 vectors (sorted key order) --------------------------


def flatten(models: Models, sd: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([sd[k].float().reshape(-1) for k in models.float_keys])


def unflatten(models: Models, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for k in models.float_keys:
        n = models.theta0[k].numel()
        out[k] = vector[offset : offset + n].reshape(models.theta0[k].shape)
        offset += n
    return out


def task_vectors(models: Models) -> torch.Tensor:
    """(T, d): τ_t = θ_t − θ0."""
    ptm = flatten(models, models.theta0)
    return torch.stack([flatten(models, th) - ptm for th in models.thetas])


def ties_vector(tvs: torch.Tensor, density: float, merge: str) -> torch.Tensor:
    """TIES-Merging as in its reference code: per-task top-k trim, sign of the sum, disjoint merge."""
    d = tvs.shape[1]
    k = d - int(d * density)
    kth = tvs.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = tvs * (tvs.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    if merge == "sum":
        return selected.sum(dim=0)
    assert merge == "mean"
    return selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)


def tall_masks(models: Models, tau_mtl: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """(T, d) bool: m_t = |θ0 − θ_t| > λ·|(θ0 + τ_MTL) − θ_t|, strict."""
    ptm = flatten(models, models.theta0)
    fts = torch.stack([flatten(models, th) for th in models.thetas])
    multi = ptm + tau_mtl
    return (ptm - fts).abs() > (multi - fts).abs() * lam


def expected_merge(models: Models, method: str, merge: str = "task_arithmetic") -> dict[str, torch.Tensor]:
    """Every float tensor of the merged model, float32."""
    tvs = task_vectors(models)
    ptm = flatten(models, models.theta0)
    if method == "task_arithmetic":
        merged = ptm + tvs.sum(dim=0) * SCALING
    elif method == "ties":
        merged = ptm + ties_vector(tvs, 0.2, "mean") * 1.0
    else:
        assert method == "consensus"
        tau = tvs.sum(dim=0) if merge == "task_arithmetic" else ties_vector(tvs, 0.2, "sum")
        keep = tall_masks(models, tau).sum(dim=0) >= 2
        assert 0 < int(keep.sum()) < int((tau != 0).sum()), "consensus should drop some entries, not all"
        merged = ptm + (tau * keep) * 1.0
    return unflatten(models, merged)


# -- running hubmerge -----------------------------------------------------------------------------------------


def recipe(
    models: Models, method: str, parameters: dict | None = None, *, bin_sources: bool = False, **extra
):
    base = models.base_bin if bin_sources else models.base
    tasks = models.tasks_bin if bin_sources else models.tasks
    return {
        "version": 1,
        "base": str(base),
        "models": [{"source": str(p), "name": n} for p, n in zip(tasks, TASKS, strict=True)],
        "method": method,
        "parameters": parameters or {},
        **extra,
    }


def run_cli(tmp_path: Path, data: dict, output: Path, *args: str):
    path = tmp_path / f"{output.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("run", path, "--output", output, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def assert_copies_support_files(models: Models, directory: Path) -> None:
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        assert (directory / name).read_bytes() == (models.base / name).read_bytes(), name


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(directory / "model.safetensors")
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(directory / name))
    return out


def assert_model_equals(models: Models, directory: Path, expected: dict[str, torch.Tensor]) -> None:
    """Stored tensors (float: expected exactly, int buffer: the base's) and the AutoModel-loaded state dict."""
    stored = read_weights(directory)
    assert set(stored) == set(models.theta0)
    for key, tensor in stored.items():
        if key in expected:
            assert tensor.dtype == torch.float32, key
            assert torch.equal(tensor, expected[key]), key
        else:
            assert tensor.dtype == models.theta0[key].dtype and torch.equal(tensor, models.theta0[key]), key
    loaded = AutoModel.from_pretrained(directory).state_dict()
    assert set(loaded) == set(models.float_keys)
    for key, tensor in loaded.items():
        assert torch.equal(tensor, expected[key]), key


# -- merged models --------------------------------------------------------------------------------------------

MERGED_CASES = [
    ("task_arithmetic", {"scaling": SCALING}, "task_arithmetic"),
    ("ties", {}, None),
    ("consensus", {}, "task_arithmetic"),
    ("consensus", {"merge": "ties"}, "ties"),
]


@pytest.mark.parametrize(
    ("method", "parameters", "merge"), MERGED_CASES, ids=["ta", "ties", "consensus-ta", "consensus-ties"]
)
def test_merged_model_loads_and_equals_reference(models: Models, tmp_path: Path, method, parameters, merge):
    output = tmp_path / "out"
    run_cli(tmp_path, recipe(models, method, parameters), output, "-q")
    expected = expected_merge(models, method, merge or "task_arithmetic")
    assert_model_equals(models, output, expected)
    assert_copies_support_files(models, output)
    record = json.loads((output / "hubmerge.json").read_text())
    assert record["parameters_counted"] == models.d
    assert record["copied_tensors"] == ["embeddings.position_ids"]
    if "ties" in (method, merge):
        # the elected sign is 0 on the cancelling entries: the (negative) majority sign keeps τ_sst2 = -0.25
        assert record["stats"]["ties_sign_total"] < 0
        assert torch.equal(expected[CANCEL_KEY][:CANCEL_N], torch.full((CANCEL_N,), 0.75))
    # something was merged: the result differs from the base
    assert any(not torch.equal(expected[k], models.theta0[k]) for k in models.float_keys)


def test_sharded_output_loads_identically(models: Models, tmp_path: Path) -> None:
    data = recipe(models, "task_arithmetic", {"scaling": SCALING})
    run_cli(tmp_path, data, tmp_path / "single", "-q")
    run_cli(tmp_path, data, tmp_path / "sharded", "-q", "--max-shard-size", "20KB")
    sharded = tmp_path / "sharded"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert sorted(p.name for p in sharded.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(models.theta0)
    assert not (sharded / "model.safetensors").exists()
    # each shard stays under the limit unless it holds a single larger tensor
    for name in shards:
        keys = [k for k, f in index["weight_map"].items() if f == name]
        size = sum(models.theta0[k].numel() * models.theta0[k].element_size() for k in keys)
        assert size <= 20_000 or len(keys) == 1, (name, size)
    expected = expected_merge(models, "task_arithmetic")
    assert_model_equals(models, sharded, expected)
    single, again = AutoModel.from_pretrained(tmp_path / "single"), AutoModel.from_pretrained(sharded)
    for (k1, v1), (k2, v2) in zip(single.state_dict().items(), again.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2), k1
    assert_copies_support_files(models, sharded)


def test_sharded_output_through_the_api(models: Models, tmp_path: Path) -> None:
    result = run_recipe(
        parse_recipe(recipe(models, "consensus")),
        output=tmp_path / "out",
        max_shard_size="20KB",
        device="cpu",
    )
    assert (result.output / "model.safetensors.index.json").is_file()
    assert len(list(result.output.glob("model-*.safetensors"))) >= 3
    assert_model_equals(models, result.output, expected_merge(models, "consensus"))


def test_bfloat16_output(models: Models, tmp_path: Path) -> None:
    output = tmp_path / "out"
    run_cli(tmp_path, recipe(models, "task_arithmetic", {"scaling": SCALING}, dtype="bfloat16"), output, "-q")
    stored = load_file(output / "model.safetensors")
    expected = expected_merge(models, "task_arithmetic")
    assert set(stored) == set(models.theta0)
    for key, tensor in stored.items():
        if key in expected:
            assert tensor.dtype == torch.bfloat16, key
            assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key
        else:
            assert tensor.dtype == torch.int64 and torch.equal(tensor, models.theta0[key])
    loaded = AutoModel.from_pretrained(output, dtype=torch.bfloat16).state_dict()
    for key, tensor in loaded.items():
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key


# -- TALL masks: the compressed artifact and the rebuilt task models ------------------------------------------


@pytest.fixture(scope="module")
def tall(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tall")
    output = root / "artifact"
    run_cli(root, recipe(models, "tall_masks"), output, "-q")
    return output


def expected_tall(models: Models) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ_MTL, masks (T, d))."""
    tau = task_vectors(models).sum(dim=0)
    return tau, tall_masks(models, tau)


def test_tall_masks_materialize_cli(models: Models, tall: Path, tmp_path: Path) -> None:
    tau, masks = expected_tall(models)
    ptm = flatten(models, models.theta0)
    merge = CompressedMerge.from_pretrained(tall)
    assert merge.tasks == TASKS
    t = TASKS.index("sst2")
    target = tmp_path / "sst2-model"
    invoke("materialize", tall, "--task", "sst2", "--output", target)
    assert_copies_support_files(models, target)
    from_api = merge.materialize("sst2")
    expected = unflatten(models, ptm + tau * masks[t])
    assert set(from_api) == set(models.theta0)
    for key in models.float_keys:
        assert torch.equal(from_api[key], expected[key]), key
    assert torch.equal(from_api["embeddings.position_ids"], models.theta0["embeddings.position_ids"])
    assert_model_equals(models, target, expected)
    stored = load_file(target / "model.safetensors")
    for key, tensor in from_api.items():
        assert torch.equal(stored[key], tensor), key


def test_tall_masks_every_task(models: Models, tall: Path) -> None:
    tau, masks = expected_tall(models)
    ptm = flatten(models, models.theta0)
    merge = CompressedMerge.from_pretrained(tall)
    stored_tau = load_file(tall / "tau_mtl.safetensors")
    assert torch.equal(flatten(models, stored_tau), tau)
    for t, name in enumerate(TASKS):
        assert torch.equal(flatten(models, merge.mask(name)), masks[t].float()), name
        rebuilt = merge.materialize(name)
        assert torch.equal(flatten(models, rebuilt), ptm + tau * masks[t]), name
        # the mask is neither empty nor everything, and never contains an entry the task did not change
        assert 0 < int(masks[t].sum()) < models.d
        assert not bool((masks[t] & (flatten(models, models.thetas[t]) == ptm)).any())


def test_inspect_tall_artifact(models: Models, tall: Path) -> None:
    _, masks = expected_tall(models)
    d, t = models.d, len(TASKS)
    hist = torch.bincount(masks.sum(dim=0), minlength=t + 1).tolist()
    out = invoke("inspect", tall).stdout
    assert f"P′ = {d:,} entries, T = {t}" in out
    assert f"{d * t + 32 * d:,}" in out  # this artifact
    assert f"{(64 + t) * d:,}" in out  # the paper's accounting
    assert f"{32 * t * d:,}" in out  # T fp32 copies
    assert "Mask agreement" in out
    for n in hist:
        assert f"{n:,}" in out
    assert f"catastrophic (in no mask): {100 * hist[0] / d:.2f} %" in out
    assert f"selfish (in exactly one): {100 * hist[1] / d:.2f} %" in out
    for name, m in zip(TASKS, masks, strict=True):
        assert name in out and f"{int(m.sum()):,} ({100 * int(m.sum()) / d:.2f} %)" in out

    record = json.loads(invoke("inspect", tall, "--json").stdout)
    assert record["parameters_counted"] == d
    assert record["stats"]["agreement_histogram"] == hist
    assert [task["mask_kept"] for task in record["tasks"]] == [int(m.sum()) for m in masks]
    assert record["storage"]["artifact_bits"] == d * t + 32 * d


# -- .bin sources ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "tall_masks"])
def test_bin_sources_give_the_same_result(models: Models, tmp_path: Path, method: str) -> None:
    params = {"scaling": SCALING} if method == "task_arithmetic" else {}
    from_st = run_recipe(parse_recipe(recipe(models, method, params)), output=tmp_path / "st")
    from_bin = run_recipe(
        parse_recipe(recipe(models, method, params, bin_sources=True)), output=tmp_path / "bin"
    )
    if method == "task_arithmetic":
        a, b = read_weights(from_st.output), read_weights(from_bin.output)
        assert_model_equals(models, from_bin.output, expected_merge(models, method))
        assert_copies_support_files(models, from_bin.output)
    else:
        a, b = (
            load_file(from_st.output / "tau_mtl.safetensors"),
            load_file(from_bin.output / "tau_mtl.safetensors"),
        )
        for name in TASKS:
            ma = load_file(from_st.output / "masks" / f"{name}.safetensors")
            mb = load_file(from_bin.output / "masks" / f"{name}.safetensors")
            assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
        rebuilt = CompressedMerge.from_pretrained(from_bin.output).materialize("cola")
        reference = CompressedMerge.from_pretrained(from_st.output).materialize("cola")
        assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert from_bin.record["base"]["location"].endswith("bin/base")
