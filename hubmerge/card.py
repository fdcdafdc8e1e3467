"""Model cards (README.md) for merged models and compressed artifacts, built from the run record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from hubmerge.artifacts import RECIPE_FILE
from hubmerge.evaluation import display_scale, higher_is_better
from hubmerge.methods import METHODS
from hubmerge.output import read_record
from hubmerge.record import Evaluation, RunRecord, SearchRecord, Storage

CARD_FILE = "README.md"
PLOT_FILE = "mask_agreement.png"

TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## Sources

| role | name | source | revision |
|---|---|---|---|
{% for s in sources -%}
| {{ s.role }} | {{ s.name }} | `{{ s.location }}` | {{ s.revision }} |
{% endfor %}
## Method

`{{ method }}`: {{ method_summary }}

| parameter | value |
|---|---|
{% for k, v in parameters -%}
| `{{ k }}` | `{{ v }}` |
{% endfor %}
Parameters counted in d (every floating-point tensor of the base, sorted key order): {{ "{:,}".format(d) }}.
{% if usage %}
## How to use

```python
{{ usage }}
```
{% endif %}{% if evaluation %}
## Evaluation

{{ evaluation.metric }}{% if evaluation.lower_is_better %} (lower is better){% endif %} on the `{{ evaluation.split }}` split, each task with its own head (`{{ evaluation.head }}`);
normalized = score / that task's fine-tuned score.

| model |{% for t in evaluation.tasks %} {{ t }} |{% endfor %} mean | mean normalized |
|---|{% for t in evaluation.tasks %}---|{% endfor %}---|---|
{% for name, row in evaluation.rows -%}
| {{ name }} |{% for t in evaluation.tasks %} {{ "%.2f"|format(evaluation.scale * row.accuracy[t]) }} |{% endfor %} {{ "%.2f"|format(evaluation.scale * row.mean_accuracy) }} | {{ "%.1f"|format(100 * row.mean_normalized) }} % |
{% endfor %}{% if search %}
Chosen on the `{{ search.split }}` split: {{ search.chosen }}.
{% endif %}{% endif %}{% if exported %}
## Task models in subfolders

Each task's model, rebuilt as θ0 + m_t ⊙ τ_MTL, is also stored as a plain transformers model in a subfolder,
for users without hubmerge:

```python
from transformers import AutoModel

model = AutoModel.from_pretrained("{{ repo }}", subfolder="{{ exported[0] }}")
```

| task | subfolder |
|---|---|
{% for name in exported -%}
| {{ name }} | `{{ name }}/` |
{% endfor %}{% endif %}{% if storage_rows %}
## Storage

| what | bits | vs T fine-tuned fp32 copies |
|---|---|---|
{% for row in storage_rows -%}
| {{ row[0] }} | {{ "{:,}".format(row[1]) }} | {{ row[2] }} |
{% endfor %}{% endif %}{% if histogram %}
## Mask agreement

Entries contained in exactly c of the {{ num_tasks }} task masks (c = 0: "catastrophic", no task;
c = 1: "selfish", one task). "Active" counts only entries where some task vector is nonzero.

![Mask agreement histogram]({{ plot_file }})

| c | entries | share | active entries |
|---|---|---|---|
{% for row in histogram -%}
| {{ row[0] }} | {{ "{:,}".format(row[1]) }} | {{ row[2] }} | {{ "{:,}".format(row[3]) }} |
{% endfor %}{% endif %}{% if consensus_note %}
{{ consensus_note }}
{% endif %}{% if nonfinite %}
## Non-finite input weights

This merge was run with `--allow-nonfinite`: these inputs hold NaN or ±Inf entries, which reached the result.

| model | tensor | NaN/Inf entries |
|---|---|---|
{% for row in nonfinite -%}
| {{ row.model }} | `{{ row.tensor }}` | {{ "{:,}".format(row.count) }} |
{% endfor %}{% endif %}
## Recipe

```yaml
{{ recipe }}```
{% if citation %}
## Citation

{{ citation.paper }}

```bibtex
{{ citation.bibtex }}
```
{% endif %}
Made with hubmerge {{ version }}.
"""


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "n/a"


