"""PEFT adapters as task models (`hubmerge.adapters`), a merge written back as one LoRA adapter
(`hubmerge.peft_output`) and (IA)³ adapters merged in adapter space (`hubmerge.ia3`).

Every adapter is made here with `peft.get_peft_model` on a tiny random base, its LoRA factors (zero-initialised
by PEFT) set to random values. The reference for a LoRA task is the model PEFT itself merges:
`merge_and_unload()`, which a float32 run must reproduce bit for bit.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi
from peft import IA3Config, LoHaConfig, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaForCausalLM,
)

from hubmerge import CompressedMerge, parse_recipe, run_recipe
from hubmerge.errors import RecipeError, SourceError
from hubmerge.recipe import load_recipe
from hubmerge.run import RunResult
from tests.hubserver import HubServer
from tests.reference_impl import reference_outputs
from tests.test_evaluation_causal_lm import MAX_LENGTH, TEXTS, direct_perplexity, llama_tokenizer, write_jsonl
from tests.tiny_models import bert_config, llama_config, perturb_

TARGETS = ["query", "value", "dense"]
INPUT = torch.tensor([[2, 7, 9, 11, 3, 40], [2, 5, 6, 3, 1, 80]])
State = dict[str, torch.Tensor]
WHOLE, ROW_PIECES = 1 << 21, 96  # block_entries: every tiny tensor read whole, or in pieces of 3 rows
BLOCKS = pytest.mark.parametrize("block", [WHOLE, ROW_PIECES], ids=["whole", "row-pieces"])


# -- helpers -------------------------------------------------------------------------------------------------


def save_base(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def make_lora(base: Path, directory: Path, seed: int, model_class: Any = BertModel, **config: Any) -> State:
    """A LoRA adapter of `base` with random factors (and perturbed modules_to_save copies), saved in
    `directory`; returns the state dict PEFT's `merge_and_unload()` makes of it."""
    torch.manual_seed(seed)
    model = get_peft_model(model_class.from_pretrained(base), LoraConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0.0, 0.1)
            elif ".modules_to_save." in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def run(
    out: Path, models: list[Any], method: str = "task_arithmetic", base: Any = None, **extra: Any
) -> RunResult:
    """parse_recipe + run_recipe into `out`; Paths become strings, `base=None` leaves `base:` out."""

    def spec(m: Any) -> Any:
        return {**m, "source": str(m["source"])} if isinstance(m, dict) else str(m)

    block = extra.pop("_block", WHOLE)
    data: dict[str, Any] = {"version": 1, "models": [spec(m) for m in models], "method": method, **extra}
    if base is not None:
        data["base"] = str(base)
    return run_recipe(parse_recipe(data), output=out, block_entries=block)


def weights(out: Path, name: str = "model.safetensors") -> State:
    return load_file(out / name)


def assert_bit_identical(written: State, expected: State) -> None:
    assert written, "no tensors written"
    differing = [k for k in written if not torch.equal(written[k], expected[k])]
    assert differing == [], f"{len(differing)} of {len(written)} tensors differ, e.g. {differing[:3]}"


def assert_same_merge(written: State, expected: State, block: int, base: State) -> None:
    """Bit for bit when the engine reads whole tensors. In row pieces hubmerge forms ΔW's rows as
    B[rows] @ A, and MKL's sgemm rounds some products of a few rows (3 here; 5, 7 or 9 too) differently from
    the same rows of the full B @ A that PEFT forms (1 ulp of an entry's partial sums): there, a few float32
    ulps of the tensor's largest |ΔW|, nothing more."""
    if block == WHOLE:
        assert_bit_identical(written, expected)
        return
    eps = torch.finfo(torch.float32).eps
    for key, tensor in written.items():
        delta = (expected[key] - base[key]).abs().max()
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=float(4 * eps * delta), msg=key)


def changed(base: State, merged: State) -> list[str]:
    return [k for k in base if not torch.equal(base[k], merged[k])]


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@torch.no_grad()
def hidden(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=INPUT).last_hidden_state


# -- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save_base(BertModel(bert_config()), tmp_path_factory.mktemp("adapters") / "bert-base")


@pytest.fixture(scope="module")
def three_loras(bert_base: Path) -> tuple[list[Path], list[State]]:
    """Three LoRA adapters of `bert_base` (ranks 4, 2, 4; different alphas and targets) and their merges."""
    root = bert_base.parent
    configs = [
        {"r": 4, "lora_alpha": 8, "target_modules": TARGETS},
        {"r": 2, "lora_alpha": 2, "target_modules": ["query", "key"]},
        {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, "use_rslora": True},
    ]
    dirs = [root / f"lora-{i}" for i in range(3)]
    merged = [
        make_lora(bert_base, d, 10 + i, **c) for i, (d, c) in enumerate(zip(dirs, configs, strict=True))
    ]
    return dirs, merged


@pytest.fixture(scope="module")
def merged_checkpoints(bert_base: Path, three_loras: tuple[list[Path], list[State]]) -> list[Path]:
    """`three_loras` merged by PEFT and saved as full float32 checkpoints."""
    dirs = []
    for i, state in enumerate(three_loras[1]):
        model = BertModel.from_pretrained(bert_base)
        model.load_state_dict(state)
        dirs.append(save_base(model, bert_base.parent / f"full-{i}"))
    return dirs


# -- 1-3: one LoRA adapter = PEFT's merged model, bit for bit ------------------------------------------------


