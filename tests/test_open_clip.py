"""open_clip checkpoints (open_clip_config.json + open_clip_model.safetensors): merge, evaluate, reload.

The `clip` extra (open_clip_torch, which needs torchvision) is a ~5 GB install here, so these tests run in
their own venv: `make test-clip` (CI runs it after `make test`). In the default venv they are skipped, except
the error for a missing extra, which needs no open_clip.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from hubmerge.cli import app

runner = CliRunner()
CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a photo of {}.", "a {} picture."]
# A ViT CLIP small enough to build in a second; the text tower keeps open_clip's BPE vocabulary.
MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_open_clip(
    directory: Path, state: dict[str, torch.Tensor], model_cfg: dict | None = None, **config: dict
) -> None:
    """The layout open_clip's `local-dir:` and `hf-hub:` loaders read (`config`: more entries of its config)."""
    directory.mkdir(parents=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg or MODEL_CFG, **config})
    )
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "open_clip_model.safetensors")


@pytest.fixture(scope="module")
def open_clip_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    open_clip = pytest.importorskip("open_clip", reason="needs the clip extra: run `make test-clip`")
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    root = tmp_path_factory.mktemp("open_clip")
    torch.manual_seed(0)
    base = open_clip.CLIP(**MODEL_CFG).state_dict()
    write_open_clip(root / "base", base)
    for seed, task in enumerate(("shapes", "colors")):
        # fine-tuned image encoders (the text tower stays frozen, as in the paper), different enough from
        # the base and each other that every row of the report predicts differently
        torch.manual_seed(24 + 2 * seed)
        write_open_clip(
            root / task,
            {k: v + 0.5 * torch.randn_like(v) if k.startswith("visual.") else v for k, v in base.items()},
        )
    generator = torch.Generator().manual_seed(2)
    colors = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=torch.float32)
    images = [
        PILImage.fromarray(
            (colors[i % 3] + 60 * torch.randn(40, 40, 3, generator=generator)).clamp(0, 255).byte().numpy()
        )
        for i in range(24)
    ]
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    Dataset.from_dict({"img": images, "label": [i % 3 for i in range(24)]}, features=features).to_parquet(
        root / "images.parquet"
    )
    return root


def recipe(root: Path, output: Path, method: str, **extra) -> dict:
    task = {
        "data_files": {"test": str(root / "images.parquet")},
        "image_column": "img",
        "templates": TEMPLATES,
    }
    return {
        "version": 1,
        "base": str(root / "base"),
        "models": [str(root / "shapes"), str(root / "colors")],
        "method": method,
        "include": ["visual.*"],
        "output": str(output),
        "evaluation": {"head": "clip_zero_shot", "tasks": {"shapes": task, "colors": task}},
        **extra,
    }