def histogram_rows(record: RunRecord) -> list[tuple[int, int, str, int]]:
    hist = record.stats.agreement_histogram
    if not hist:
        return []
    total = sum(hist)
    active = record.stats.agreement_histogram_active or []
    return [(c, n, _share(n, total), active[c]) for c, n in enumerate(hist)]


SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def storage_rows(storage: Storage) -> list[tuple[str, int, str]]:
    """(what, bits, ratio to T fp32 fine-tuned copies) rows of the storage table, parts first."""
    reference = storage.finetuned_fp32_bits
    d, t = storage.parameters, storage.tasks
    width = SHORT_DTYPES[storage.vector_dtype]
    rows = []
    if storage.private_bits is not None:
        vector = storage.artifact_bits - d * t - storage.private_bits
        rows += [
            (f"τ_MTL ({width}, P′ entries)" if storage.paper_bits else f"kept τ values ({width})", vector),
            ("masks (1 bit per entry per task, T·P′)", d * t),
            (
                f"tasks' own tensors (heads, ...: F = {storage.private_entries or 0:,} entries)",
                storage.private_bits,
            ),
        ]
    per_task = storage.artifact_bits_per_task
    if per_task is None:
        per_task = storage.artifact_bits / t
    rows.append((f"this artifact (base referenced; {per_task:,.0f} bits per task)", storage.artifact_bits))
    if storage.paper_bits:
        rows.append(
            ("paper's accounting (App. C): (64+T)·P′ + 32·F, frozen entries included", storage.paper_bits)
        )
    rows.append(("T fine-tuned copies, fp32", reference))
    if storage.finetuned_stored_bits:
        rows.append(("T fine-tuned copies, as stored", storage.finetuned_stored_bits))
    return [(name, bits, f"{bits / reference:.3f}×") for name, bits in rows]


def hub_ids(record: RunRecord) -> list[str]:
    """The Hub repos a merge comes from (base first), as the Hub expects them in `base_model`."""
    sources = [record.base, *record.tasks]
    return list(dict.fromkeys(s.location for s in sources if s.revision and s.location))