LORA_VARIANTS = {
    "plain": {"r": 4, "lora_alpha": 4},
    "alpha-over-r": {
        "r": 4,
        "lora_alpha": 6,
        "rank_pattern": {"value": 2, "layer.1.attention.self.query": 8},
        "alpha_pattern": {"value": 5, "dense": 3},
    },
    "rslora": {
        "r": 4,
        "lora_alpha": 6,
        "use_rslora": True,
        "rank_pattern": {"value": 2, "layer.1.attention.self.query": 8},
        "alpha_pattern": {"value": 5, "dense": 3},
    },
}


@BLOCKS
@pytest.mark.parametrize("variant", list(LORA_VARIANTS))
def test_one_lora_is_peft_merge_and_unload(bert_base: Path, tmp_path: Path, variant: str, block: int) -> None:
    """TA with scaling 1 of one adapter writes exactly PEFT's merged weights: rsLoRA, per-module r/alpha and
    scalings ≠ 1 included, whole tensors or in row pieces (the engine reads B's rows, A whole)."""
    merged = make_lora(bert_base, tmp_path / "a", 1, target_modules=TARGETS, **LORA_VARIANTS[variant])
    base = weights(bert_base)
    # per layer query, value and the attention.output, intermediate and output denses; the pooler's dense
    assert len(changed(base, merged)) == 2 * 5 + 1
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == LORA_VARIANTS[variant].get("rank_pattern", {})

    run(tmp_path / "out", [tmp_path / "a"], base=bert_base, parameters={"scaling": 1.0}, _block=block)
    written = weights(tmp_path / "out")
    assert written.keys() == base.keys()
    assert_same_merge(written, merged, block, base)


def test_lora_forced_kind_adapter(bert_base: Path, tmp_path: Path) -> None:
    merged = make_lora(bert_base, tmp_path / "a", 2, r=2, lora_alpha=3, target_modules=["query"])
    run(tmp_path / "out", [{"source": tmp_path / "a", "kind": "adapter"}], base=bert_base)
    assert_bit_identical(weights(tmp_path / "out"), merged)


