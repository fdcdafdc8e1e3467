"""The `causal_lm` evaluation head: perplexity and multiple-choice accuracy of a tiny random Llama.

Every number is checked against a direct computation: one text (or context + choice) at a time, unbatched,
logits -> log_softmax -> gather, on a model loaded with `from_pretrained` or given the overlay's weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from rich.console import Console
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)
from typer.testing import CliRunner

from hubmerge.causal_lm_eval import choice_sequences, log_likelihoods, predict_choices
from hubmerge.cli import app
from hubmerge.display import print_evaluation
from hubmerge.errors import HubmergeError, RecipeError
from hubmerge.evaluation import Evaluator, better, higher_is_better
from hubmerge.recipe import Evaluation, parse_recipe
from hubmerge.search import run_search
from tests import golden
from tests.test_evaluation import FakeEvaluator
from tests.tiny_models import llama_config, perturb_

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = ["the", "a", "cat", "dog", "fish", "bird", "eats", "sees", "runs", "red", "green", "blue"]
WORDS += ["sun", "moon", "star", "big", "small", "one", "two", "three", "and"]
MAX_LENGTH = 10
TEXTS = [
    "the cat eats fish",
    "a dog",
    "the big red dog sees a small blue bird and the sun and the moon",  # longer than MAX_LENGTH
    "one two three",
    "the moon",
    "a small green fish runs",
    "star",
]
QUESTIONS = [
    ("the cat eats", ["fish", "the moon", "red"]),
    ("a big dog sees the", ["bird", "sun", "small cat", "three"]),
    ("one two", ["three", "fish eats"]),
    ("the sun and the", ["moon", "star"]),
    ("a red bird ", ["runs", "sees a cat", "eats"]),  # trailing space: moved to the choices
    ("green", ["blue fish", "dog", "star"]),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, whitespace-split, BOS prepended by default (as Llama's tokenizer does), no EOS."""
    vocab = {token: i for i, token in enumerate([*SPECIAL, *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama base, two perturbed fine-tunes, and text / multiple-choice data files."""
    root = tmp_path_factory.mktemp("causal_lm")
    tokenizer = llama_tokenizer()
    config = llama_config(vocab_size=len(SPECIAL) + len(WORDS))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    for name in ("base", "t0", "t1"):
        if name != "base":
            perturb_(model, 0.05)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    for split in ("validation", "test"):
        write_jsonl(root / f"texts-{split}.jsonl", [{"text": t} for t in TEXTS])
    return root


def load(directory: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(ids[j + 1] | ids[: j + 1]) for every j, from one unpadded sequence."""
    logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def direct_perplexity(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text)["input_ids"][:MAX_LENGTH]
        nll -= float(token_logprobs(model, ids).sum())
        count += len(ids) - 1
    return math.exp(nll / count)


def direct_choice_scores(
    model: torch.nn.Module, tokenizer: Any, context: str, choices: list[str]
) -> list[float]:
    context_ids = tokenizer(context)["input_ids"]
    scores = []
    for choice in choices:
        ids = context_ids + tokenizer(choice, add_special_tokens=False)["input_ids"]
        scores.append(float(token_logprobs(model, ids)[len(context_ids) - 1 :].sum()))
    return scores


def evaluator(lm: Path, tasks: dict[str, dict], metric: str, batch_size: int) -> Evaluator:
    evaluation = Evaluation.model_validate(
        {"head": "causal_lm", "metric": metric, "batch_size": batch_size, "tasks": tasks}
    )
    scorer = Evaluator(evaluation, lm / "base", {t: lm / "base" for t in tasks}, torch.device("cpu"))
    scorer.prepare(["test"])
    return scorer


def text_task(lm: Path) -> dict:
    return {"data_files": {"test": str(lm / "texts-test.jsonl")}, "max_length": MAX_LENGTH}


def perturbed(base: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in base.items()}


def with_weights(directory: Path, overlay: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = load(directory)
    model.load_state_dict(overlay)
    return model


def test_tokenization_adds_bos_and_truncates(lm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lm / "base")
    assert tokenizer("the cat")["input_ids"] == [1, 4, 6]
    assert len(tokenizer(TEXTS[2])["input_ids"]) > MAX_LENGTH  # the long text is cut


def test_perplexity_matches_a_direct_computation_with_and_without_an_overlay(lm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lm / "base")
    base = {k: v.float() for k, v in load_file(lm / "base" / "model.safetensors").items()}
    other = perturbed(base)
    expected = direct_perplexity(load(lm / "base"), tokenizer, TEXTS)
    expected_other = direct_perplexity(with_weights(lm / "base", other), tokenizer, TEXTS)
    assert expected_other != pytest.approx(expected, rel=1e-2)
    for batch_size in (3, 64):  # 3: batches of texts of different lengths, padded and split
        scorer = evaluator(lm, {"a": text_task(lm)}, "perplexity", batch_size)
        assert scorer.score("a", base, "test") == pytest.approx(expected, rel=1e-5)
        assert scorer.score("a", other, "test") == pytest.approx(expected_other, rel=1e-5)
        assert scorer.score("a", base, "test") == pytest.approx(expected, rel=1e-5)  # overlays are reversible


def write_choices(path: Path, labels: list[int], column: str = "choices") -> Path:
    return write_jsonl(
        path,
        [{"text": q, column: options, "label": y} for (q, options), y in zip(QUESTIONS, labels, strict=True)],
    )


def test_multiple_choice_accuracy_matches_a_direct_computation(lm: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lm / "base")
    base = {k: v.float() for k, v in load_file(lm / "base" / "model.safetensors").items()}
    other = perturbed(base, seed=5)

    def best(model: torch.nn.Module) -> list[int]:
        scores = [direct_choice_scores(model, tokenizer, q, options) for q, options in QUESTIONS]
        return [s.index(max(s)) for s in scores]

    labels = best(load(lm / "base"))  # the base is right everywhere; the overlay only where it agrees
    agreement = sum(a == b for a, b in zip(best(with_weights(lm / "base", other)), labels, strict=True))
    assert 0 < agreement < len(labels)
    data = write_choices(tmp_path / "mc.jsonl", labels)
    task = {"data_files": {"test": str(data)}, "choices_column": "choices", "max_length": 32}
    for batch_size in (4, 64):  # 4: (example, choice) pairs split across batches
        scorer = evaluator(lm, {"mc": task}, "accuracy", batch_size)
        assert scorer.score("mc", base, "test") == 1.0
        assert scorer.score("mc", other, "test") == pytest.approx(agreement / len(labels))


def test_batched_choice_log_likelihoods_match_a_direct_computation(lm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lm / "base")
    model = load(lm / "base")
    sequences = choice_sequences(tokenizer, [q for q, _ in QUESTIONS], [o for _, o in QUESTIONS], 32)
    expected = [s for q, options in QUESTIONS for s in direct_choice_scores(model, tokenizer, q, options)]
    got = torch.cat(
        [log_likelihoods(model, sequences[i : i + 5], torch.device("cpu")) for i in range(0, 16, 5)]
    )
    assert got.tolist() == pytest.approx(expected, rel=1e-5)


def test_choice_sequences_concatenate_ids_move_trailing_space_and_cut_from_the_left(lm: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(lm / "base")
    whole = tokenizer("the cat eats fish")["input_ids"]
    (pair,) = choice_sequences(tokenizer, ["the cat "], [["eats fish"]], 32)
    assert (pair.ids, pair.scored) == (whole, 2)
    (cut,) = choice_sequences(tokenizer, ["the cat"], [["eats fish"]], 3)
    assert (cut.ids, cut.scored) == (whole[-3:], 2)
    (short,) = choice_sequences(tokenizer, ["the cat"], [["eats fish"]], 2)
    assert (short.ids, short.scored) == (whole[-2:], 1)  # the first token is never predicted


def test_ties_go_to_the_lowest_index() -> None:
    sums = torch.tensor([-1.0, -1.0, -2.0, -3.0, -0.5, -0.5], dtype=torch.float64)
    assert predict_choices(sums, [3, 3]).tolist() == [0, 1]


def test_perplexity_is_lower_is_better() -> None:
    assert higher_is_better("accuracy") and not higher_is_better("perplexity")
    assert better(0.9, 0.8, "accuracy") and better(8.0, 9.0, "perplexity")
    assert not better(9.0, 9.0, "perplexity")


def perplexity_evaluation(tasks: list[str]) -> dict:
    return {
        "head": "causal_lm",
        "metric": "perplexity",
        "tasks": {t: {"data_files": {"validation": "v.jsonl", "test": "t.jsonl"}} for t in tasks},
    }


def test_scaling_search_minimizes_perplexity(tmp_path: Path) -> None:
    names = golden.TASKS
    recipe = parse_recipe(
        {
            **golden.recipe("task_arithmetic"),
            "evaluation": perplexity_evaluation(names),
            "search": {"scaling": [0.2, 0.4, 0.6]},
        }
    )
    out = tmp_path / "variant"
    out.mkdir()
    save_file({"w": torch.ones(2)}, str(out / "model.safetensors"))
    # perplexity falls from α = 0.2 to 0.4, then rises: a maximizer would pick 0.6
    perplexities = {0.2: 20.0, 0.4: 10.0, 0.6: 30.0, 9.0: 5.0}
    fake = FakeEvaluator(names, lambda t, o: perplexities[round(float(o["w"].mean()), 6)])
    result = run_search(
        recipe, {"w": torch.zeros(2)}, {n: {"w": torch.full((2,), 9.0)} for n in names}, fake, lambda p: out
    )
    assert result.chosen == {"scaling": 0.4}


def test_lambda_search_minimizes_perplexity(tmp_path: Path) -> None:
    """tall_masks: each task's λ on its own score; the denser masks (small λ) change more entries."""
    from hubmerge.run import run_recipe

    data = golden.recipe("tall_masks", {"merge": "task_arithmetic"})
    names = golden.TASKS
    data["models"] = [{"source": m, "name": n} for m, n in zip(data["models"], names, strict=True)]
    recipe = parse_recipe(
        {**data, "evaluation": perplexity_evaluation(names), "search": {"lambda": [0.2, 0.6]}}
    )
    theta0 = golden.base()
    keys = sorted(k for k, v in theta0.items() if v.is_floating_point())
    base = {k: theta0[k].float() for k in keys}
    finetuned = {n: {k: base[k] + 1 for k in keys} for n in names}

    def run_variant(parameters: dict) -> Path:
        variant = recipe.model_copy(update={"parameters": parameters, "evaluation": None, "search": None})
        return run_recipe(variant, output=tmp_path / f"lam-{parameters['lambda']}").output

    def changed(overlay: dict[str, torch.Tensor]) -> float:
        return sum(int((overlay[k] != base[k]).sum()) for k in keys) / sum(base[k].numel() for k in keys)

    # as a perplexity, the share of changed entries is lowest for the sparsest masks
    evaluator = FakeEvaluator(names, lambda t, o: 1.0 if o is finetuned[t] else changed(o))
    result = run_search(recipe, base, finetuned, evaluator, run_variant)
    assert result.chosen == {"lambda": dict.fromkeys(names, 0.6)}


def test_run_with_perplexity_search_report_card_and_table(lm: Path, tmp_path: Path) -> None:
    data = {
        "version": 1,
        "base": str(lm / "base"),
        "models": [str(lm / "t0"), str(lm / "t1")],
        "method": "task_arithmetic",
        "output": str(tmp_path / "out"),
        "evaluation": {
            "head": "causal_lm",
            "metric": "perplexity",
            "batch_size": 4,
            "tasks": {
                t: {
                    "data_files": {s: str(lm / f"texts-{s}.jsonl") for s in ("validation", "test")},
                    "max_length": MAX_LENGTH,
                }
                for t in ("t0", "t1")
            },
        },
        "search": {"scaling": [0.5, 1.0, 2.0], "k": [1]},  # k: the default [1, 2, 3] is refused at 2 tasks
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(tmp_path / "recipe.yaml"), "-q"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    record = json.loads((out / "hubmerge.json").read_text())
    candidates = record["search"]["candidates"]
    best = min(candidates, key=lambda r: r["mean_normalized"])
    assert best["mean_normalized"] < max(r["mean_normalized"] for r in candidates)
    assert record["search"]["chosen"] == {"scaling": best["scaling"]}

    tokenizer = AutoTokenizer.from_pretrained(lm / "base")
    report = record["evaluation"]
    merged = direct_perplexity(load(out), tokenizer, TEXTS)
    assert report["rows"]["task_arithmetic"]["accuracy"]["t0"] == pytest.approx(merged, rel=1e-5)
    assert report["rows"]["zero-shot"]["accuracy"]["t1"] == pytest.approx(
        direct_perplexity(load(lm / "base"), tokenizer, TEXTS), rel=1e-5
    )

    card = ModelCard.load(out / "README.md")
    assert "perplexity (lower is better) on the `test` split" in card.text
    assert f"| task_arithmetic | {merged:.2f} |" in card.text
    assert card.data.eval_results[0].metric_type == "perplexity"
    console = Console(record=True, width=200)
    print_evaluation(console, report)
    shown = " ".join(console.export_text().split())  # the title wraps over the narrow table
    assert "perplexity on the test split (lower is better; normalized = / fine-tuned)" in shown
    assert f"{merged:.2f}" in shown


def recipe_with(evaluation: dict) -> dict:
    return {
        "version": 1,
        "base": "/m/base",
        "models": ["/m/a", "/m/b"],
        "method": "ties",
        "evaluation": evaluation,
    }


def files(*tasks: str, **extra: Any) -> dict:
    return {t: {"data_files": {"test": "t.jsonl"}, **extra} for t in tasks}


@pytest.mark.parametrize(
    ("evaluation", "field", "message"),
    [
        (
            {"head": "zero_shot_text", "metric": "perplexity", "tasks": files("a", "b")},
            "evaluation.metric",
            "evaluation.metric: perplexity needs head causal_lm (not zero_shot_text)",
        ),
        (
            {"head": "causal_lm", "tasks": files("a", "b")},
            "evaluation.metric",
            "evaluation.metric: head causal_lm without a choices_column (a, b) computes perplexity: "
            "set metric: perplexity, or give every task a choices_column (multiple choice, accuracy)",
        ),
        (
            {"head": "sequence_classification", "tasks": {**files("a"), **files("b", choices_column="c")}},
            "evaluation.tasks.b.choices_column",
            "evaluation.tasks.b.choices_column: only head causal_lm scores choices (not sequence_classification)",
        ),
        (
            {
                "head": "causal_lm",
                "metric": "perplexity",
                "tasks": {**files("a"), **files("b", choices_column="c")},
            },
            "evaluation.tasks.b.choices_column",
            "evaluation.tasks.b.choices_column: metric perplexity scores the text column alone; "
            "drop choices_column, or use metric accuracy for multiple choice",
        ),
    ],
)
def test_recipe_errors_name_the_field(evaluation: dict, field: str, message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(recipe_with(evaluation), "recipe.yaml")
    assert str(caught.value) == f"recipe.yaml: {message}"
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("rows", "task", "message"),
    [
        (
            [{"text": "the cat", "choices": ["eats", "runs"], "label": 2}],
            {"choices_column": "choices"},
            "evaluation.tasks.a: label 2 of row 0 in split 'test' is out of range for its 2 choices",
        ),
        (
            [{"text": "the cat", "options": ["eats", "runs"], "label": 0}],
            {"choices_column": "choices"},
            "evaluation.tasks.a: split 'test' has no choices column 'choices' (columns: text, options, label)",
        ),
        (
            [{"text": "the cat", "choices": "eats", "label": 0}],
            {"choices_column": "choices"},
            "evaluation.tasks.a.choices_column: row 0 of split 'test' needs a non-empty list of non-empty "
            "strings, got 'eats'",
        ),
        (
            [{"text": "the cat", "choices": ["eats", " "], "label": 0}],
            {"choices_column": "choices"},
            "evaluation.tasks.a: choice ' ' of row 0 in split 'test' has no token to score (nothing after "
            "tokenization, or max_length 128 is too small)",
        ),
        (
            [{"sentence": "the cat"}],
            {},
            "evaluation.tasks.a: split 'test' has no input column 'text' (columns: sentence)",
        ),
    ],
)
def test_data_errors_name_the_task(
    lm: Path, tmp_path: Path, rows: list[dict], task: dict, message: str
) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    metric = "accuracy" if task else "perplexity"
    with pytest.raises(HubmergeError) as caught:
        evaluator(lm, {"a": {"data_files": {"test": str(path)}, **task}}, metric, 8)
    assert str(caught.value) == message
