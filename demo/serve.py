"""The demo's last step: serve every task from the TALL artifact, as a deployment would.

Run as ``.venv/bin/python demo/serve.py out/demo-tall`` after ``hubmerge run demo/recipes/tall.yaml``. It loads one
task as a ready model with ``load_model``, then keeps one resident copy (``switchable``) and switches it from task
to task, printing each task's test accuracy from the switched model (the frozen label-name head of the base, as the
fine-tunes were trained and the merge was scored), the time of each switch and the memory held.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.text_suite.finetune import (  # noqa: E402
    Split,
    accuracy,
    configure_torch,
    label_embeddings,
    load_encoder,
    load_split,
)
from hubmerge import CompressedMerge  # noqa: E402


def main(artifact: Path) -> None:
    configure_torch(2)
    console = Console(width=120)
    recipe = yaml.safe_load((ROOT / "demo" / "recipes" / "tall.yaml").read_text())
    merge = CompressedMerge.from_pretrained(artifact)
    base, tokenizer = load_encoder(ROOT / recipe["base"])
    tasks = recipe["evaluation"]["tasks"]
    heads = {t: label_embeddings(base, tokenizer, spec["label_names"]) for t, spec in tasks.items()}
    tests: dict[str, Split] = {t: load_split(ROOT / spec["data_files"]["test"]) for t, spec in tasks.items()}
    del base

    first = merge.tasks[0]
    started = time.perf_counter()
    loaded = merge.load_model(first)
    console.print(
        f"load_model({first!r}): {type(loaded).__name__} in {time.perf_counter() - started:.2f} s, test accuracy "
        f"{100 * accuracy(loaded, tokenizer, heads[first], tests[first], tasks[first]['max_length']):.1f} %"
    )

    served = merge.switchable()
    table = Table(title="one resident model, switched in place (switchable + set_task)")
    for column in ("task", "set_task ms", "test accuracy %", "weights = load_model(task)"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task in [*merge.tasks[1:], first]:
        started = time.perf_counter()
        served.set_task(task)
        switch_ms = 1000 * (time.perf_counter() - started)
        score = accuracy(served, tokenizer, heads[task], tests[task], tasks[task]["max_length"])
        table.add_row(task, f"{switch_ms:.1f}", f"{100 * score:.1f}", _same(served, merge.load_model(task)))
    console.print(table)
    resident = served.task_switcher.resident_bytes()
    model_bytes = sum(p.numel() * p.element_size() for p in served.parameters())
    t = len(merge.tasks)
    console.print(
        f"memory: the model {model_bytes / 2**20:.1f} MiB + resident "
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in resident.items())
        + f" = {(model_bytes + sum(resident.values())) / 2**20:.1f} MiB, against {t} loaded models: "
        f"{t * model_bytes / 2**20:.1f} MiB"
    )


def _same(a: torch.nn.Module, b: torch.nn.Module) -> str:
    """Whether two models' weights are bit-identical."""
    theirs = b.state_dict()
    return "yes" if all(torch.equal(v, theirs[k]) for k, v in a.state_dict().items()) else "NO"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: demo/serve.py ARTIFACT")
    main(Path(sys.argv[1]))