def test_pickled_adapter_through_the_weights_only_loader(bert_base: Path, tmp_path: Path) -> None:
    """adapter_model.bin (safe_serialization=False) reads through torch.load(weights_only=True), like a .bin
    checkpoint; a pickle that would run code is refused."""
    torch.manual_seed(4)
    model = get_peft_model(BertModel.from_pretrained(bert_base), LoraConfig(r=2, target_modules=["value"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.normal_(0.0, 0.1)
    model.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("adapter_model.*")) == ["adapter_model.bin"]
    merged = {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}
    run(tmp_path / "out", [tmp_path / "a"], base=bert_base)
    assert_bit_identical(weights(tmp_path / "out"), merged)

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("ran",))

    torch.save({"x": Payload()}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(SourceError, match="refusing to load: it needs unsafe unpickling") as err:
        run(tmp_path / "bad", [tmp_path / "a"], base=bert_base)
    assert "\n" not in one_line(err)


@BLOCKS
def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path, block: int) -> None:
    """GPT-2's Conv1D stores W as [in, out]: PEFT's fan_in_fan_out transposes B @ A."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0)
    config.eos_token_id = 0
    base = save_base(GPT2Model(config), tmp_path / "gpt2")
    merged = make_lora(
        base,
        tmp_path / "a",
        3,
        model_class=GPT2Model,
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
    )
    base_weights = weights(base)
    assert len(changed(base_weights, merged)) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    run(tmp_path / "out", [tmp_path / "a"], base=base, _block=block)
    written = weights(tmp_path / "out")
    assert written.keys() == base_weights.keys()
    assert_same_merge(written, merged, block, base_weights)


@BLOCKS
def test_modules_to_save_and_embedding_lora(tmp_path: Path, block: int) -> None:
    """A sequence classifier's LoRA with its trained classifier saved whole, and a LoRA on the word
    embeddings (lora_embedding_A/B, ΔW = (B @ A)ᵀ)."""
    torch.manual_seed(0)
    base = save_base(BertForSequenceClassification(bert_config(num_labels=3)), tmp_path / "base")
    merged = make_lora(
        base,
        tmp_path / "a",
        4,
        model_class=BertForSequenceClassification,
        r=4,
        lora_alpha=8,
        target_modules=["query", "word_embeddings"],
        modules_to_save=["classifier"],
    )
    adapter = weights(tmp_path / "a", "adapter_model.safetensors")
    saved = {"classifier.weight", "classifier.bias"}
    assert {k.removeprefix("base_model.model.") for k in adapter} >= saved
    base_weights = weights(base)
    assert set(changed(base_weights, merged)) == {
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.0.attention.self.query.weight",
        "bert.encoder.layer.1.attention.self.query.weight",
        *saved,
    }

    run(tmp_path / "out", [tmp_path / "a"], base=base, _block=block)
    written = weights(tmp_path / "out")
    for key in saved:
        assert torch.equal(written[key], adapter[f"base_model.model.{key}"]), key
    assert written.keys() == base_weights.keys()
    assert_same_merge(written, merged, block, base_weights)


# -- 4-5: several adapters = the same merge of their merged checkpoints ---------------------------------------


@pytest.mark.parametrize(
    ("method", "parameters"),
    [("task_arithmetic", {"scaling": 0.4}), ("ties", {}), ("ties", {"density": 0.5, "merge": "sum"})],
)
def test_adapters_merge_like_their_merged_checkpoints(
    bert_base: Path,
    three_loras: tuple[list[Path], list[State]],
    merged_checkpoints: list[Path],
    tmp_path: Path,
    method: str,
    parameters: dict,
) -> None:
    adapters, _ = three_loras
    from_adapters = run(tmp_path / "a", adapters, method, base=bert_base, parameters=parameters)
    from_full = run(tmp_path / "f", merged_checkpoints, method, base=bert_base, parameters=parameters)
    a, f = weights(tmp_path / "a"), weights(tmp_path / "f")
    assert a.keys() == f.keys()
    # τ_t of an adapter is bit for bit τ_t of its merged checkpoint, so the merges are the same bits
    assert_bit_identical(a, f)
    assert from_adapters.record["stats"] == from_full.record["stats"]
    assert len(changed(weights(bert_base), a)) > 0


def test_tall_masks_of_adapters_match_their_merged_checkpoints(
    bert_base: Path,
    three_loras: tuple[list[Path], list[State]],
    merged_checkpoints: list[Path],
    tmp_path: Path,
) -> None:
    adapters, merged = three_loras
    names = [{"source": p, "name": f"t{i}"} for i, p in enumerate(adapters)]
    full_names = [{"source": p, "name": f"t{i}"} for i, p in enumerate(merged_checkpoints)]
    run(tmp_path / "a", names, "tall_masks", base=bert_base)
    run(tmp_path / "f", full_names, "tall_masks", base=bert_base)
    from_adapters = CompressedMerge.from_pretrained(tmp_path / "a")
    from_full = CompressedMerge.from_pretrained(tmp_path / "f")
    assert_bit_identical(
        weights(tmp_path / "a", "tau_mtl.safetensors"), weights(tmp_path / "f", "tau_mtl.safetensors")
    )
    base = weights(bert_base)
    for i, task in enumerate(from_adapters.tasks):
        mask, full_mask = from_adapters.mask(task), from_full.mask(task)
        assert mask.keys() == full_mask.keys()
        for key, m in mask.items():
            assert torch.equal(m, full_mask[key]), (task, key)
            # |τ_t| > λ·|τ_MTL − τ_t| is false where the adapter leaves a weight as it is
            untouched = merged[i][key] == base[key]
            assert not m[untouched].any(), (task, key)
        assert sum(int(m.sum()) for m in mask.values()) > 0
        rebuilt = from_adapters.materialize(task)
        assert_bit_identical(rebuilt, from_full.materialize(task))
        assert rebuilt.keys() == base.keys()


def test_full_fine_tune_and_adapter_in_one_recipe(
    bert_base: Path,
    three_loras: tuple[list[Path], list[State]],
    merged_checkpoints: list[Path],
    tmp_path: Path,
) -> None:
    torch.manual_seed(5)
    tuned = BertModel.from_pretrained(bert_base)
    perturb_(tuned, 0.01, keep=0.5)
    full = save_base(tuned, tmp_path / "full")
    adapter = three_loras[0][0]
    run(tmp_path / "mixed", [full, adapter], base=bert_base, parameters={"scaling": 0.5})
    run(tmp_path / "ref", [full, merged_checkpoints[0]], base=bert_base, parameters={"scaling": 0.5})
    mixed = weights(tmp_path / "mixed")
    assert_bit_identical(mixed, weights(tmp_path / "ref"))
    base, ft, lora = weights(bert_base), weights(full), three_loras[1][0]
    for key, tensor in mixed.items():
        expected = base[key] + 0.5 * ((ft[key] - base[key]) + (lora[key] - base[key]))
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)


# -- 6: the base from the adapters' configs ------------------------------------------------------------------


def test_base_taken_from_the_adapters(
    bert_base: Path, three_loras: tuple[list[Path], list[State]], tmp_path: Path
) -> None:
    adapters, _ = three_loras
    result = run(tmp_path / "omitted", adapters[:2], parameters={"scaling": 0.4})
    assert result.record["base"]["source"] == str(bert_base)
    assert json.loads((tmp_path / "omitted" / "hubmerge.json").read_text())["base"]["source"] == str(
        bert_base
    )
    run(tmp_path / "explicit", adapters[:2], base=bert_base, parameters={"scaling": 0.4})
    assert_bit_identical(weights(tmp_path / "omitted"), weights(tmp_path / "explicit"))


def test_adapters_of_different_bases(bert_base: Path, tmp_path: Path) -> None:
    other = shutil.copytree(bert_base, tmp_path / "other-base")
    make_lora(bert_base, tmp_path / "a", 1, r=2, lora_alpha=2, target_modules=["query"])
    make_lora(other, tmp_path / "b", 2, r=2, lora_alpha=2, target_modules=["query"])
    with pytest.raises(RecipeError) as err:
        run(tmp_path / "out", [tmp_path / "a", tmp_path / "b"])
    message = one_line(err)
    assert "the adapters name different bases" in message
    assert f"{bert_base} (a)" in message and f"{other} (b)" in message
    assert err.value.field == "base"
    assert not (tmp_path / "out").exists()


def test_full_checkpoint_without_base(
    three_loras: tuple[list[Path], list[State]], merged_checkpoints: list[Path], tmp_path: Path
) -> None:
    with pytest.raises(RecipeError) as err:
        run(tmp_path / "out", [three_loras[0][0], merged_checkpoints[1]])
    message = one_line(err)
    assert "base: missing" in message and "'full-1'" in message and "is a full checkpoint" in message


def test_explicit_base_other_than_the_adapters(
    bert_base: Path,
    three_loras: tuple[list[Path], list[State]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    copy = shutil.copytree(bert_base, tmp_path / "copy-of-base")
    with caplog.at_level(logging.WARNING, logger="hubmerge"):
        run(tmp_path / "out", three_loras[0][:1], base=copy)
    warned = [r.getMessage() for r in caplog.records if r.name == "hubmerge"]
    assert warned == [f"model 'lora-0': adapter of {bert_base}, merged onto the recipe's base {copy}"]
    assert_bit_identical(weights(tmp_path / "out"), three_loras[1][0])


# -- 7: what is refused ----------------------------------------------------------------------------------------


def test_dora_refused(bert_base: Path, tmp_path: Path) -> None:
    make_lora(bert_base, tmp_path / "dora", 1, r=2, lora_alpha=2, target_modules=["query"], use_dora=True)
    with pytest.raises(SourceError) as err:
        run(tmp_path / "out", [tmp_path / "dora"], base=bert_base)
    assert one_line(err) == f"{tmp_path / 'dora'}: not supported: DoRA (use_dora: true)"
    # its magnitude vectors give it away when the config does not
    config = tmp_path / "dora" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "use_dora": False}))
    with pytest.raises(SourceError) as err:
        run(tmp_path / "out", [tmp_path / "dora"], base=bert_base)
    assert "not supported: DoRA (tensor base_model.model." in one_line(err)
    assert "lora_magnitude_vector" in str(err.value)


def test_other_peft_type_refused(bert_base: Path, tmp_path: Path) -> None:
    model = get_peft_model(BertModel.from_pretrained(bert_base), LoHaConfig(r=2, target_modules=["query"]))
    model.save_pretrained(tmp_path / "loha")
    for base in (bert_base, None):
        with pytest.raises(SourceError) as err:
            run(tmp_path / "out", [tmp_path / "loha"], base=base)
        assert one_line(err) == (
            f"{tmp_path / 'loha'}: not supported: LOHA adapters (hubmerge merges LORA and IA3 adapters)"
        )


def test_adapter_weights_missing(bert_base: Path, tmp_path: Path) -> None:
    make_lora(bert_base, tmp_path / "a", 1, r=2, lora_alpha=2, target_modules=["query", "value"])
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    for base in (bert_base, None):
        with pytest.raises(SourceError) as err:
            run(tmp_path / "out", [tmp_path / "a"], base=base)
        assert one_line(err) == (
            f"{tmp_path / 'a'}: adapter weights missing: {tmp_path / 'a'} has adapter_config.json but no "
            "adapter_model.safetensors or adapter_model.bin"
        )


def test_lora_b_missing(bert_base: Path, tmp_path: Path) -> None:
    make_lora(bert_base, tmp_path / "a", 1, r=2, lora_alpha=2, target_modules=["query"])
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = "base_model.model.encoder.layer.1.attention.self.query.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped}, path)
    with pytest.raises(SourceError) as err:
        run(tmp_path / "out", [tmp_path / "a"], base=bert_base)
    assert one_line(err) == (
        f"{tmp_path / 'a'}: adapter weights missing: lora_B of module encoder.layer.1.attention.self.query"
    )


def test_kind_adapter_on_a_full_checkpoint(
    bert_base: Path, merged_checkpoints: list[Path], tmp_path: Path
) -> None:
    entry = {"source": merged_checkpoints[0], "kind": "adapter"}
    for base in (bert_base, None):
        with pytest.raises(SourceError) as err:
            run(tmp_path / "out", [entry], base=base)
        message = one_line(err)
        assert message.startswith(f"{merged_checkpoints[0]}: ")
        assert "adapter_config.json" in message


def test_recipe_errors_of_output_format(
    bert_base: Path,
    three_loras: tuple[list[Path], list[State]],
    merged_checkpoints: list[Path],
    tmp_path: Path,
) -> None:
    adapter = str(three_loras[0][0])
    with pytest.raises(RecipeError) as err:
        parse_recipe({"version": 1, "models": [adapter], "method": "task_arithmetic", "lora_rank": 4})
    assert "applies to `output_format: peft` only" in one_line(err)
    assert err.value.field == "lora_rank"
    with pytest.raises(RecipeError) as err:
        parse_recipe(
            {
                "version": 1,
                "models": [adapter],
                "method": "tall_masks",
                "output_format": "peft",
                "lora_rank": 4,
            }
        )
    assert "output_format: peft writes a merged adapter; tall_masks writes a compressed artifact" in one_line(
        err
    )
    with pytest.raises(RecipeError) as err:
        run(
            tmp_path / "out",
            [adapter, merged_checkpoints[1]],
            base=bert_base,
            output_format="peft",
            lora_rank=4,
        )
    assert one_line(err) == (
        "output_format: peft merges LoRA adapters; 'full-1' is a full checkpoint (write a merged model)"
    )
    with pytest.raises(RecipeError) as err:
        run(tmp_path / "out", [adapter], base=bert_base, output_format="peft")
    assert "lora_rank: needed with output_format: peft" in one_line(err)
    assert not (tmp_path / "out").exists()


# -- 8: output_format: peft -----------------------------------------------------------------------------------


def reconstruction(out: Path, base: Path) -> tuple[State, dict]:
    """θ0 + B @ A · scaling from the written adapter's factors, and its config."""
    config = json.loads((out / "adapter_config.json").read_text())
    factors = weights(out, "adapter_model.safetensors")
    state = weights(base)
    for key, a in factors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        rank = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        assert a.shape[0] == rank
        b = factors[key.replace("lora_A", "lora_B")]
        state[module + ".weight"] = state[module + ".weight"] + (b @ a) * (alpha / rank)
    return state, config


def loaded_as_peft(out: Path, base: Path) -> PeftModel:
    model = PeftModel.from_pretrained(BertModel.from_pretrained(base), out)
    written = weights(out, "adapter_model.safetensors")
    params = dict(model.named_parameters())
    for key, tensor in written.items():
        assert torch.equal(params[key.replace(".weight", ".default.weight")], tensor), key
    return model


def base_with(base: Path, state: State) -> BertModel:
    model = BertModel.from_pretrained(base)
    model.load_state_dict(state)
    return model


def test_peft_output_of_one_adapter_at_full_rank(
    bert_base: Path, three_loras: tuple[list[Path], list[State]], tmp_path: Path
) -> None:
    adapter, merged = three_loras[0][0], three_loras[1][0]
    result = run(tmp_path / "out", [adapter], base=bert_base, output_format="peft", lora_rank=4)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "hubmerge.json",
        "hubmerge_recipe.yaml",
    ]
    state, config = reconstruction(out, bert_base)
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 4, {})
    assert config["base_model_name_or_path"] == str(bert_base)
    modules = result.record["adapter"]["modules"]
    assert sorted(modules) == sorted(k.removesuffix(".weight") for k in changed(weights(bert_base), merged))
    assert all(m["rank"] == 4 and m["energy"] >= 0.999999 for m in modules.values())
    assert result.record["adapter"]["peft_type"] == "LORA" and result.record["adapter"]["rank"] == 4
    assert json.loads((out / "hubmerge.json").read_text())["adapter"] == result.record["adapter"]
    assert "library_name: peft" in (out / "README.md").read_text()
    # the pinned recipe rebuilds the same adapter, not a merged model
    again = run_recipe(load_recipe(out / "hubmerge_recipe.yaml"), output=tmp_path / "again")
    assert again.record["adapter"] == result.record["adapter"]
    assert (
        weights(tmp_path / "again", "adapter_model.safetensors").keys()
        == weights(out, "adapter_model.safetensors").keys()
    )
    for key, tensor in state.items():
        torch.testing.assert_close(tensor, merged[key], rtol=0, atol=1e-5)
    peft_out = hidden(loaded_as_peft(out, bert_base))
    torch.testing.assert_close(peft_out, hidden(base_with(bert_base, state)), rtol=0, atol=1e-5)
    torch.testing.assert_close(peft_out, hidden(base_with(bert_base, merged)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("rank", [2, 12, 64])
def test_peft_output_of_three_adapters(
    bert_base: Path, three_loras: tuple[list[Path], list[State]], tmp_path: Path, rank: int
) -> None:
    """Rank 2 truncates α·Σ ΔW_t (energy = Σ top-2 s² / Σ s²); rank 12 ≥ its rank (4 + 2 + 4) keeps it
    whole; rank 64 is capped at the smaller side of each matrix (32), through rank_pattern."""
    adapters, merged = three_loras
    result = run(
        tmp_path / "out",
        adapters,
        base=bert_base,
        parameters={"scaling": 0.4},
        output_format="peft",
        lora_rank=rank,
    )
    out = tmp_path / "out"
    base = weights(bert_base)
    update = {
        key: 0.4 * sum(m[key] - base[key] for m in merged)
        for key in sorted({k for m in merged for k in changed(base, m)})
    }
    modules = result.record["adapter"]["modules"]
    assert sorted(modules) == sorted(k.removesuffix(".weight") for k in update)
    state, config = reconstruction(out, bert_base)
    for key, delta in update.items():
        s = torch.linalg.svdvals(delta.double()).square()
        kept = min(rank, s.numel())
        record = modules[key.removesuffix(".weight")]
        assert record["rank"] == kept
        assert record["energy"] == pytest.approx(float(s[:kept].sum() / s.sum()), abs=2e-6), key
        if rank == 2 and not key.endswith(".key.weight"):  # only the rank-2 adapter adapts `key`
            assert record["energy"] < 0.9999
        else:
            assert record["energy"] >= 0.999999
            torch.testing.assert_close(state[key], base[key] + delta, rtol=0, atol=1e-5)
    if rank == 64:
        assert config["r"] == 64 and set(config["rank_pattern"].values()) == {32}
        assert config["rank_pattern"] == config["alpha_pattern"]
    peft_out = hidden(loaded_as_peft(out, bert_base))
    torch.testing.assert_close(peft_out, hidden(base_with(bert_base, state)), rtol=0, atol=1e-5)
    if rank >= 12:
        run(tmp_path / "ta", adapters, base=bert_base, parameters={"scaling": 0.4})
        ta = weights(tmp_path / "ta")
        for key, tensor in state.items():
            torch.testing.assert_close(tensor, ta[key], rtol=0, atol=1e-5)


# -- 9: adapters on the Hub -------------------------------------------------------------------------------


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


def pointed_at(directory: Path, base: str, revision: str | None = None) -> dict[str, bytes]:
    """The adapter's files, its config naming `base` (at `revision`) as a Hub model would."""
    files = files_of(directory)
    config = json.loads(files["adapter_config.json"])
    files["adapter_config.json"] = json.dumps(
        {**config, "base_model_name_or_path": base, "revision": revision}
    ).encode()
    return files


def test_hub_adapters_at_pinned_revisions_with_the_base_from_their_config(
    hub: HubServer,
    hf_token: str,
    bert_base: Path,
    three_loras: tuple[list[Path], list[State]],
    tmp_path: Path,
) -> None:
    """One adapter pinned by sha, one by tag (both repos' main moved on since), the base from their
    configs: a Hub id, on the loopback Hub too."""
    (first, second, third), _ = three_loras
    base_sha = hub.seed_repo("alice/lora-base", files_of(bert_base))
    first_sha = hub.seed_repo("alice/lora-a", pointed_at(first, "alice/lora-base"))
    later = hub.seed_repo("alice/lora-a", pointed_at(third, "alice/lora-base"))
    tagged = hub.seed_repo("alice/lora-b", pointed_at(second, "alice/lora-base"))
    HfApi(endpoint=hub.url, token=hf_token).create_tag("alice/lora-b", tag="v1", revision=tagged)
    moved = hub.seed_repo("alice/lora-b", pointed_at(third, "alice/lora-base"))
    assert len({first_sha, later, tagged, moved}) == 4

    models = [
        {"source": f"alice/lora-a@{first_sha}", "name": "a"},
        {"source": "alice/lora-b@v1", "name": "b"},
    ]
    result = run(tmp_path / "out", models, parameters={"scaling": 1.0})
    record = result.record
    assert [(t["name"], t["revision"]) for t in record["tasks"]] == [("a", first_sha), ("b", tagged)]
    assert (record["base"]["source"], record["base"]["revision"]) == ("alice/lora-base", base_sha)
    run(tmp_path / "local", [first, second], base=bert_base, parameters={"scaling": 1.0})
    assert_bit_identical(weights(tmp_path / "out"), weights(tmp_path / "local"))


def test_hub_base_at_the_revision_the_adapter_records(
    hub: HubServer, bert_base: Path, three_loras: tuple[list[Path], list[State]], tmp_path: Path
) -> None:
    base_sha = hub.seed_repo("alice/lora-base", files_of(bert_base))
    torch.manual_seed(7)
    moved = BertModel.from_pretrained(bert_base)
    perturb_(moved, 0.1)
    hub.seed_repo("alice/lora-base", files_of(save_base(moved, tmp_path / "moved")))  # main moves on
    hub.seed_repo("alice/lora-a", pointed_at(three_loras[0][0], "alice/lora-base", base_sha))
    result = run(tmp_path / "out", ["alice/lora-a"], parameters={"scaling": 1.0})
    assert (result.record["base"]["source"], result.record["base"]["revision"]) == (
        f"alice/lora-base@{base_sha}",
        base_sha,
    )
    assert_bit_identical(weights(tmp_path / "out"), three_loras[1][0])


# -- 10: (IA)³ adapters, merged in adapter space ---------------------------------------------------------------


@pytest.fixture(scope="module")
def three_ia3(bert_base: Path) -> tuple[list[Path], list[State]]:
    """Three (IA)³ adapters of `bert_base`, their vectors random around 1, and those vectors."""
    dirs, vectors = [], []
    for i in range(3):
        torch.manual_seed(20 + i)
        config = IA3Config(
            target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]
        )
        model = get_peft_model(BertModel.from_pretrained(bert_base), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "ia3_l" in name:
                    param.normal_(1.0, 0.1)
        directory = bert_base.parent / f"ia3-{i}"
        model.save_pretrained(directory)
        dirs.append(directory)
        vectors.append(load_file(directory / "adapter_model.safetensors"))
    return dirs, vectors


def loaded_ia3(out: Path, base: Path, expected: State) -> None:
    """`out` loads as an (IA)³ adapter whose vectors are `expected`."""
    model = PeftModel.from_pretrained(BertModel.from_pretrained(base), out)
    params = dict(model.named_parameters())
    assert len(expected) == 8
    for key, tensor in expected.items():
        assert torch.equal(params[key.replace(".ia3_l", ".ia3_l.default")], tensor), key


def test_ia3_task_arithmetic(
    bert_base: Path, three_ia3: tuple[list[Path], list[State]], tmp_path: Path
) -> None:
    dirs, vectors = three_ia3
    run(tmp_path / "out", dirs, parameters={"scaling": 0.4})
    out = weights(tmp_path / "out", "adapter_model.safetensors")
    assert out.keys() == vectors[0].keys()
    for key, tensor in out.items():
        expected = 1 + 0.4 * sum(v[key] - 1 for v in vectors)
        assert torch.equal(tensor, expected), key
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["base_model_name_or_path"]) == ("IA3", str(bert_base))
    loaded_ia3(tmp_path / "out", bert_base, out)


@pytest.mark.parametrize("parameters", [{}, {"density": 0.5, "merge": "sum", "scaling": 0.7}])
def test_ia3_ties(
    bert_base: Path, three_ia3: tuple[list[Path], list[State]], tmp_path: Path, parameters: dict
) -> None:
    """TIES on the flattened vectors (θ0 = ones), as the whole-model reference computes it."""
    dirs, vectors = three_ia3
    run(tmp_path / "out", dirs, "ties", base=bert_base, parameters=parameters)
    out = weights(tmp_path / "out", "adapter_model.safetensors")
    ones = {k: torch.ones_like(v) for k, v in vectors[0].items()}
    ref = reference_outputs(ones, vectors, "ties", parameters)
    flat = torch.cat([out[k].reshape(-1) for k in ref["keys"]])
    expected = ref["theta0"] + ref["scaling"] * ref["vector"]
    assert not torch.equal(ref["vector"], ref["taus"].sum(0))  # trimming and sign election did something
    assert torch.equal(flat, expected)
    loaded_ia3(tmp_path / "out", bert_base, out)


def test_ia3_tall_masks_tasks_rebuild_as_adapters(
    bert_base: Path, three_ia3: tuple[list[Path], list[State]], tmp_path: Path
) -> None:
    dirs, vectors = three_ia3
    models = [{"source": d, "name": f"t{i}"} for i, d in enumerate(dirs)]
    run(tmp_path / "tall", models, "tall_masks")
    ones = {k: torch.ones_like(v) for k, v in vectors[0].items()}
    ref = reference_outputs(ones, vectors, "tall_masks", {})
    keys = ref["keys"]
    artifact = CompressedMerge.from_pretrained(tmp_path / "tall")
    assert artifact.tasks == ["t0", "t1", "t2"]
    for i, task in enumerate(artifact.tasks):
        mask = artifact.mask(task)
        assert torch.equal(torch.cat([mask[k].reshape(-1) for k in keys]), ref["masks"][i]), task
        assert 0 < int(ref["masks"][i].sum()) < ref["masks"][i].numel()
        out = artifact.save_task(task, tmp_path / task)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
        rebuilt = weights(out, "adapter_model.safetensors")
        assert rebuilt.keys() == set(keys)
        flat = torch.cat([rebuilt[k].reshape(-1) for k in keys])
        assert torch.equal(flat, 1 + ref["masks"][i] * ref["vector"]), task
        loaded_ia3(out, bert_base, rebuilt)


def test_ia3_mixed_with_other_models(
    bert_base: Path,
    three_ia3: tuple[list[Path], list[State]],
    three_loras: tuple[list[Path], list[State]],
    merged_checkpoints: list[Path],
    tmp_path: Path,
) -> None:
    for other in (three_loras[0][0], merged_checkpoints[0]):
        with pytest.raises(SourceError) as err:
            run(tmp_path / "out", [three_ia3[0][0], other], base=bert_base)
        message = one_line(err)
        assert f"model {other.name!r} is not an (IA)³ adapter" in message


# -- a Llama-style decoder: every projection adapted, scored with the causal_lm head ------------------------


def test_llama_loras_merge_and_score_with_the_causal_lm_head(tmp_path: Path) -> None:
    """LoRA on every attention and MLP projection of a tiny Llama: one adapter at α = 1 is PEFT's merged
    model bit for bit, and the fine-tuned row of a perplexity evaluation is that model's perplexity."""
    tokenizer = llama_tokenizer()
    config = llama_config(vocab_size=len(tokenizer))
    torch.manual_seed(0)
    base = save_base(LlamaForCausalLM(config), tmp_path / "base")
    tokenizer.save_pretrained(base)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    merged = [
        make_lora(base, tmp_path / f"t{i}", 10 + i, LlamaForCausalLM, r=4, target_modules=projections)
        for i in range(2)
    ]
    run(tmp_path / "one", [tmp_path / "t0"], base=base)
    assert_bit_identical(weights(tmp_path / "one"), merged[0])
    assert len(changed(weights(base), merged[0])) == 2 * len(projections)

    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    task = {"data_files": {"validation": str(data), "test": str(data)}, "max_length": MAX_LENGTH}
    result = run(
        tmp_path / "scored",
        [tmp_path / "t0", tmp_path / "t1"],
        evaluation={"head": "causal_lm", "metric": "perplexity", "tasks": {"t0": task, "t1": task}},
    )
    rows = result.record["evaluation"]["rows"]
    for i, name in enumerate(("t0", "t1")):
        model = LlamaForCausalLM(config).eval()
        model.load_state_dict(merged[i])
        expected = direct_perplexity(model, tokenizer, TEXTS)
        assert rows["fine-tuned"]["accuracy"][name] == pytest.approx(expected, rel=1e-5)


# -- cases from the review: what PEFT saves beside the factors, and adapters of other model classes ---------


def tiny_llama(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    return save_base(LlamaForCausalLM(llama_config(num_hidden_layers=1)), tmp_path / "llama")


def test_lora_on_embed_tokens_keeps_its_update(tmp_path: Path) -> None:
    """PEFT saves an adapted embedding layer's weight whole (`embed_tokens.base_layer.weight`) beside its
    factors; the task is that weight plus ΔW, as PEFT loads it, and a merged adapter names it as the base."""
    base = tiny_llama(tmp_path)
    merged = make_lora(
        base, tmp_path / "a", 5, LlamaForCausalLM, r=2, target_modules=["q_proj", "embed_tokens"]
    )
    saved = weights(tmp_path / "a", "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in saved
    run(tmp_path / "out", [tmp_path / "a"], base=base)
    written = weights(tmp_path / "out")
    assert not torch.equal(written["model.embed_tokens.weight"], weights(base)["model.embed_tokens.weight"])
    assert_bit_identical(written, merged)

    run(tmp_path / "peft", [tmp_path / "a"], base=base, output_format="peft", lora_rank=2)
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), tmp_path / "peft")
    state = model.merge_and_unload().state_dict()
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(state[key], merged[key], rtol=0, atol=1e-5)


def test_merged_adapter_names_modules_as_the_base(bert_base: Path, tmp_path: Path) -> None:
    """Adapters made on BertModel (`encoder...`) and on BertForSequenceClassification (`bert.encoder...`) of
    one BertModel base: the merged adapter names every module as the base does, so PEFT applies all of it."""
    make_lora(bert_base, tmp_path / "a0", 6, r=2, target_modules=["query"])
    make_lora(bert_base, tmp_path / "a1", 7, BertForSequenceClassification, r=2, target_modules=["value"])
    keys = weights(tmp_path / "a1", "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.bert.encoder.") for k in keys)
    run(tmp_path / "ta", [tmp_path / "a0", tmp_path / "a1"], base=bert_base)
    run(
        tmp_path / "out",
        [tmp_path / "a0", tmp_path / "a1"],
        base=bert_base,
        output_format="peft",
        lora_rank=4,
    )
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert all(m.startswith("encoder.layer.") for m in config["target_modules"])
    state = PeftModel.from_pretrained(
        BertModel.from_pretrained(bert_base), tmp_path / "out"
    ).merge_and_unload()
    expected = weights(tmp_path / "ta")
    for key, tensor in state.state_dict().items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-5)