def run(data: dict, tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return runner.invoke(app, ["run", str(path), "-q"])


@torch.no_grad()
def open_clip_accuracy(model_dir: Path, base_dir: Path, images: Path) -> float:
    """Zero-shot accuracy written with open_clip's own API: the head from the base, images through `model_dir`."""
    import open_clip
    from datasets import load_dataset

    base, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{base_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{base_dir}")
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    head = []
    for name in CLASSES:
        text = base.eval().encode_text(tokenizer([t.format(name) for t in TEMPLATES]))
        head.append(torch.nn.functional.normalize(torch.nn.functional.normalize(text, dim=-1).mean(0), dim=0))
    rows = load_dataset("parquet", data_files={"test": str(images)}, split="test")
    pixels = torch.stack([preprocess(image.convert("RGB")) for image in rows["img"]])
    features = torch.nn.functional.normalize(model.eval().encode_image(pixels), dim=-1)
    predicted = (features @ torch.stack(head).T).argmax(-1)
    return float((predicted == torch.tensor(rows["label"])).double().mean())


def test_merged_open_clip_model_loads_with_open_clip_and_scores_as_open_clip_computes(
    open_clip_models: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = run(recipe(open_clip_models, out, "task_arithmetic", parameters={"scaling": 0.5}), tmp_path)
    assert result.exit_code == 0, result.output

    assert (out / "open_clip_model.safetensors").is_file()
    assert json.loads((out / "open_clip_config.json").read_text()) == {"model_cfg": MODEL_CFG}
    merged = load_file(out / "open_clip_model.safetensors")
    base = load_file(open_clip_models / "base" / "open_clip_model.safetensors")
    tasks = [load_file(open_clip_models / t / "open_clip_model.safetensors") for t in ("shapes", "colors")]
    key = "visual.transformer.resblocks.0.attn.in_proj_weight"
    expected = base[key] + 0.5 * sum(t[key] - base[key] for t in tasks)
    torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6)
    assert torch.equal(merged["token_embedding.weight"], base["token_embedding.weight"])

    report = json.loads((out / "hubmerge.json").read_text())["evaluation"]["rows"]
    accuracies = {row: report[row]["accuracy"] for row in ("task_arithmetic", "zero-shot", "fine-tuned")}
    assert len({a for row in accuracies.values() for a in row.values()}) >= 4, accuracies
    images = open_clip_models / "images.parquet"
    for row, model_dir in (
        ("task_arithmetic", out),
        ("zero-shot", open_clip_models / "base"),
        ("fine-tuned", None),
    ):
        for task in ("shapes", "colors"):
            expected_accuracy = open_clip_accuracy(
                model_dir or open_clip_models / task, open_clip_models / "base", images
            )
            assert report[row]["accuracy"][task] == pytest.approx(expected_accuracy, abs=1e-12), (row, task)

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "open_clip"
    assert "open_clip.create_model_and_transforms(" in card.text


def test_materialized_task_of_a_compressed_open_clip_merge_loads_with_open_clip(
    open_clip_models: Path, tmp_path: Path
) -> None:
    import open_clip

    out = tmp_path / "tall"
    result = run(recipe(open_clip_models, out, "tall_masks"), tmp_path)
    assert result.exit_code == 0, result.output
    target = tmp_path / "colors-model"
    result = runner.invoke(app, ["materialize", str(out), "--task", "colors", "--output", str(target)])
    assert result.exit_code == 0, result.output

    assert (target / "open_clip_model.safetensors").is_file()
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{target}")
    from hubmerge import CompressedMerge

    rebuilt = CompressedMerge.from_pretrained(out).materialize("colors")
    for key, value in model.state_dict().items():
        if key in rebuilt:
            assert torch.equal(value, rebuilt[key].to(value.dtype)), key
    report = json.loads((out / "hubmerge.json").read_text())["evaluation"]["rows"]
    assert report["tall_masks"]["accuracy"]["colors"] == pytest.approx(
        open_clip_accuracy(target, open_clip_models / "base", open_clip_models / "images.parquet"), abs=1e-12
    )


def test_an_open_clip_base_without_the_clip_extra_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    monkeypatch.setitem(sys.modules, "open_clip", None)  # `import open_clip` raises ImportError
    state = {"visual.proj": torch.randn(4, 4), "text_projection": torch.randn(4, 4)}
    for name in ("base", "shapes", "colors"):
        write_open_clip(tmp_path / name, {k: v + (name != "base") for k, v in state.items()})
    image = PILImage.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy())
    features = Features({"img": Image(), "label": ClassLabel(names=CLASSES)})
    Dataset.from_dict({"img": [image], "label": [0]}, features=features).to_parquet(
        tmp_path / "images.parquet"
    )

    result = run(recipe(tmp_path, tmp_path / "out", "task_arithmetic"), tmp_path)
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "is an open_clip checkpoint (open_clip_config.json)" in message
    assert "pip install 'hubmerge[clip]'" in message
    assert not (tmp_path / "out").exists()


def test_open_clip_weight_files_are_found_safetensors_first(tmp_path: Path) -> None:
    from hubmerge.sources import Provenance, open_local

    state = {"visual.proj": torch.arange(4.0)}
    write_open_clip(tmp_path / "both", state)
    torch.save({"visual.proj": torch.zeros(4)}, tmp_path / "both" / "open_clip_pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "open_clip_pytorch_model.bin")
    for name in ("both", "bin"):
        checkpoint = open_local(tmp_path / name, Provenance(source=name, location=name))
        assert checkpoint.is_open_clip == (name == "both")
        assert torch.equal(checkpoint.read("visual.proj"), state["visual.proj"])
    assert checkpoint.weight_files == [tmp_path / "bin" / "open_clip_pytorch_model.bin"]


def test_open_clip_outputs_are_one_weights_file_whatever_the_shard_limit(tmp_path: Path) -> None:
    """open_clip's loaders read one `open_clip_model.safetensors`, never shards: outputs of an open_clip base
    ignore `--max-shard-size` (no extra needed: nothing is evaluated)."""
    gen = torch.Generator().manual_seed(0)
    base = {f"visual.block{i}.weight": torch.randn(16, 16, generator=gen) for i in range(4)}
    tasks = {
        name: {k: v + torch.randn(v.shape, generator=gen) * 0.1 for k, v in base.items()} for name in "ab"
    }
    write_open_clip(tmp_path / "base", base)
    for name, state in tasks.items():
        write_open_clip(tmp_path / name, state)
    for method in ("task_arithmetic", "tall_masks"):
        data = {
            "version": 1,
            "base": str(tmp_path / "base"),
            "models": [str(tmp_path / name) for name in tasks],
            "method": method,
        }
        path = tmp_path / f"{method}.yaml"
        path.write_text(yaml.safe_dump(data))
        out = tmp_path / f"out-{method}"
        result = runner.invoke(app, ["run", str(path), "--output", str(out), "--max-shard-size", "2KB", "-q"])
        assert result.exit_code == 0, result.output
        if method == "tall_masks":
            task_dir = tmp_path / "task-a"
            result = runner.invoke(
                app,
                [
                    "materialize",
                    str(out),
                    "--task",
                    "a",
                    "--output",
                    str(task_dir),
                    "--max-shard-size",
                    "2KB",
                ],
            )
            assert result.exit_code == 0, result.output
            out = task_dir
        assert sorted(p.name for p in out.glob("*.safetensors*")) == ["open_clip_model.safetensors"]
        merged = load_file(out / "open_clip_model.safetensors")
        assert merged.keys() == base.keys()
        if method == "task_arithmetic":
            for k, v in base.items():
                assert torch.equal(merged[k], v + ((tasks["a"][k] - v) + (tasks["b"][k] - v)))


# -- ready models from a compressed artifact (load_model, switchable) -------------------------------------------

# Variants of MODEL_CFG that open_clip's factory builds differently: QuickGELU and a logit bias; the custom text
# tower (CustomTextCLIP); CoCa (custom text with a multimodal decoder); a Hugging Face text tower (filled in by
# the fixture: it names a tiny BERT config on disk, and open_clip must not fetch pretrained weights for it).
# The QuickGELU one has its own preprocessing config, which open_clip merges over its defaults.
VARIANTS = {
    "clip": MODEL_CFG,
    "quick_gelu": {**MODEL_CFG, "quick_gelu": True, "init_logit_bias": -10.0},
    "custom_text": {**MODEL_CFG, "custom_text": True},
    "coca": {
        **MODEL_CFG,
        "custom_text": True,
        "vision_cfg": {**MODEL_CFG["vision_cfg"], "attentional_pool": True, "attn_pooler_heads": 2},
        "text_cfg": {**MODEL_CFG["text_cfg"], "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    },
    "hf_text": {**MODEL_CFG, "text_cfg": {"hf_proj_type": "linear", "hf_pooler_type": "cls_pooler"}},
}
PREPROCESS_CFG = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}


@pytest.fixture(scope="module", params=list(VARIANTS))
def tall_open_clip(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    """A tall_masks artifact of two fine-tunes (image towers) of a tiny open_clip base built by open_clip's own
    factory; returns the artifact and the model config."""
    open_clip = pytest.importorskip("open_clip", reason="needs the clip extra: run `make test-clip`")
    root = tmp_path_factory.mktemp(f"tall-{request.param}")
    model_cfg = json.loads(json.dumps(VARIANTS[request.param]))
    if request.param == "hf_text":
        from transformers import BertConfig

        bert = root / "tiny-bert-config"  # a config only: loading pretrained weights from it fails
        BertConfig(
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=12,
        ).save_pretrained(bert)
        model_cfg["text_cfg"].update(hf_model_name=str(bert), hf_tokenizer_name=str(bert))
    config_only = root / "config-only"
    config_only.mkdir()
    config = {"preprocess_cfg": PREPROCESS_CFG} if request.param == "quick_gelu" else {}
    (config_only / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, **config}))
    torch.manual_seed(0)
    base = open_clip.create_model(f"local-dir:{config_only}", pretrained_text=False).state_dict()
    write_open_clip(root / "base", base, model_cfg, **config)
    for seed, task in enumerate(("shapes", "colors")):
        torch.manual_seed(24 + 2 * seed)
        write_open_clip(
            root / task,
            {k: v + 0.5 * torch.randn_like(v) if k.startswith("visual.") else v for k, v in base.items()},
            model_cfg,
            **config,
        )
    out = root / "tall"
    data = {
        "version": 1,
        "base": str(root / "base"),
        "models": [str(root / "shapes"), str(root / "colors")],
        "method": "tall_masks",
        "output": str(out),
    }
    result = run(data, root)
    assert result.exit_code == 0, result.output
    return out, model_cfg


def fixed_inputs(model_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    size = model_cfg["vision_cfg"]["image_size"]
    vocab = 99 if "hf_model_name" in model_cfg["text_cfg"] else model_cfg["text_cfg"]["vocab_size"]
    return (
        torch.randn(2, 3, size, size, generator=generator),
        torch.randint(1, vocab, (2, 12), generator=generator),
    )


def assert_same_state(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    state, reference = model.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


@torch.no_grad()
def assert_same_outputs(model: torch.nn.Module, expected: torch.nn.Module, model_cfg: dict) -> None:
    images, tokens = fixed_inputs(model_cfg)
    dtype = next(expected.parameters()).dtype
    assert torch.equal(model.encode_image(images.to(dtype)), expected.encode_image(images.to(dtype)))
    assert torch.equal(model.encode_text(tokens), expected.encode_text(tokens))


def test_load_model_of_a_compressed_open_clip_merge_is_what_open_clip_loads(
    tall_open_clip: tuple[Path, dict], tmp_path: Path
) -> None:
    import open_clip

    from hubmerge import CompressedMerge

    out, model_cfg = tall_open_clip
    merge = CompressedMerge.from_pretrained(out)
    for task in merge.tasks:
        model = merge.load_model(task)
        target = merge.save_task(task, tmp_path / task)
        expected, _, _ = open_clip.create_model_and_transforms(f"local-dir:{target}")
        expected.eval()
        assert type(model) is type(expected)
        assert not any(module.training for module in model.modules())
        assert all(tensor.device.type == "cpu" for tensor in model.state_dict().values())
        assert_same_state(model, expected)
        assert_same_outputs(model, expected, model_cfg)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        assert preprocess == open_clip.get_model_preprocess_cfg(expected)
        if model_cfg.get("quick_gelu"):
            assert preprocess["interpolation"] == "bilinear"

    # every weight in bfloat16: open_clip's `pure_bf16` precision
    model = merge.load_model(task, dtype=torch.bfloat16)
    expected = open_clip.create_model(f"local-dir:{target}", precision="pure_bf16").eval()
    assert_same_state(model, expected)
    assert all(b.dtype == e.dtype for b, e in zip(model.buffers(), expected.buffers(), strict=True))
    assert_same_outputs(model, expected, model_cfg)


def test_a_switched_open_clip_model_equals_the_loaded_task_model(tall_open_clip: tuple[Path, dict]) -> None:
    from hubmerge import CompressedMerge

    out, model_cfg = tall_open_clip
    merge = CompressedMerge.from_pretrained(out)
    first, other = merge.tasks
    model = merge.switchable()
    assert model.task == first
    assert_same_state(model, merge.load_model(first))
    for task in (other, first, other):
        model.set_task(task)
        assert model.task == task
        expected = merge.load_model(task)
        assert_same_state(model, expected)
        assert_same_outputs(model, expected, model_cfg)
