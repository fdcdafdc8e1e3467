"""Compressed artifacts as complete task models (issue 14): each task's own tensors and config, `load_model`,
`switchable`, `tau_dtype`, the base's content hash and `base=`, and portable run records.

Fixture: a tiny BERT sequence classifier as the base and three fine-tunes with 2, 3 and 5 labels (their own
heads, excluded from the merge), each with its own `id2label`.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import (
    AutoModelForSequenceClassification,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)
from typer.testing import CliRunner

from hubmerge import CompressedMerge, HubmergeError, parse_recipe, run_recipe
from hubmerge.cli import app
from tests.hubserver import HubServer
from tests.tiny_models import bert_config, perturb_

runner = CliRunner()
LABELS = {"topic": 2, "mood": 3, "genre": 5}
INPUT = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 3, 0, 0]])
ATTENTION = (INPUT != 0).long()


def classifier(labels: int, task: str = "base") -> BertForSequenceClassification:
    names = {i: f"{task}-{i}" for i in range(labels)}
    return BertForSequenceClassification(
        bert_config(num_labels=labels, id2label=names, label2id={v: k for k, v in names.items()})
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("task-models")
    torch.manual_seed(0)
    base = classifier(2)
    base.save_pretrained(root / "base")
    for task, labels in LABELS.items():
        tuned = classifier(labels, task)
        tuned.bert.load_state_dict(base.bert.state_dict())
        perturb_(tuned, 0.02, keep=0.5)
        tuned.save_pretrained(root / task)
    return root


def recipe(root: Path, **extra) -> dict:
    return {
        "version": 1,
        "base": str(root / "base"),
        "models": [{"source": str(root / t), "name": t} for t in LABELS],
        "method": "tall_masks",
        "exclude": ["classifier.*"],
        **extra,
    }


@pytest.fixture(scope="module")
def artifact(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "tall"
    run_recipe(parse_recipe(recipe(models)), output=out)
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=ATTENTION).logits


def test_each_task_is_its_fine_tune(models: Path, artifact: Path, tmp_path: Path, caplog) -> None:
    merge = CompressedMerge.from_pretrained(artifact)
    masks = {t: merge.mask(t) for t in LABELS}
    theta0 = load_file(models / "base" / "model.safetensors")
    tau = load_file(artifact / "tau_mtl.safetensors")
    for task, labels in LABELS.items():
        tuned = load_file(models / task / "model.safetensors")
        rebuilt = merge.materialize(task)
        assert {k: (v.shape, v.dtype) for k, v in rebuilt.items()} == {
            k: (v.shape, v.dtype) for k, v in tuned.items()
        }
        for key in tuned:
            if key in masks[task]:
                expected = torch.where(masks[task][key], theta0[key] + tau[key], theta0[key])
                assert torch.equal(rebuilt[key], expected), key
            else:  # the head and everything else not merged: the fine-tune's, bit for bit
                assert torch.equal(rebuilt[key], tuned[key]), key
        target = merge.save_task(task, tmp_path / task)
        with caplog.at_level(logging.WARNING):
            loaded, info = AutoModelForSequenceClassification.from_pretrained(
                target, output_loading_info=True
            )
        assert all(not v for v in info.values()), info
        assert loaded.config.num_labels == labels
        assert loaded.config.id2label == {i: f"{task}-{i}" for i in range(labels)}
        assert json.loads((target / "config.json").read_text())["id2label"]["0"] == f"{task}-0"


def test_the_record_counts_each_tasks_own_part(models: Path, artifact: Path) -> None:
    record = json.loads((artifact / "hubmerge.json").read_text())
    for task in record["tasks"]:
        own = load_file(artifact / task["private"]["file"])
        assert set(own) <= {"classifier.weight", "classifier.bias"} and "classifier.weight" in own
        assert task["private"]["bytes"] == sum(t.numel() * t.element_size() for t in own.values())
        assert task["files"] == ["config.json"]
    storage = record["storage"]
    assert storage["private_bits"] == 8 * sum(t["private"]["bytes"] for t in record["tasks"])
    d, t = storage["parameters"], storage["tasks"]
    assert storage["artifact_bits"] == 32 * d + t * d + storage["private_bits"]
    out = runner.invoke(app, ["inspect", str(artifact)]).stdout
    assert "tasks' own tensors" in " ".join(out.split())


@pytest.mark.parametrize("block", [1 << 20, 40], ids=["whole-tensors", "row-blocks"])
def test_load_model_equals_from_pretrained_of_the_materialized_directory(
    artifact: Path, tmp_path: Path, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hubmerge.task_reader.READ_BLOCK_ENTRIES", block)
    merge = CompressedMerge.from_pretrained(artifact)
    for dtype in (None, torch.bfloat16):
        model = merge.load_model("genre", dtype=dtype)
        target = merge.save_task("genre", tmp_path / f"genre-{dtype}")
        reference = AutoModelForSequenceClassification.from_pretrained(target, dtype=dtype or torch.float32)
        assert isinstance(model, BertForSequenceClassification) and not model.training
        assert model.dtype == (dtype or torch.float32)
        assert torch.equal(logits(model), logits(reference))
        assert model.config.id2label == reference.config.id2label


def test_load_model_with_an_auto_class_and_tied_weights(tmp_path: Path) -> None:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    for i in range(2):
        tuned = LlamaForCausalLM.from_pretrained(tmp_path / "base")
        perturb_(tuned, 0.02)
        tuned.save_pretrained(tmp_path / f"t{i}")
    data = {
        "version": 1,
        "base": str(tmp_path / "base"),
        "models": [str(tmp_path / "t0"), str(tmp_path / "t1")],
    }
    run_recipe(parse_recipe({**data, "method": "tall_masks"}), output=tmp_path / "out")
    merge = CompressedMerge.from_pretrained(tmp_path / "out")
    from transformers import AutoModelForCausalLM

    model = merge.load_model("t1", model_class=AutoModelForCausalLM)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = AutoModelForCausalLM.from_pretrained(merge.save_task("t1", tmp_path / "t1-model"))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(sorted(LABELS)), min_size=1, max_size=6))
def test_any_switch_sequence_equals_loading_the_task(artifact: Path, switches: list[str]) -> None:
    merge = CompressedMerge.from_pretrained(artifact)
    served = merge.switchable()
    handed_out = dict(served.named_parameters())  # what user code may hold on to
    for task in switches:
        served.set_task(task)
    task = switches[-1]
    assert served.task == task
    loaded = merge.load_model(task)
    assert served.state_dict().keys() == loaded.state_dict().keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(served.state_dict()[key], tensor), key
    assert all(p is handed_out[n] for n, p in served.named_parameters())
    assert served.config.id2label == loaded.config.id2label and served.num_labels == loaded.num_labels
    assert served.classifier.out_features == LABELS[task]
    assert torch.equal(logits(served), logits(loaded))


def test_switching_reads_no_file(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = CompressedMerge.from_pretrained(artifact).switchable()

    def no_reads(*args, **kwargs):
        raise AssertionError("set_task read a file")

    monkeypatch.setattr("hubmerge.compressed.safe_open", no_reads)
    monkeypatch.setattr("hubmerge.sources.SafetensorsReader.read", no_reads)
    monkeypatch.setattr("hubmerge.sources.Checkpoint.read", no_reads)
    served.set_task("mood")
    served.set_task("topic")
    with pytest.raises(HubmergeError, match="unknown task 'nope'; this artifact has: topic, mood, genre"):
        served.set_task("nope")


def test_a_head_of_another_shape_must_be_excluded(models: Path, tmp_path: Path) -> None:
    data = recipe(models)
    del data["exclude"]
    with pytest.raises(
        HubmergeError,
        match=r"shape mismatch classifier\.bias \[3\] vs base \[2\].*exclude: \['classifier\.\*'\]; each task",
    ):
        run_recipe(parse_recipe(data), output=tmp_path / "out")


def test_tau_dtype_stores_a_bfloat16_vector(models: Path, artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "bf16"
    run_recipe(parse_recipe(recipe(models, tau_dtype="bfloat16")), output=out)
    stored = load_file(out / "tau_mtl.safetensors")
    full = load_file(artifact / "tau_mtl.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert all(torch.equal(stored[k], full[k].bfloat16()) for k in full)  # masks are the same
    merge = CompressedMerge.from_pretrained(out)
    theta0 = load_file(models / "base" / "model.safetensors")
    mask = merge.mask("mood")
    rebuilt = merge.materialize("mood")
    for key, m in mask.items():
        assert torch.equal(rebuilt[key], torch.where(m, theta0[key] + stored[key].float(), theta0[key])), key
    record = json.loads((out / "hubmerge.json").read_text())
    assert record["vector"]["dtype"] == "bfloat16"
    d, t = record["storage"]["parameters"], record["storage"]["tasks"]
    assert record["storage"]["artifact_bits"] == 16 * d + t * d + record["storage"]["private_bits"]
    with pytest.raises(HubmergeError, match="tau_dtype: applies to compressed outputs"):
        parse_recipe({**recipe(models, tau_dtype="bfloat16"), "method": "task_arithmetic"})


def test_a_moved_or_different_base(models: Path, tmp_path: Path) -> None:
    moved = tmp_path / "models"
    shutil.copytree(models, moved)
    out = tmp_path / "out"
    run_recipe(parse_recipe(recipe(moved)), output=out)
    record = json.loads((out / "hubmerge.json").read_text())
    assert len(record["base"]["sha256"]) == 64
    shutil.move(moved / "base", tmp_path / "elsewhere")
    merge = CompressedMerge.from_pretrained(out)
    with pytest.raises(HubmergeError, match=r"is not there; point to it with base= \(or --base\)"):
        merge.materialize("mood")
    expected = merge.load_model("mood", base=tmp_path / "elsewhere")
    assert torch.equal(logits(expected), logits(merge.load_model("mood")))  # base= stays until changed

    other = tmp_path / "other"
    shutil.copytree(tmp_path / "elsewhere", other)
    weights = load_file(other / "model.safetensors")
    weights["bert.pooler.dense.bias"] += 1
    from safetensors.torch import save_file

    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HubmergeError, match="not the base this artifact was made from"):
        merge.load_model("mood", base=other)
    result = runner.invoke(
        app, ["materialize", str(out), "-t", "mood", "-o", str(tmp_path / "m"), "--base", str(other)]
    )
    assert result.exit_code == 2 and "not the base this artifact was made from" in result.stderr
    result = runner.invoke(
        app,
        [
            "materialize",
            str(out),
            "-t",
            "mood",
            "-o",
            str(tmp_path / "m"),
            "--base",
            str(tmp_path / "elsewhere"),
        ],
    )
    assert result.exit_code == 0, result.output


def test_an_artifact_of_format_version_1_still_rebuilds_every_base_tensor(
    models: Path, artifact: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    shutil.copytree(artifact, old)
    record = json.loads((old / "hubmerge.json").read_text())
    record["format_version"] = 1
    for task in record["tasks"]:
        for key in ("private", "from_base", "merged_dtypes", "files"):
            del task[key]
    (old / "hubmerge.json").write_text(json.dumps(record))
    rebuilt = CompressedMerge.from_pretrained(old).materialize("genre")
    assert rebuilt.keys() == load_file(models / "base" / "model.safetensors").keys()
    assert rebuilt["classifier.weight"].shape == (2, 32)  # the base's head, as version 1 artifacts did


def test_scoring_a_compressed_output_switches_instead_of_rebuilding(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"text": "a b", "label": 0}, {"text": "b a", "label": 1}]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from tests.tiny_models import wordpiece_tokenizer

    for name in ("base", *LABELS):
        wordpiece_tokenizer(models / name, ["a", "b"]).save_pretrained(models / name)
    evaluation = {
        "head": "sequence_classification",
        "tasks": {t: {"data_files": {"test": str(data)}} for t in LABELS},
    }
    for task in LABELS:
        evaluation["tasks"][task]["label_names"] = [f"{task}-{i}" for i in range(LABELS[task])]

    def rebuilt(*args, **kwargs):
        raise AssertionError("the report rebuilt a task from files")

    monkeypatch.setattr(CompressedMerge, "iter_materialized", rebuilt)
    result = run_recipe(parse_recipe(recipe(models, evaluation=evaluation)), output=tmp_path / "out")
    assert set(result.record["evaluation"]["rows"]["tall_masks"]["accuracy"]) == set(LABELS)


def test_artifacts_of_hub_sources_hold_no_local_path(
    hub: HubServer, hf_token: str, models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("base", *LABELS):
        files = {p.name: p.read_bytes() for p in (models / name).iterdir() if p.is_file()}
        hub.seed_repo(f"alice/{name}", files)
    data = {
        **recipe(models),
        "base": "alice/base",
        "models": [{"source": f"alice/{t}", "name": t} for t in LABELS],
        "push": {"repo_id": "alice/tasks"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv("HF_TOKEN", hf_token)
    result = runner.invoke(app, ["run", str(path), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    for name in ("hubmerge.json", "README.md", "hubmerge_recipe.yaml"):
        text = (tmp_path / "out" / name).read_text()
        for local in (str(tmp_path), str(models), "/tmp/", str(Path.home())):
            assert local not in text, (name, local)
    merge = CompressedMerge.from_pretrained("alice/tasks")
    assert "load_model" in (merge.directory / "README.md").read_text()
    model = merge.load_model("genre")
    reference = AutoModelForSequenceClassification.from_pretrained(models / "genre")
    assert model.config.id2label == reference.config.id2label
    assert torch.equal(model.classifier.weight, reference.classifier.weight)

    mirror = tmp_path / "mirror"  # a local copy of the Hub base serves as well; another model does not
    shutil.copytree(models / "base", mirror)
    assert torch.equal(logits(merge.load_model("genre", base=mirror)), logits(model))
    torch.manual_seed(3)
    BertForSequenceClassification(bert_config(hidden_size=16)).save_pretrained(tmp_path / "small")
    with pytest.raises(HubmergeError, match=r"small: tensor 'bert\..*' is \[.*\], this artifact's is \["):
        merge.load_model("genre", base=tmp_path / "small")


def test_a_tensor_the_base_lacks_is_the_tasks_own(models: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    extra = tmp_path / "extra"
    shutil.copytree(models / "mood", extra)
    weights = load_file(extra / "model.safetensors")
    weights["adapter.scale"] = torch.tensor([0.5, 2.0])
    save_file(weights, extra / "model.safetensors", metadata={"format": "pt"})
    data = recipe(models)
    data["models"][1]["source"] = str(extra)
    run_recipe(parse_recipe(data), output=tmp_path / "out")
    rebuilt = CompressedMerge.from_pretrained(tmp_path / "out").materialize("mood")
    assert torch.equal(rebuilt["adapter.scale"], weights["adapter.scale"])
    with pytest.raises(HubmergeError, match=r"model 'mood' .* extra keys adapter\.scale"):
        run_recipe(parse_recipe({**data, "method": "task_arithmetic"}), output=tmp_path / "merged")


def test_a_base_whose_tensors_differ_in_dtype_is_refused_without_a_content_hash(
    artifact: Path, models: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact, copy)
    record = json.loads((copy / "hubmerge.json").read_text())
    del record["base"]["sha256"]  # as for a Hub base: only the recorded dtypes and shapes can tell
    (copy / "hubmerge.json").write_text(json.dumps(record))
    half = tmp_path / "half"
    shutil.copytree(models / "base", half)
    weights = load_file(half / "model.safetensors")
    from safetensors.torch import save_file

    save_file(
        {k: v.half() for k, v in weights.items()}, half / "model.safetensors", metadata={"format": "pt"}
    )
    with pytest.raises(
        HubmergeError, match=r"half: tensor '.*' is torch.float16, this artifact's base stores it as F32"
    ):
        CompressedMerge.from_pretrained(copy).load_model("topic", base=half)


def test_switchable_refuses_tasks_of_other_classes_or_dtypes(models: Path, tmp_path: Path) -> None:
    from transformers import BertForMultipleChoice

    torch.manual_seed(5)
    choice = BertForMultipleChoice(bert_config())
    choice.bert.load_state_dict(
        BertForSequenceClassification.from_pretrained(models / "base").bert.state_dict()
    )
    perturb_(choice, 0.02, keep=0.5)
    choice.save_pretrained(tmp_path / "choice")
    data = recipe(models)
    data["models"] = [data["models"][0], {"source": str(tmp_path / "choice"), "name": "choice"}]
    run_recipe(parse_recipe(data), output=tmp_path / "mixed")
    merge = CompressedMerge.from_pretrained(tmp_path / "mixed")
    assert isinstance(merge.load_model("choice"), BertForMultipleChoice)
    with pytest.raises(
        HubmergeError, match=r"different models .*BertForMultipleChoice.*load each with load_model"
    ):
        merge.switchable()

    BertForSequenceClassification.from_pretrained(models / "mood", dtype=torch.bfloat16).save_pretrained(
        tmp_path / "mood16"
    )
    data["models"] = [recipe(models)["models"][0], {"source": str(tmp_path / "mood16"), "name": "mood"}]
    run_recipe(parse_recipe(data), output=tmp_path / "dtypes")
    merge = CompressedMerge.from_pretrained(tmp_path / "dtypes")
    with pytest.raises(HubmergeError, match=r"store '.*' as torch.float32 and torch.bfloat16; pass dtype="):
        merge.switchable()
    served = merge.switchable(dtype=torch.float32)
    served.set_task("mood")
    loaded = merge.load_model("mood", dtype=torch.float32)
    assert all(torch.equal(served.state_dict()[k], v) for k, v in loaded.state_dict().items())


def test_a_stored_buffer_the_model_does_not_save_is_left_to_the_model(models: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    old = tmp_path / "old"
    shutil.copytree(models / "mood", old)
    weights = load_file(old / "model.safetensors")
    weights["bert.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)  # as older checkpoints stored it
    save_file(weights, old / "model.safetensors", metadata={"format": "pt"})
    data = recipe(models)
    data["models"][1]["source"] = str(old)
    run_recipe(parse_recipe(data), output=tmp_path / "out")
    merge = CompressedMerge.from_pretrained(tmp_path / "out")
    reference = AutoModelForSequenceClassification.from_pretrained(merge.save_task("mood", tmp_path / "mood"))
    assert torch.equal(logits(merge.load_model("mood")), logits(reference))
