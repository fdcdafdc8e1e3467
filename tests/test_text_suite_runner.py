"""The text-suite runner's pieces on a fake 2-task layout: no Debian data, no fine-tunes, no merges.

Recipes must pass hubmerge's own validation for every method, and the docs table must show exactly the
numbers of the `hubmerge.json` records it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.text_suite import run
from hubmerge.recipe import parse_recipe

TASKS = {"alpha": ["one", "two"], "beta": ["red", "green", "blue"]}


def suite_cache(root: Path, report: str = "finetune_report.json") -> Path:
    """A `.cache/text_suite` look-alike: data metas and a fine-tune report (at `report`), nothing else."""
    tasks = {}
    for i, (name, label_texts) in enumerate(TASKS.items()):
        (root / "data" / name).mkdir(parents=True)
        meta = {"task": name, "labels": label_texts, "label_texts": label_texts}
        (root / "data" / name / "meta.json").write_text(json.dumps(meta))
        tasks[name] = {"max_length": 8 + i}
    (root / report).parent.mkdir(parents=True, exist_ok=True)
    (root / report).write_text(json.dumps({"tasks": tasks}))
    return root


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return suite_cache(tmp_path)


@pytest.mark.parametrize("method", run.METHODS, ids=lambda m: m.key)
def test_recipe_of_every_method_validates(cache: Path, method: run.Method) -> None:
    tasks = run.suite_tasks(cache)
    grids = run.Grids(scaling=[0.5, 1.0], k=[1, 2, 3], lambdas=[0.2, 0.4])
    data = run.recipe_for(method, tasks, cache / "base", cache / "out" / method.key, grids, cache)

    recipe = parse_recipe(data, origin=f"{method.key}.yaml")

    assert recipe.method == method.method
    assert recipe.parameters == method.parameters
    assert recipe.base == "base"
    assert [m.name for m in recipe.models] == ["alpha", "beta"]
    assert [m.source for m in recipe.models] == ["finetuned/alpha", "finetuned/beta"]
    evaluation = recipe.evaluation
    assert evaluation.head == "zero_shot_text" and evaluation.split == "test"
    assert evaluation.tasks["beta"].label_names == ["red", "green", "blue"]
    assert evaluation.tasks["beta"].max_length == 9
    assert evaluation.tasks["alpha"].data_files == {
        "validation": "data/alpha/val.jsonl",
        "test": "data/alpha/test.jsonl",
    }
    if not method.searches:
        assert recipe.search is None
        return
    assert recipe.search.split == "validation"
    if "scaling" in method.searches:
        assert recipe.search.scaling == [0.5, 1.0]
    if "k" in method.searches:
        assert recipe.search.k == [1, 2]  # k = 3 > T = 2 is left out
    if "lambda" in method.searches:
        assert recipe.search.lambdas == [0.2, 0.4]


def eval_rows(method: str, accuracy: dict[str, float], finetuned: dict[str, float]) -> dict:
    """Evaluation rows as `hubmerge run` records them (normalized = accuracy / fine-tuned)."""
    zero_shot = {"alpha": 0.25, "beta": 0.5}

    def row(scores: dict[str, float]) -> dict:
        norm = {t: scores[t] / finetuned[t] for t in scores}
        return {
            "accuracy": scores,
            "normalized": norm,
            "mean_accuracy": sum(scores.values()) / 2,
            "mean_normalized": sum(norm.values()) / 2,
        }

    return {"rows": {"zero-shot": row(zero_shot), "fine-tuned": row(finetuned), method: row(accuracy)}}


def finetune_report() -> dict:
    task = {
        "classes": 2,
        "max_length": 8,
        "steps": 189,
        "threads": 1,
        "train_seconds": 61.0,
        "base_val_acc": 0.25,
        "finetuned_val_acc": 0.75,
        "base_test_acc": 0.25,
        "finetuned_test_acc": 0.8,
        "tau_l2": 3.05,
        "tau_zero_share": 0.5,
        "word_rows_moved_share": 0.125,
    }
    return {
        "settings": {
            "epochs": 3,
            "batch_size": 32,
            "lr": 1e-4,
            "weight_decay": 0.0,
            "warmup_share": 0.06,
            "grad_clip": 1.0,
            "seed": 0,
        },
        "train_examples": 2000,
        "max_length_bounds": [8, 64],
        "head": {"logit_scale": 20.0, "label_max_length": 16, "pooling": "mean"},
        "tasks": {"alpha": task, "beta": {**task, "finetuned_test_acc": 1.0}},
    }


def test_docs_table_shows_the_recorded_numbers() -> None:
    finetuned = {"alpha": 0.8, "beta": 1.0}
    d = 1000
    records = {
        "task_arithmetic": {
            "method": "task_arithmetic",
            "parameters_counted": d,
            "tasks": [{"name": "alpha"}, {"name": "beta"}],
            "search": {"chosen": {"scaling": 0.3}, "candidates": [{"scaling": 0.3}, {"scaling": 0.2}]},
            "evaluation": eval_rows("task_arithmetic", {"alpha": 0.6, "beta": 0.9}, finetuned),
        },
        "weight_average": {
            "method": "weight_average",
            "parameters_counted": d,
            "tasks": [{"name": "alpha"}, {"name": "beta"}],
            "evaluation": eval_rows("weight_average", {"alpha": 0.4, "beta": 0.7}, finetuned),
        },
        "tall_ta": {
            "method": "tall_masks",
            "parameters_counted": d,
            "tasks": [{"name": "alpha"}, {"name": "beta"}],
            "search": {
                "chosen": {"lambda": {"alpha": 0.2, "beta": 0.5}},
                "candidates": [{"lambda": lam} for lam in run.PAPER_LAMBDA],
            },
            "storage": {"artifact_bits": 34 * d, "paper_bits": 66 * d, "finetuned_fp32_bits": 64 * d},
            "evaluation": eval_rows("tall_masks", {"alpha": 0.8, "beta": 1.0}, finetuned),
        },
    }
    context = {"date": "D", "machine": "M", "command": "C", "grids": "G"}

    section = run.render_section(
        records, finetune_report(), {"task_arithmetic": {"seconds": 12.3, "threads": 1}}, context
    )
    lines = section.splitlines()

    assert "| zero-shot | 25.0 | 50.0 | 37.5 | 40.6 |" in lines  # normalized (0.3125 + 0.5) / 2
    assert "| weight averaging | 40.0 | 70.0 | 55.0 | 60.0 |" in lines
    assert "| Task Arithmetic | 60.0 | 90.0 | 75.0 | 82.5 |" in lines
    assert "| TALL masks + TA | 80.0 | 100.0 | 90.0 | 100.0 |" in lines
    assert "| fine-tuned | 80.0 | 100.0 | 90.0 | 100.0 |" in lines
    assert "| TIES | — | — | — | — |" in lines
    assert (
        section.index("| zero-shot |")
        < section.index("| weight averaging |")
        < section.index("| fine-tuned |")
    )
    assert section.startswith("## ") and "**Partial run**" in section and "Consensus TA" in section
    # storage: merged 32·P′ against 32·T·P′; TALL its own accounting
    assert "| weight averaging | — | — | 32,000 | — | 0.500× | — |" in lines
    assert (
        "| Task Arithmetic | α ∈ {0.2, 0.3} (reduced) | α = 0.3 | 32,000 | — | 0.500× | 12 (1 thr.) |"
        in lines
    )
    assert (
        "| TALL masks + TA | λ ∈ {0.2, 0.3, 0.4, 0.5, 0.6} | merge = task_arithmetic; λ per task (alpha 0.2, beta 0.5) | 34,000 | 66,000 | 0.531× | — |"
        in lines
    )
    assert "| alpha | 2 | 8 | 189 | 1 | 61 | 25.0 → 75.0 | 25.0 → 80.0 | 3.05 | 50.0 % | 12.5 % |" in lines
    assert "- TALL masks + TA ≥ 99 % normalized mean: 100.0 % → met" in lines
    assert "- TALL masks + TIES ≥ 99 % normalized mean: — → not run" in lines
    assert "- Task Arithmetic > weight averaging (normalized mean): 82.5 vs 60.0 → met" in lines
    assert "- weight averaging > zero-shot (normalized mean): 60.0 vs 40.6 → met" in lines
    assert "- Consensus TA ≥ Task Arithmetic: not run" in lines


def test_write_docs_replaces_only_its_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n<!-- memory.py: begin -->\nmemory\n<!-- memory.py: end -->\n")

    run.write_docs("first\n", run.BEGIN, run.END, docs)
    run.write_docs("second\n", run.BEGIN, run.END, docs)

    assert docs.read_text() == (
        "# Benchmarks\n\n<!-- memory.py: begin -->\nmemory\n<!-- memory.py: end -->\n\n"
        f"{run.BEGIN}\nsecond\n{run.END}\n"
    )


def test_bf16_rows_store_tau_in_bfloat16_and_leave_the_float32_recipes_as_they_were(cache: Path) -> None:
    tasks = run.suite_tasks(cache)
    methods = {m.key: m for m in run.METHODS}

    def recipe(key: str) -> dict:
        return run.recipe_for(methods[key], tasks, cache / "base", cache / "out" / key, run.Grids(), cache)

    for fp32, bf16 in (("tall_ta", "tall_ta_bf16"), ("tall_ties", "tall_ties_bf16")):
        data = recipe(bf16)
        assert parse_recipe(data, origin=f"{bf16}.yaml").tau_dtype == "bfloat16"
        # the twin differs only in τ_MTL's dtype (and where it goes), so the rows compare one setting
        twin = recipe(fp32)
        assert "tau_dtype" not in twin  # float32 rows: same recipe text, so cached outputs stay current
        assert {**twin, "output": data["output"], "tau_dtype": "bfloat16"} == data
    assert not any("tau_dtype" in recipe(m.key) for m in run.METHODS if m.tau_dtype is None)


def tall_record(accuracy: dict[str, float], lambdas: dict[str, float], vector_bits: int) -> dict:
    d, finetuned = 1000, {"alpha": 0.8, "beta": 1.0}
    artifact = (vector_bits + 2) * d
    return {
        "method": "tall_masks",
        "parameters_counted": d,
        "tasks": [{"name": "alpha"}, {"name": "beta"}],
        "search": {
            "chosen": {"lambda": lambdas},
            "candidates": [{"lambda": lam} for lam in run.PAPER_LAMBDA],
        },
        "storage": {
            "vector_bits_per_entry": vector_bits,
            "artifact_bits": artifact,
            "artifact_bits_per_task": artifact / 2,
            "paper_bits": 66 * d,
            "finetuned_fp32_bits": 64 * d,
        },
        "evaluation": eval_rows("tall_masks", accuracy, finetuned),
    }


def test_bf16_section_shows_bits_per_task_next_to_the_float32_rows(tmp_path: Path) -> None:
    records = {
        "tall_ta": tall_record({"alpha": 0.8, "beta": 1.0}, {"alpha": 0.2, "beta": 0.5}, 32),
        "tall_ta_bf16": tall_record({"alpha": 0.72, "beta": 1.0}, {"alpha": 0.3, "beta": 0.5}, 16),
    }
    context = {"date": "D", "machine": "M", "grids": "G", "command": "C"}
    # the main section as --write-docs renders it, read back as the docs' reference rows
    main = run.render_section(records, finetune_report(), {}, context)
    reference = run.reference_from_docs(f"# B\n\n{run.BEGIN}\n{main}{run.END}\n")
    assert reference is not None and reference.date == "D" and reference.tasks == ["alpha", "beta"]
    assert reference.finetuned_accuracy == {"alpha": 0.8, "beta": 1.0}
    assert run.ReferenceRow("TALL masks + TA", 1.0, 17000) in reference.rows
    assert (
        "| TALL masks + TA, bf16 τ_MTL | λ ∈ {0.2, 0.3, 0.4, 0.5, 0.6} | merge = task_arithmetic; τ_MTL "
        "bfloat16; λ per task (alpha 0.3, beta 0.5) | 18,000 | 66,000 | 0.281× | — |" in main.splitlines()
    )

    section = run.render_bf16_section(
        records,
        {"tall_ta": {"seconds": 40.2, "threads": 1}},
        {"date": "D", "machine": "M", "commands": ["cmd one", "cmd two"], "plot": run.STORAGE_PNG},
        reference,
    )
    lines = section.splitlines()

    assert section.startswith("### ") and "**Partial run**" in section and "TALL masks + TIES" in section
    assert lines[lines.index("cmd one") - 1 : lines.index("cmd two") + 2] == [
        "```",
        "cmd one",
        "cmd two",
        "```",
    ]
    assert "| TALL masks + TA | float32 | 80.0 | 100.0 | 90.0 | 100.0 |" in lines
    assert "| TALL masks + TA, bf16 τ_MTL | bfloat16 | 72.0 | 100.0 | 86.0 | 95.0 |" in lines
    assert "| fine-tuned | — | 80.0 | 100.0 | 90.0 | 100.0 |" in lines
    assert "| TALL masks + TA | float32 | 0.2, 0.5 | 34,000 | 17,000 | 0.531× | 40 (1 thr.) |" in lines
    assert "| TALL masks + TA, bf16 τ_MTL | bfloat16 | 0.3, 0.5 | 18,000 | 9,000 | 0.281× | — |" in lines
    assert (
        "- TALL masks + TA: bfloat16 − float32 τ_MTL: -5.00 points of normalized mean (-4.00 of mean "
        "accuracy; largest task change -8.0 on alpha); stored bits per task 0.529× the float32 row's; "
        "chosen λ differs on alpha." in lines
    )
    assert (
        "Fine-tunes: this run's fine-tuned mean test accuracy is 90.0 % against 90.0 % in the table above (D), "
        "and every task's equals it to the table's 0.1 %." in lines
    )
    assert "this run's fine-tuned row equals the table above's task by task." in section
    assert f"]({run.STORAGE_PNG})" in section

    png = tmp_path / run.STORAGE_PNG
    run.plot_storage_accuracy(records, reference, png)
    assert png.read_bytes().startswith(b"\x89PNG")


def test_bf16_subsection_goes_after_the_suite_notes_and_is_replaced_in_place(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    before = f"# B\n\n{run.BEGIN}\nsuite\n{run.END}\n\n### Notes\n\nnotes\n\n<!-- other: begin -->\nx\n<!-- other: end -->\n"
    docs.write_text(before)

    run.write_bf16_docs("first\n", docs)
    run.write_bf16_docs("second\n", docs)

    block = f"{run.BF16_BEGIN}\nsecond\n{run.BF16_END}\n"
    assert docs.read_text() == before.replace("notes\n\n<!--", f"notes\n\n{block}\n<!--")


def test_bf16_section_says_so_when_bfloat16_changes_no_test_accuracy() -> None:
    same = {"alpha": 0.8, "beta": 0.9}
    records = {
        "tall_ties": tall_record(same, {"alpha": 0.5, "beta": 0.5}, 32),
        "tall_ties_bf16": tall_record(same, {"alpha": 0.5, "beta": 0.5}, 16),
    }

    section = run.render_bf16_section(records, {}, {"date": "D", "machine": "M", "commands": []})

    assert (
        "- TALL masks + TIES: bfloat16 − float32 τ_MTL: no change: the same test accuracy on every task, "
        "exactly; stored bits per task 0.529× the float32 row's; chosen λ identical on every task."
        in section.splitlines()
    )
    assert "Fine-tunes:" not in section and "![" not in section  # no reference, no plot given


def test_merged_outputs_follow_hubmerges_registry() -> None:
    from hubmerge.methods import METHODS

    assert {"task_arithmetic", "ties", "consensus", "dare_ties", "della", "model_stock"} <= run.MERGED
    assert not {"tall_masks", "magnitude_masking", "magnitude_pruning"} & run.MERGED
    assert {name for name, spec in METHODS.items() if spec.result == "merged"} == run.MERGED
    methods = {m.key: m for m in run.METHODS}
    assert run.is_merged(methods["breadcrumbs"]) and not run.is_merged(methods["tall_breadcrumbs"])
    assert set(run.MERGEKIT_ROWS) <= set(methods)
    # every mergekit method that merges T models has a row; SLERP / NuSLERP take one / two fine-tunes
    mergekit = {"dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}
    assert mergekit | {"model_stock"} <= {methods[key].method for key in run.MERGEKIT_ROWS}
    assert all("scaling" in methods[key].searches for key in mergekit)


def merged_record(method: str, accuracy: dict[str, float], chosen: dict) -> dict:
    d, finetuned = 1000, {"alpha": 0.8, "beta": 1.0}
    record = {
        "method": method,
        "parameters_counted": d,
        "tasks": [{"name": "alpha"}, {"name": "beta"}],
        "evaluation": eval_rows(method, accuracy, finetuned),
    }
    if chosen:
        record["search"] = {
            "chosen": chosen,
            "candidates": [{"scaling": a} for a in (0.3, 0.5, 0.7, 1.0)],
        }
    return record


def test_mergekit_section_shows_the_new_rows_next_to_the_docs_ta_and_ties_rows(tmp_path: Path) -> None:
    # the main section as --write-docs rendered it, read back as the docs' reference rows
    main_records = {
        "task_arithmetic": merged_record("task_arithmetic", {"alpha": 0.6, "beta": 0.9}, {"scaling": 0.5}),
        "ties": merged_record("ties", {"alpha": 0.64, "beta": 0.8}, {"scaling": 1.0}),
    }
    main = run.render_section(
        main_records,
        finetune_report(),
        {"task_arithmetic": {"seconds": 745.0, "threads": 2}},
        {"date": "D0", "machine": "M", "command": "C", "grids": "G"},
    )
    reference = run.reference_from_docs(f"# B\n\n{run.BEGIN}\n{main}{run.END}\n")
    assert reference is not None
    ta = next(r for r in reference.rows if r.label == "Task Arithmetic")
    assert ta == run.ReferenceRow("Task Arithmetic", 0.825, 16000)  # cells are not compared
    assert (
        ta.cells["alpha"] == "60.0"
        and ta.cells["values used"] == "α = 0.5"
        and ta.cells["run s"] == "745 (2 thr.)"
    )

    records = {
        "dare_ties": merged_record("dare_ties", {"alpha": 0.56, "beta": 0.9}, {"lambda": 0.7}),
        "model_stock": merged_record("model_stock", {"alpha": 0.4, "beta": 0.6}, {}),
        "consensus_dare_ties": merged_record(
            "consensus", {"alpha": 0.6, "beta": 1.0}, {"k": 2, "scaling": 0.5}
        ),
        "tall_breadcrumbs": tall_record({"alpha": 0.8, "beta": 1.0}, {"alpha": 0.2, "beta": 0.5}, 32),
        "task_arithmetic": main_records["task_arithmetic"],  # not a row of this subsection
    }
    records["consensus_dare_ties"]["search"]["candidates"] = [
        {"k": k, "scaling": a} for k in (1, 2) for a in (0.3, 0.5, 0.7, 1.0)
    ]
    context = {
        "date": "D",
        "machine": "M",
        "commands": ["cmd one", "cmd two"],
        "grids": "G.",
        "checks": ["Check: identical."],
    }

    section = run.render_mergekit_section(
        records, {"dare_ties": {"seconds": 401.4, "threads": 1}}, context, reference
    )
    lines = section.splitlines()

    assert section.startswith("### ") and "**Partial run**" in section
    partial = next(line for line in lines if line.startswith("**Partial run**"))
    assert "DARE (linear)" in partial and "DELLA" in partial and "DARE-TIES" not in partial
    assert "SLERP and NuSLERP" in section and "G." in section
    assert "are the rows of the table above (D0), marked †, on the same fine-tunes" in section
    # the main table's format: tasks, mean, normalized; zero-shot first, TA / TIES from the docs, fine-tuned last
    assert "| zero-shot | 25.0 | 50.0 | 37.5 | 40.6 |" in lines
    assert "| Task Arithmetic † | 60.0 | 90.0 | 75.0 | 82.5 |" in lines
    assert "| TIES † | 64.0 | 80.0 | 72.0 | 80.0 |" in lines
    assert "| DARE-TIES | 56.0 | 90.0 | 73.0 | 80.0 |" in lines
    assert "| Model Stock | 40.0 | 60.0 | 50.0 | 55.0 |" in lines
    assert "| Consensus DARE-TIES | 60.0 | 100.0 | 80.0 | 87.5 |" in lines
    assert "| TALL masks + Breadcrumbs | 80.0 | 100.0 | 90.0 | 100.0 |" in lines
    assert "| DARE (linear) | — | — | — | — |" in lines
    assert (
        section.index("| zero-shot |")
        < section.index("| Task Arithmetic † |")
        < section.index("| DARE-TIES |")
        < section.index("| fine-tuned | 80.0 | 100.0 | 90.0 | 100.0 |")
    )
    # chosen values: mergekit's α is its `lambda`; composed options shown under their method's name
    assert (
        "| Task Arithmetic † | α ∈ {0.3, 0.5, 0.7, 1} (reduced) | α = 0.5 | 32,000 | — | 0.500× | 745 (2 thr.) |"
        in lines
    )
    assert (
        "| DARE-TIES | α ∈ {0.3, 0.5, 0.7, 1} (reduced) | density = 0.5; α (`lambda`) = 0.7 | 32,000 | — | "
        "0.500× | 401 (1 thr.) |" in lines
    )
    assert "| Model Stock | — | — | 32,000 | — | 0.500× | — |" in lines
    assert (
        "| Consensus DARE-TIES | k ∈ {1, 2} (reduced), α ∈ {0.3, 0.5, 0.7, 1} (reduced) | merge = dare_ties; "
        "dare_ties.density = 0.5; lambda = 0.4; k = 2; α = 0.5 | 32,000 | — | 0.500× | — |" in lines
    )
    assert (
        "| TALL masks + Breadcrumbs | λ ∈ {0.2, 0.3, 0.4, 0.5, 0.6} | merge = breadcrumbs; breadcrumbs.density = "
        "0.9; breadcrumbs.gamma = 0.01; λ per task (alpha 0.2, beta 0.5) | 34,000 | 66,000 | 0.531× | — |"
        in lines
    )
    assert "Merged models (DARE-TIES, Model Stock, Consensus DARE-TIES) store 32·P′ bits." in section
    assert "Compressed artifacts (TALL masks + Breadcrumbs)" in section
    assert "- DARE-TIES: 80.0 % normalized, -2.5 points against Task Arithmetic †" in lines
    assert "- TALL masks + Breadcrumbs: 100.0 % normalized, +17.5 points against Task Arithmetic †" in lines
    assert lines[-1] == "Check: identical."
    assert (
        "The † rows searched the paper's α grid; the α they chose (Task Arithmetic 0.5, TIES 1) lie in the grid "
        "searched here, so this grid would have chosen the same α for them." in lines
    )
    assert section.index("| DARE (linear) | — |") < section.index("| fine-tuned |")

    # no reference in the docs: only this run's rows
    alone = run.render_mergekit_section(records, {}, context)
    assert "†" not in alone and "| zero-shot |" in alone and "against Task Arithmetic" not in alone


def test_mergekit_subsection_goes_after_the_bf16_notes_and_is_replaced_in_place(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    before = (
        f"# B\n\n{run.BEGIN}\nsuite\n{run.END}\n\n{run.BF16_BEGIN}\nbf16\n{run.BF16_END}\n\n### Notes\n\nnotes\n"
        "\n<!-- other: begin -->\nx\n<!-- other: end -->\n"
    )
    docs.write_text(before)

    run.write_mergekit_docs("first\n", docs)
    run.write_mergekit_docs("second\n", docs)

    block = f"{run.MERGEKIT_BEGIN}\nsecond\n{run.MERGEKIT_END}\n"
    assert docs.read_text() == before.replace("notes\n\n<!-- other", f"notes\n\n{block}\n<!-- other")