def test_sequence_classification_adapters_with_all_biases(tmp_path: Path) -> None:
    """task_type SEQ_CLS with bias "all": PEFT also saves its wrapper's copies of the classifier
    (`classifier.original_module.*`, `classifier.modules_to_save.*`), which are not tensors of the model."""
    torch.manual_seed(0)
    base = save_base(BertForSequenceClassification(bert_config(num_labels=3)), tmp_path / "base")
    merged = make_lora(
        base,
        tmp_path / "a",
        8,
        BertForSequenceClassification,
        task_type="SEQ_CLS",
        r=2,
        bias="all",
        target_modules=["query"],
    )
    assert any(".original_module." in k for k in weights(tmp_path / "a", "adapter_model.safetensors"))
    run(tmp_path / "out", [tmp_path / "a"], base=base)
    assert_bit_identical(weights(tmp_path / "out"), merged)
    twice = [{"source": tmp_path / "a", "name": "a"}, {"source": tmp_path / "a", "name": "b"}]
    run(tmp_path / "tall", twice, "tall_masks", base=base)
    assert not list((tmp_path / "tall").glob("private/*"))  # nothing of the task's is outside the base


def test_adapters_that_change_the_base_are_refused(bert_base: Path, tmp_path: Path) -> None:
    make_lora(bert_base, tmp_path / "a", 9, r=2, target_modules=["query"])
    config_path = tmp_path / "a" / "adapter_config.json"
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq"):
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "init_lora_weights": init}))
        with pytest.raises(SourceError, match=f"not supported: LoRA initialised with '{init}'") as err:
            run(tmp_path / "out", [tmp_path / "a"], base=bert_base)
        assert "\n" not in one_line(err)