def build_card(
    record: RunRecord, recipe_yaml: str, *, repo_id: str | None = None, exported: list[str] | None = None
) -> ModelCard:
    """The README.md of an output, from its run record and the resolved recipe.

    Args:
        record: the run record (`hubmerge.json`).
        recipe_yaml: the pinned recipe, pasted into the card.
        repo_id: the Hub repo the card is for, shown in the usage snippets.
        exported: tasks whose materialized models sit in subfolders.
    """
    compressed = record.compressed
    open_clip = record.library == "open_clip"
    inherited = record.base_card
    adapter = record.adapter
    if compressed or open_clip:
        library = "hubmerge" if compressed else "open_clip"
    elif adapter is not None:
        library = "peft"
    else:
        library = "transformers" if record.has_config else None
    # an adapter is used on its base, which is what the Hub links it to
    if adapter is None:
        base_model = hub_ids(record)
    else:  # an adapter is used on its base alone
        base_model = [record.base.location] if record.base.revision else []
    data = ModelCardData(
        base_model=base_model or None,
        library_name=library,
        tags=["merge", "hubmerge", record.method],
        license=inherited.get("license"),
        license_name=inherited.get("license_name"),
        license_link=inherited.get("license_link"),
        pipeline_tag=inherited.get("pipeline_tag"),
    )
    if data.base_model:
        data.base_model_relation = "adapter" if adapter is not None else "merge"
    evaluation = record.evaluation
    if evaluation:
        data.model_name = repo_id or f"{record.method} merge"
        data.eval_results = eval_results(evaluation, record.method)
    sources = [
        {
            "role": role,
            "name": name,
            "location": source.location,
            "revision": f"`{source.revision}`" if source.revision else "local",
        }
        for role, name, source in [
            ("base", "base", record.base),
            *(("task", task.name, task) for task in record.tasks),
        ]
    ]
    t = len(record.tasks)
    where = repo_id or "<this repo or directory>"
    if compressed:
        summary = (
            f"A compressed merge of {t} fine-tuned models of one base with `{record.method}`: one merged task "
            "vector τ_MTL plus one binary mask per task, from which each task's model is rebuilt as "
            "θ0 + m_t ⊙ τ_MTL."
        )
        tasks = record.task_names
        first = tasks[0]
        other = tasks[1] if len(tasks) > 1 else first
        usage = (
            "from hubmerge import CompressedMerge  # pip install hubmerge\n\n"
            f'merge = CompressedMerge.from_pretrained("{where}")  # fetches the base at its pinned commit\n'
            f'model = merge.load_model("{first}")  # a ready model; tasks: {", ".join(tasks)}\n'
            f'served = merge.switchable(); served.set_task("{other}")  # one copy, every task, switched in place\n'
            f"# or a directory: hubmerge materialize {where} --task {first} --output {first}-model"
        )
    elif adapter is not None:
        summary = f"{t} PEFT adapters of one base merged with `{record.method}` into one {adapter.peft_type} adapter"
        energies = [module.energy for module in adapter.modules.values()]
        if adapter.rank and energies:
            summary += (
                f" of rank {adapter.rank}: a truncated SVD of each module's merged update, which keeps "
                f"{min(energies):.1%}–{max(energies):.1%} of its energy (Σ s_i² of the kept singular values over "
                f"all; mean {sum(energies) / len(energies):.1%} over {len(energies)} modules, each listed in "
                "hubmerge.json)."
            )
        else:
            summary += "."
        base_id = record.base.location if record.base.revision else "<the base model>"
        # the class the base was saved from: the adapter's module names are that class's
        model_class = adapter.model_class or "AutoModel"
        usage = (
            f"from peft import PeftModel\nfrom transformers import {model_class}\n\n"
            f'base = {model_class}.from_pretrained("{base_id}")\n'
            f'model = PeftModel.from_pretrained(base, "{where}")'
        )
    else:
        summary = f"{t} fine-tuned models of one base merged with `{record.method}` into one model."
        if open_clip:
            schema = "hf-hub:" if repo_id else "local-dir:"
            usage = (
                "import open_clip\n\n"
                f'model, _, preprocess = open_clip.create_model_and_transforms("{schema}{where}")'
            )
        else:
            usage = (
                f'from transformers import AutoModel\n\nmodel = AutoModel.from_pretrained("{where}")'
                if record.has_config
                else ""
            )
    consensus_note = ""
    hist = record.stats.agreement_histogram
    if record.method == "consensus" and hist:
        k = record.parameters["k"]
        removed = sum(hist[:k])
        consensus_note = (
            f"Consensus with k = {k} keeps entries selected by at least {k} task masks: it removes "
            f"{removed:,} of {sum(hist):,} entries ({_share(removed, sum(hist))}): "
            f"{hist[0]:,} catastrophic" + (f" and {hist[1]:,} selfish" if k >= 2 else "") + "."
        )
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        title=f"{record.method} merge of {t} models",
        summary=summary,
        sources=sources,
        method=record.method,
        method_summary=METHODS[record.method].summary,
        parameters=[(k, json.dumps(v, ensure_ascii=False)) for k, v in record.parameters.items()],
        d=record.parameters_counted,
        usage=usage,
        repo=where,
        exported=exported or [],
        evaluation=_evaluation_view(evaluation),
        search=_search_view(record.search),
        storage_rows=storage_rows(record.storage) if record.storage is not None and compressed else [],
        histogram=histogram_rows(record),
        plot_file=PLOT_FILE,
        num_tasks=t,
        consensus_note=consensus_note,
        nonfinite=record.nonfinite or [],
        recipe=recipe_yaml,
        citation=METHODS[record.method].citation,
        version=record.hubmerge_version,
    )


