"""The text suite's LoRA-input pieces (`run.py --inputs lora`, `peft_peer.py`) on fake records: no data, no
adapters, no merges."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks.text_suite import peft_peer, run
from hubmerge.recipe import parse_recipe
from tests.test_text_suite_runner import suite_cache

FINETUNED = {"alpha": 0.8, "beta": 1.0}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return suite_cache(tmp_path, "lora/finetune_lora_report.json")


def row(scores: dict[str, float]) -> dict:
    norm = {t: scores[t] / FINETUNED[t] for t in scores}
    return {
        "accuracy": scores,
        "normalized": norm,
        "mean_accuracy": sum(scores.values()) / 2,
        "mean_normalized": sum(norm.values()) / 2,
    }


def record(method: str, scores: dict[str, float], chosen: dict | None = None, seconds: float = 1.5) -> dict:
    rows = {"zero-shot": row({"alpha": 0.25, "beta": 0.5}), "fine-tuned": row(FINETUNED), method: row(scores)}
    out = {
        "method": method,
        "seconds": seconds,
        "tasks": [{"name": "alpha"}, {"name": "beta"}],
        "evaluation": {"rows": rows},
    }
    if chosen is not None:
        out["search"] = {"chosen": chosen, "candidates": [{"scaling": 0.3}, {"scaling": 0.5}]}
    return out


def test_lora_recipes_read_the_adapters_and_name_no_base(cache: Path) -> None:
    tasks = run.suite_tasks(cache, "lora")
    grids = run.Grids(scaling=[0.3, 0.5], k=[2], lambdas=[0.4])
    methods = {m.key: m for m in run.METHODS}
    for key in (*run.LORA_ROWS, *run.LORA_EXTRA_ROWS):
        data = run.recipe_for(methods[key], tasks, None, cache / "out_lora" / key, grids, cache)
        assert "base" not in data
        recipe = parse_recipe(data, origin=f"{key}.yaml")
        assert [m.source for m in recipe.models] == ["lora/alpha", "lora/beta"]
        assert recipe.evaluation.tasks["beta"].max_length == 9


def test_rank_rows_take_the_alpha_their_full_merge_row_chose() -> None:
    ta, ties = run.LORA_RANK_METHODS
    assert run.fixed_alpha(ta, None) is None
    fixed = run.fixed_alpha(ties, {"search": {"chosen": {"scaling": 0.7}}})
    assert fixed.parameters == {"density": 0.2, "scaling": 0.7}
    assert ties.parameters == {"density": 0.2}  # the template is left as it was
    data = run.recipe_for(fixed, [], None, Path("/o"), run.Grids(), Path("/"))
    assert data["output_format"] == "peft" and data["lora_rank"] == 16
    # the full-encoder rows' recipes carry neither key
    plain = run.recipe_for(run.METHODS[1], [], Path("/b"), Path("/o"), run.Grids(), Path("/"))
    assert "output_format" not in plain and "lora_rank" not in plain and plain["base"] == "b"


def test_peft_linear_puts_the_square_root_of_the_weight_on_each_factor() -> None:
    a, b = peft_peer.linear_factor_weights(0.5, 2.0)
    assert math.isclose(a, 1.0) and math.isclose(b, 1.0)
    a, b = peft_peer.linear_factor_weights(-0.5, 2.0)
    assert math.isclose(a * b, -1.0) and b > 0  # the sign on A only


def test_choose_takes_the_first_best_validation_candidate() -> None:
    cands = [
        {"alpha": a, "validation": {"mean_normalized": v}} for a, v in ((0.3, 0.8), (0.5, 0.9), (0.7, 0.9))
    ]
    assert peft_peer.choose(cands)["alpha"] == 0.5


def test_same_method_check_compares_cat_with_hubmerge_ta_task_by_task() -> None:
    hub = record("task_arithmetic", {"alpha": 0.6, "beta": 0.9}, {"scaling": 0.5})
    cat = {"chosen_alpha": 0.5, "candidates": [{"alpha": 0.5}], "test": row({"alpha": 0.6, "beta": 0.88})}
    check = run.same_method_check(cat, hub)
    assert check["alpha"] == 0.5 and check["identical_tasks"] == 1
    assert math.isclose(check["max_task_diff"], 0.02)
    assert run.same_method_check({**cat, "chosen_alpha": 0.7}, hub) is None  # cat not scored at TA's α


def test_lora_section_shows_rows_pairs_and_targets(tmp_path: Path) -> None:
    records = {
        "task_arithmetic": record("task_arithmetic", {"alpha": 0.6, "beta": 0.9}, {"scaling": 0.5}),
        "ties": record("ties", {"alpha": 0.64, "beta": 0.9}, {"scaling": 0.7}),
        "tall_ta": record("tall_masks", {"alpha": 0.8, "beta": 0.97}),
        "task_arithmetic_r16": record("task_arithmetic", {"alpha": 0.56, "beta": 0.9}),
    }
    peer = {
        "peft_version": "0.21.2",
        "device": "cpu",
        "alphas": [0.3, 0.5],
        "seed": 0,
        "load_seconds": 1.0,
        "command": "peer",
        "finetuned": {"test": row(FINETUNED)},
        "types": {
            "cat": {
                "chosen_alpha": 0.5,
                "candidates": [],
                "test": row({"alpha": 0.6, "beta": 0.9}),
                "merge_seconds": 0.1,
                "density": None,
            },
            "ties": {
                "chosen_alpha": 1.0,
                "candidates": [],
                "test": row({"alpha": 0.4, "beta": 0.5}),
                "merge_seconds": 0.2,
                "density": 0.2,
            },
        },
    }
    context = {"date": "D", "machine": "M", "commands": ["c"], "grids": "G"}
    section = run.render_lora_section(records, {}, peer, context)
    lines = section.splitlines()
    assert "| Task Arithmetic | 60.0 | 90.0 | 75.0 | 82.5 |" in lines
    assert "| fine-tuned (LoRA adapters) | 80.0 | 100.0 | 90.0 | 100.0 |" in lines
    assert "**Partial run**" in section and "TALL masks + TIES" in section
    assert (
        "| Task Arithmetic vs `cat` (same method) | Task Arithmetic | 75.0 | 82.5 | 1.50 | `cat` | 0.5 | — "
        "| 75.0 | 82.5 | 0.10 |" in lines
    )
    assert "| TIES vs `ties` | TIES | 77.0 | 85.0 | 1.50 | `ties` | 1 | 0.2 | 45.0 | 50.0 | 0.20 |" in lines
    assert any(line.startswith("- (a)") and line.endswith("→ met") for line in lines)
    assert "- (b) TALL masks + TA ≥ 97 % normalized: 98.5 % → met" in lines
    assert "- (b) TALL masks + TIES ≥ 97 % normalized: not run" in lines
    # 0.5 · (0.56 / 0.8 + 0.9) = 0.8 against 0.825
    assert "- (c) Task Arithmetic → LoRA r = 16 ≥ 95 % of Task Arithmetic's normalized accuracy: " in section
    assert "80.0 / 82.5 = 97.0 % → met" in section
    assert "2/2 tasks identical" in section

    docs = tmp_path / "b.md"
    docs.write_text(
        f"# B\n\n{run.MERGEKIT_BEGIN}\nold\n{run.MERGEKIT_END}\n\nnotes\n\n<!-- other: begin -->\nx\n"
    )
    run.write_lora_docs("new lora\n", docs)
    run.write_lora_docs("newer lora\n", docs)
    text = docs.read_text()
    assert text.count(run.LORA_BEGIN) == 1 and "newer lora" in text and "new lora\n" not in text
    assert text.index("notes") < text.index(run.LORA_BEGIN) < text.index("<!-- other: begin -->")
