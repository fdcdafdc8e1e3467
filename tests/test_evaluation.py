"""Evaluation (zero-shot text, CLIP zero-shot, sequence classification heads) and validation search.

Models are tiny random transformers generated here; data are a few rows written as local files. Scores are
compared with an independent computation on models loaded with `from_pretrained`, not just "it runs".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertForSequenceClassification,
    BertModel,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from hubmerge.cli import app
from hubmerge.evaluation import mean, normalized
from hubmerge.recipe import parse_recipe
from hubmerge.search import run_search
from tests import golden
from tests.processes import hubmerge_cli
from tests.tiny_models import bert_config, clip_config, perturb_, wordpiece_tokenizer

runner = CliRunner()
WORDS = [
    "red",
    "green",
    "blue",
    "cat",
    "dog",
    "fish",
    "one",
    "two",
    "three",
    "apple",
    "pear",
    "plum",
    "sun",
    "moon",
    "star",
]
LABELS = {"colors": ["red", "green", "blue"], "animals": ["cat", "dog", "fish"]}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def text_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT base with a WordPiece tokenizer, two perturbed copies, and two small labelled tasks."""
    root = tmp_path_factory.mktemp("text")
    tokenizer = wordpiece_tokenizer(root, WORDS)
    torch.manual_seed(0)
    model = BertModel(bert_config(vocab_size=len(WORDS) + 5)).eval()
    for name in ("base", *LABELS):
        if name != "base":
            perturb_(model, 0.05)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    generator = torch.Generator().manual_seed(1)
    for task, names in LABELS.items():
        for split, n in (("validation", 24), ("test", 30)):
            rows = []
            for _ in range(n):
                label = int(torch.randint(len(names), (1,), generator=generator))
                noise = [WORDS[int(i)] for i in torch.randint(len(WORDS), (2,), generator=generator)]
                rows.append({"sentence": " ".join([names[label], *noise]), "y": label})
            write_jsonl(root / f"{task}-{split}.jsonl", rows)
    return root


def text_recipe(root: Path, tmp_path: Path, method: str = "task_arithmetic", **extra) -> dict:
    return {
        "version": 1,
        "base": str(root / "base"),
        "models": [str(root / t) for t in LABELS],
        "method": method,
        "output": str(tmp_path / "out"),
        "evaluation": {
            "head": "zero_shot_text",
            "tasks": {
                t: {
                    "data_files": {s: str(root / f"{t}-{s}.jsonl") for s in ("validation", "test")},
                    "text_column": "sentence",
                    "label_column": "y",
                    "label_names": names,
                    "max_length": 8,
                }
                for t, names in LABELS.items()
            },
        },
        **extra,
    }