TASK_TYPES = {"clip_zero_shot": "image-classification", "causal_lm": "text-generation"}


def eval_results(evaluation: Evaluation, method: str) -> list[EvalResult]:
    """The merged model's score per task, as model-index entries the Hub shows."""
    results = []
    for task, score in evaluation.rows[method].accuracy.items():
        dataset = evaluation.datasets[task]
        results.append(
            EvalResult(
                task_type=TASK_TYPES.get(evaluation.head, "text-classification"),
                # local data has no Hub id; the task name keeps the Hub from merging tasks into one dataset
                dataset_type=task if dataset.dataset == "local" else dataset.dataset,
                dataset_name=task,
                dataset_config=dataset.config,
                dataset_split=dataset.split,
                metric_type=evaluation.metric,
                metric_value=round(score, 6),
            )
        )
    return results


def _evaluation_view(evaluation: Evaluation | None) -> dict[str, Any] | None:
    if not evaluation:
        return None
    return {
        "scale": display_scale(evaluation.metric),
        "lower_is_better": not higher_is_better(evaluation.metric),
        "metric": evaluation.metric,
        "split": evaluation.split,
        "head": evaluation.head,
        "tasks": list(evaluation.datasets),
        "rows": list(evaluation.rows.items()),
    }


def _search_view(search: SearchRecord | None) -> dict[str, Any] | None:
    if not search:
        return None
    chosen = ", ".join(f"{k} = {json.dumps(v)}" for k, v in search.chosen.items())
    return {"split": search.split, "chosen": chosen}


def plot_agreement(record: RunRecord, path: Path) -> None:
    """Bar chart of the mask agreement histogram (all entries, and those with some nonzero τ_t) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    from matplotlib import pyplot as plt

    hist, active = record.stats.agreement_histogram or [], record.stats.agreement_histogram_active or []
    total = sum(hist)
    counts = range(len(hist))
    # Wide enough that the "catastrophic" and "selfish" labels of neighbouring bars do not overlap.
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(hist)), 3.5), dpi=100)
    width = 0.4
    ax.bar([c - width / 2 for c in counts], [100 * n / total for n in hist], width, label="all entries")
    ax.bar([c + width / 2 for c in counts], [100 * n / total for n in active], width, label="some τ_t ≠ 0")
    names = {0: "0\ncatastrophic", 1: "1\nselfish", len(hist) - 1: f"{len(hist) - 1}\nall tasks"}
    ax.set_xticks(list(counts), [names.get(c, str(c)) for c in counts])
    ax.set_xlabel("number of task masks containing the entry")
    ax.set_ylabel("% of entries")
    ax.set_title(f"{record.method}: mask agreement over {total:,} entries")
    ax.legend()
    fig.tight_layout()
    # Without the version stamp the bytes depend on the data only, so a re-push uploads nothing new.
    fig.savefig(path, format="png", metadata={"Software": None})
    plt.close(fig)


def exported_tasks(directory: Path, record: RunRecord) -> list[str]:
    """Tasks whose materialized model is stored in a subfolder of the output."""
    return [name for name in record.task_names if any((directory / name).glob("*.safetensors"))]


def write_card(directory: Path, *, repo_id: str | None = None) -> None:
    """(Re)write README.md and the agreement plot of an output from its hubmerge.json and recipe."""
    record = read_record(directory)
    recipe_yaml = (directory / RECIPE_FILE).read_text()
    if record.stats.agreement_histogram:
        plot_agreement(record, directory / PLOT_FILE)
    card = build_card(record, recipe_yaml, repo_id=repo_id, exported=exported_tasks(directory, record))
    card.save(directory / CARD_FILE)