def test_a_module_that_fits_two_parts_of_the_base_is_ambiguous() -> None:
    """A text/vision model whose towers have the same shapes: an adapter naming `encoder...` fits both."""
    from hubmerge.adapters import AdapterConfig, lora_layout
    from hubmerge.sources import TensorInfo

    f32 = torch.float32
    adapter = {
        "base_model.model.encoder.q.lora_A.weight": TensorInfo((2, 4), f32),
        "base_model.model.encoder.q.lora_B.weight": TensorInfo((4, 2), f32),
    }
    base = {f"{tower}.encoder.q.weight": TensorInfo((4, 4), f32) for tower in ("text", "vision")}
    config = AdapterConfig("LORA", {"r": 2, "lora_alpha": 2})
    with pytest.raises(SourceError, match=r"ambiguous: its modules fit the base as 'text\.encoder\.q' and"):
        lora_layout("a", config, adapter, base)
    assert list(
        lora_layout("a", config, adapter, {"text.encoder.q.weight": TensorInfo((4, 4), f32)}).modules
    ) == ["text.encoder.q.weight"]


def test_ia3_with_modules_to_save_is_refused_and_validate_takes_ia3(bert_base: Path, tmp_path: Path) -> None:
    for i in range(2):
        model = get_peft_model(
            BertModel.from_pretrained(bert_base), IA3Config(target_modules=["key"], feedforward_modules=[])
        )
        model.save_pretrained(tmp_path / f"i{i}")
    recipe = tmp_path / "ia3.yaml"
    recipe.write_text(
        f"version: 1\nbase: {bert_base}\nmodels: [{tmp_path / 'i0'}, {tmp_path / 'i1'}]\nmethod: task_arithmetic\n"
    )
    from typer.testing import CliRunner

    from hubmerge.cli import app

    result = CliRunner().invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    torch.manual_seed(0)
    head = save_base(BertForSequenceClassification(bert_config(num_labels=2)), tmp_path / "cls")
    model = get_peft_model(
        BertForSequenceClassification.from_pretrained(head),
        IA3Config(task_type="SEQ_CLS", target_modules=["key"], feedforward_modules=[]),
    )
    model.save_pretrained(tmp_path / "c0")
    with pytest.raises(SourceError, match=r"not supported: \(IA\)³ adapters that save other tensors") as err:
        run(tmp_path / "out", [tmp_path / "c0"], base=head)
    assert "classifier" in one_line(err)


def test_an_adapter_saved_under_its_name_is_pointed_to(bert_base: Path, tmp_path: Path) -> None:
    """PEFT saves an adapter named other than "default" in a subfolder of that name."""
    torch.manual_seed(0)
    model = get_peft_model(
        BertModel.from_pretrained(bert_base), LoraConfig(r=2, target_modules=["query"]), "math"
    )
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(SourceError, match=r"PEFT adapters are in its subfolders: .*saved/math") as err:
        run(tmp_path / "out", [tmp_path / "saved"], base=bert_base)
    assert "\n" not in one_line(err)
    run(tmp_path / "out", [tmp_path / "saved" / "math"], base=bert_base)
