"""`include` / `exclude`: merge part of the base, e.g. CLIPVisionModel fine-tunes of a CLIPModel base.

This is the layout of the paper's public CLIP checkpoints (openai/clip-vit-base-patch32 as CLIPModel, task
fine-tunes as CLIPVisionModel), reproduced with a tiny random CLIP generated here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, CLIPModel, CLIPVisionModel
from typer.testing import CliRunner

from hubmerge import CompressedMerge
from hubmerge.cli import app
from tests.tiny_models import clip_config, perturb_

runner = CliRunner()
TASKS = ("cars", "dtd")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = clip_config()
    CLIPModel(config).save_pretrained(root / "base")
    for task in TASKS:
        vision = CLIPVisionModel.from_pretrained(root / "base")
        perturb_(vision, 0.01)
        vision.save_pretrained(root / task)
    return root


def run(clip: Path, tmp_path: Path, method: str, **extra) -> tuple[int, str, Path]:
    recipe = {
        "version": 1,
        "base": str(clip / "base"),
        "models": [str(clip / t) for t in TASKS],
        "method": method,
        "output": str(tmp_path / method),
        **extra,
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["run", str(path), "-q"])
    return result.exit_code, " ".join(result.output.split()), tmp_path / method


def test_without_include_the_error_suggests_it(clip: Path, tmp_path: Path) -> None:
    code, output, out = run(clip, tmp_path, "task_arithmetic")
    assert code == 2
    assert "model 'cars'" in output and "missing keys logit_scale, text_model." in output
    assert "include: ['vision_model.*']" in output
    assert not out.exists()


def test_merging_the_vision_tower_only(clip: Path, tmp_path: Path) -> None:
    code, output, out = run(
        clip, tmp_path, "task_arithmetic", parameters={"scaling": 0.3}, include=["vision_model.*"]
    )
    assert code == 0, output
    base = load_file(clip / "base" / "model.safetensors")
    tuned = [load_file(clip / t / "model.safetensors") for t in TASKS]
    merged = AutoModel.from_pretrained(out)
    assert isinstance(merged, CLIPModel)
    state = merged.state_dict()
    for key, theta0 in base.items():
        if key.startswith("vision_model."):
            tau = sum((t[key].float() - theta0.float() for t in tuned), torch.zeros_like(theta0))
            assert torch.equal(state[key], theta0 + 0.3 * tau), key
        else:
            assert torch.equal(state[key], theta0), key  # text tower and projections: the base's
    pinned = yaml.safe_load((out / "hubmerge_recipe.yaml").read_text())
    assert pinned["include"] == ["vision_model.*"]


def test_exclude_keeps_those_tensors_at_the_base(clip: Path, tmp_path: Path) -> None:
    code, output, out = run(
        clip,
        tmp_path,
        "task_arithmetic",
        include=["vision_model.*"],
        exclude=["vision_model.embeddings.*"],
    )
    assert code == 0, output
    base = load_file(clip / "base" / "model.safetensors")
    written = load_file(out / "model.safetensors")
    assert torch.equal(
        written["vision_model.embeddings.class_embedding"], base["vision_model.embeddings.class_embedding"]
    )
    key = "vision_model.post_layernorm.weight"
    assert not torch.equal(written[key], base[key])


def test_tall_masks_on_the_vision_tower_rebuild_the_vision_fine_tunes(clip: Path, tmp_path: Path) -> None:
    code, output, out = run(clip, tmp_path, "tall_masks", include=["vision_model.*"])
    assert code == 0, output
    merge = CompressedMerge.from_pretrained(out)
    assert all(key.startswith("vision_model.") for key in merge.mask("cars"))
    rebuilt = merge.materialize("cars")
    tuned = load_file(clip / "cars" / "model.safetensors")
    assert rebuilt.keys() == tuned.keys()  # the task is its fine-tune: a CLIPVisionModel, no text tower
    target = merge.save_task("cars", tmp_path / "cars")
    assert isinstance(AutoModel.from_pretrained(target), CLIPVisionModel)
    assert isinstance(merge.load_model("cars"), CLIPVisionModel)


def test_include_matching_nothing(clip: Path, tmp_path: Path) -> None:
    code, output, _ = run(clip, tmp_path, "task_arithmetic", include=["visual_tower.*"])
    assert code == 2
    assert "has no floating-point weights selected by include/exclude" in output