def run(data: dict, tmp_path: Path, *args: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return runner.invoke(app, ["run", str(path), "-q", *args])


@torch.no_grad()
def independent_accuracy(model_dir: Path, base_dir: Path, rows_file: Path, label_names: list[str]) -> float:
    """Mean-pooled cosine to base-encoded label names, written out directly."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def embed(model: torch.nn.Module, texts: list[str], max_length: int) -> torch.Tensor:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    head = embed(AutoModel.from_pretrained(base_dir).eval(), label_names, 16)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    scores = embed(AutoModel.from_pretrained(model_dir).eval(), [r["sentence"] for r in rows], 8) @ head.T
    return float((scores.argmax(-1) == torch.tensor([r["y"] for r in rows])).double().mean())


def test_zero_shot_text_rows_match_an_independent_computation(text_models: Path, tmp_path: Path) -> None:
    result = run(text_recipe(text_models, tmp_path, parameters={"scaling": 0.5}), tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    report = json.loads((out / "hubmerge.json").read_text())["evaluation"]
    assert list(report["rows"]) == ["zero-shot", "fine-tuned", "task_arithmetic"]
    for task, names in LABELS.items():
        test_file = text_models / f"{task}-test.jsonl"
        expected = {
            "zero-shot": independent_accuracy(text_models / "base", text_models / "base", test_file, names),
            "fine-tuned": independent_accuracy(text_models / task, text_models / "base", test_file, names),
            "task_arithmetic": independent_accuracy(out, text_models / "base", test_file, names),
        }
        for row, value in expected.items():
            assert report["rows"][row]["accuracy"][task] == pytest.approx(value, abs=1e-12), (row, task)
        assert report["rows"]["fine-tuned"]["normalized"][task] == 1.0

    card = ModelCard.load(out / "README.md")
    results = {r.dataset_name: r for r in card.data.eval_results}
    assert set(results) == set(LABELS)
    assert results["colors"].metric_value == pytest.approx(
        report["rows"]["task_arithmetic"]["accuracy"]["colors"]
    )
    assert results["colors"].dataset_split == "test" and results["colors"].metric_type == "accuracy"
    assert "## Evaluation" in card.text


def test_normalized_accuracy_arithmetic() -> None:
    merged, finetuned = {"a": 0.45, "b": 0.8}, {"a": 0.9, "b": 0.8}
    assert normalized(merged, finetuned) == {"a": 0.5, "b": 1.0}
    assert mean(normalized(merged, finetuned)) == 0.75


class FakeEvaluator:
    """Scores overlays by a known function of one weight, so the best candidate is known in advance."""

    def __init__(self, tasks: list[str], score):
        self.tasks = tasks
        self._score = score
        self.device = torch.device("cpu")

    def score(self, task: str, overlay: dict[str, torch.Tensor], split: str) -> float:
        assert split == "validation"
        return self._score(task, overlay)


def test_search_picks_the_known_best_scaling_and_ties_go_to_the_smallest(tmp_path: Path) -> None:
    names = ["task_00", "task_01", "task_02", "task_03"]
    base = {"w": torch.zeros(4)}
    finetuned = {n: {"w": torch.full((4,), 9.0)} for n in names}

    def run_variant(parameters: dict) -> Path:
        assert parameters["scaling"] == 1.0  # the direction is merged once; α is applied in place
        out = tmp_path / "variant"
        out.mkdir(exist_ok=True)
        save_file({"w": torch.ones(4)}, str(out / "model.safetensors"))
        return out

    def alpha(overlay: dict[str, torch.Tensor]) -> float:
        return round(float(overlay["w"].mean()), 6)

    recipe = parse_recipe(
        {**golden.recipe("task_arithmetic"), "evaluation": _dummy_evaluation(names), "search": {}}
    )
    peaked = FakeEvaluator(
        names, lambda t, o: 1.0 if alpha(o) == 9.0 else {0.3: 0.9, 0.2: 0.8, 0.4: 0.8}.get(alpha(o), 0.5)
    )
    result = run_search(recipe, base, finetuned, peaked, run_variant)
    assert result.chosen == {"scaling": 0.3}
    assert result.parameters["scaling"] == 0.3
    assert [row["scaling"] for row in result.rows] == pytest.approx([0.1 * i for i in range(1, 11)])
    assert result.rows[2]["mean_normalized"] == pytest.approx(0.9)

    flat = FakeEvaluator(names, lambda t, o: 1.0 if alpha(o) == 9.0 else 0.5)
    assert run_search(recipe, base, finetuned, flat, run_variant).chosen == {"scaling": 0.1}


def _dummy_evaluation(tasks: list[str]) -> dict:
    return {
        "head": "zero_shot_text",
        "tasks": {t: {"data_files": {"validation": "v.jsonl", "test": "t.jsonl"}} for t in tasks},
    }


def test_lambda_search_chooses_each_tasks_own_best(tmp_path: Path) -> None:
    """On the golden fixture: task_00 prefers the densest mask (λ = 0.2), the others the sparsest (0.6)."""
    data = golden.recipe("tall_masks", {"merge": "task_arithmetic"})
    names = ["task_00", "task_01", "task_02", "task_03"]
    data["models"] = [{"source": m, "name": n} for m, n in zip(data["models"], names, strict=True)]
    recipe = parse_recipe({**data, "evaluation": _dummy_evaluation(names), "search": {}})
    theta0 = golden.base()
    keys = sorted(k for k, v in theta0.items() if v.is_floating_point())
    base = {k: theta0[k].float() for k in keys}
    runs = []

    def run_variant(parameters: dict) -> Path:
        from hubmerge.run import run_recipe

        variant = recipe.model_copy(update={"parameters": parameters, "evaluation": None, "search": None})
        runs.append(parameters["lambda"])
        return run_recipe(variant, output=tmp_path / f"lam-{parameters['lambda']}").output

    def changed(overlay: dict[str, torch.Tensor]) -> float:
        return sum(int((overlay[k] != base[k]).sum()) for k in keys) / sum(base[k].numel() for k in keys)

    evaluator = FakeEvaluator(
        names, lambda t, o: 1.0 if o is finetuned[t] else (changed(o) if t == "task_00" else -changed(o))
    )
    finetuned = {n: {k: base[k] + 1 for k in keys} for n in names}
    result = run_search(recipe, base, finetuned, evaluator, run_variant)
    assert runs == [0.2, 0.3, 0.4, 0.5, 0.6]
    assert result.chosen == {"lambda": {"task_00": 0.2, "task_01": 0.6, "task_02": 0.6, "task_03": 0.6}}


def test_search_end_to_end_writes_the_chosen_values(text_models: Path, tmp_path: Path) -> None:
    data = text_recipe(text_models, tmp_path, "consensus", search={"k": [1, 2], "scaling": [0.5, 1.0]})
    result = run(data, tmp_path)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    record = json.loads((out / "hubmerge.json").read_text())
    chosen = record["search"]["chosen"]
    assert set(chosen) == {"k", "scaling"} and len(record["search"]["candidates"]) == 4
    best = max(record["search"]["candidates"], key=lambda r: r["mean_normalized"])
    assert (best["k"], best["scaling"]) == (chosen["k"], chosen["scaling"])
    assert record["parameters"]["k"] == chosen["k"] and record["parameters"]["scaling"] == chosen["scaling"]
    pinned = yaml.safe_load((out / "hubmerge_recipe.yaml").read_text())
    assert pinned["parameters"]["k"] == chosen["k"]
    assert not any(".search-" in p.name for p in tmp_path.iterdir())


def test_eval_command_scores_an_existing_output(text_models: Path, tmp_path: Path) -> None:
    data = text_recipe(text_models, tmp_path, "tall_masks")
    evaluation = data.pop("evaluation")
    assert run(data, tmp_path).exit_code == 0
    data["evaluation"] = evaluation
    path = tmp_path / "with-eval.yaml"
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["eval", str(path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "hubmerge.json").read_text())["evaluation"]
    assert list(report["rows"]) == ["zero-shot", "fine-tuned", "tall_masks"]
    assert "tall_masks" in result.output


def test_sequence_classification_keeps_each_tasks_head(tmp_path: Path) -> None:
    root = tmp_path / "cls"
    tokenizer = wordpiece_tokenizer(tmp_path, WORDS)
    torch.manual_seed(3)
    config = bert_config(vocab_size=len(WORDS) + 5, num_hidden_layers=1, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    for name in ("base", "colors", "animals"):
        perturb_(model, 0.05)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    rows = [{"text": f"{w} {w}", "label": i % 3} for i, w in enumerate(WORDS)]
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows) for s in ("validation", "test")}
    data = {
        "version": 1,
        "base": str(root / "base"),
        "models": [str(root / "colors"), str(root / "animals")],
        "method": "task_arithmetic",
        "exclude": ["classifier.*"],
        "output": str(tmp_path / "out"),
        "evaluation": {
            "head": "sequence_classification",
            "tasks": {
                t: {"data_files": files, "label_names": ["x", "y", "z"]} for t in ("colors", "animals")
            },
        },
    }
    result = run(data, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "hubmerge.json").read_text())["evaluation"]
    for task in ("colors", "animals"):
        own = BertForSequenceClassification.from_pretrained(root / task).eval()
        enc = tokenizer(
            [r["text"] for r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt"
        )
        with torch.no_grad():
            predicted = own(**enc).logits.argmax(-1)
        expected = float((predicted == torch.tensor([r["label"] for r in rows])).double().mean())
        assert report["rows"]["fine-tuned"]["accuracy"][task] == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    config = clip_config(text_vocab_size=40)
    CLIPModel(config).save_pretrained(root / "base")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "a", "photo", "of", "red", "green", "blue", "."])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(root / "base")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        root / "base"
    )
    for task in ("shapes", "colors"):
        vision = CLIPVisionModel.from_pretrained(root / "base")
        perturb_(vision, 0.02)
        vision.save_pretrained(root / task)
    generator = torch.Generator().manual_seed(2)
    images = [
        PILImage.fromarray((torch.rand(40, 40, 3, generator=generator) * 255).byte().numpy())
        for _ in range(12)
    ]
    features = Features({"img": Image(), "label": ClassLabel(names=["red", "green", "blue"])})
    Dataset.from_dict({"img": images, "label": [i % 3 for i in range(12)]}, features=features).to_parquet(
        root / "images.parquet"
    )
    return root


def test_clip_zero_shot_on_a_tiny_clip(clip_models: Path, tmp_path: Path) -> None:
    task = {
        "data_files": {"test": str(clip_models / "images.parquet")},
        "image_column": "img",
        "templates": ["a photo of {}", "{} ."],
    }
    data = {
        "version": 1,
        "base": str(clip_models / "base"),
        "models": [str(clip_models / "shapes"), str(clip_models / "colors")],
        "method": "task_arithmetic",
        "include": ["vision_model.*"],
        "output": str(tmp_path / "out"),
        "evaluation": {"head": "clip_zero_shot", "tasks": {"shapes": task, "colors": task}},
    }
    result = run(data, tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "hubmerge.json").read_text())["evaluation"]

    model = CLIPModel.from_pretrained(clip_models / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_models / "base")
    processor = CLIPImageProcessor.from_pretrained(clip_models / "base")
    from datasets import load_dataset

    rows = load_dataset("parquet", data_files={"test": str(clip_models / "images.parquet")}, split="test")
    with torch.no_grad():
        text = []
        for name in ["red", "green", "blue"]:
            enc = tokenizer([f"a photo of {name}", f"{name} ."], padding=True, return_tensors="pt")
            t = torch.nn.functional.normalize(
                model.text_projection(model.text_model(**enc).pooler_output), dim=-1
            )
            text.append(torch.nn.functional.normalize(t.mean(0), dim=0))
        pixels = processor(images=[im.convert("RGB") for im in rows["img"]], return_tensors="pt")[
            "pixel_values"
        ]
        image = torch.nn.functional.normalize(
            model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1
        )
        expected = float(
            ((image @ torch.stack(text).T).argmax(-1) == torch.tensor(rows["label"])).double().mean()
        )
    assert report["rows"]["zero-shot"]["accuracy"]["shapes"] == pytest.approx(expected, abs=1e-12)
    assert (
        ModelCard.load(tmp_path / "out" / "README.md").data.eval_results[0].task_type
        == "image-classification"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["evaluation"]["tasks"]["colors"].update(text_column="txt"),
            "has no input column 'txt' (columns: sentence, y)",
        ),
        (
            lambda d: d["evaluation"]["tasks"]["colors"].update(label_names=["red", "green"]),
            "is out of range for 2 classes",
        ),
        (
            lambda d: d["evaluation"]["tasks"].pop("animals"),
            "evaluation.tasks: task 'animals' has no evaluation data",
        ),
        (lambda d: d["evaluation"].update(head="clip_zero_shot"), "clip_zero_shot needs a CLIPModel base"),
        (
            lambda d: d.update(search={}, method="weight_average"),
            "search: weight_average has no parameter to search",
        ),
        (lambda d: d.pop("evaluation") and d.update(search={}), "search: needs an `evaluation:` section"),
    ],
)
def test_bad_evaluation_input(text_models: Path, tmp_path: Path, change, message: str) -> None:
    data = text_recipe(text_models, tmp_path)
    change(data)
    result = run(data, tmp_path)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_search_with_two_processes_chooses_and_writes_what_one_process_does(
    text_models: Path, tmp_path: Path
) -> None:
    data = text_recipe(text_models, tmp_path, "consensus", search={"k": [1, 2], "scaling": [0.5, 1.0]})
    (tmp_path / "single").mkdir()
    single = run(data, tmp_path / "single", "-o", str(tmp_path / "single" / "out"))
    assert single.exit_code == 0, single.output
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(data))

    done = hubmerge_cli("run", str(recipe), "-q", "--num-processes", "2")

    assert done.returncode == 0, done.stderr[-4000:]
    one, two = (
        json.loads((d / "hubmerge.json").read_text()) for d in (tmp_path / "single" / "out", tmp_path / "out")
    )
    assert two["processes"] == 2
    assert two["search"] == one["search"] and two["evaluation"] == one["evaluation"]
    weights = "model.safetensors"
    assert (tmp_path / "out" / weights).read_bytes() == (tmp_path / "single" / "out" / weights).read_bytes()


def test_compressed_output_is_scored_during_the_run_as_the_eval_command_scores_it(
    text_models: Path, tmp_path: Path
) -> None:
    data = text_recipe(text_models, tmp_path, "tall_masks")
    result = run(data, tmp_path)
    assert result.exit_code == 0, result.output
    manifest = tmp_path / "out" / "hubmerge.json"
    during_run = json.loads(manifest.read_text())["evaluation"]
    assert list(during_run["rows"]) == ["zero-shot", "fine-tuned", "tall_masks"]

    assert runner.invoke(app, ["eval", str(tmp_path / "recipe.yaml")]).exit_code == 0

    assert json.loads(manifest.read_text())["evaluation"] == during_run
