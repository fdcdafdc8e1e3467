"""Build the offline demo: stdlib text tasks, the base encoder and one fine-tuned encoder per task.

Run as ``.venv/bin/python demo/prepare.py``; everything goes under ``.cache/demo/`` of the repository. Fine-tuning is skipped for a task
whose stamp (settings, head, base and data checksums) matches, so a second run takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the recipes name paths relative to the repository root
# The head, training loop and evaluation are shared with the text benchmark suite, so both train alike.
sys.path.insert(0, str(ROOT))

from tasks import build_all  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from benchmarks.text_suite.finetune import (  # noqa: E402
    LABEL_MAX_LENGTH,
    LOGIT_SCALE,
    Settings,
    cached_results,
    configure_torch,
    export_base,
    load_encoder,
    load_task,
    pick_max_length,
    summary,
    train_and_measure,
    write_stamp,
)

CACHE = ROOT / ".cache" / "demo"
BASE_DIR = CACHE / "base"
DATA_DIR = CACHE / "data"
FINETUNED_DIR = CACHE / "finetuned"
STAMP_DIR = CACHE / "stamps"
REPORT = CACHE / "finetune_report.json"
SETTINGS = Settings(epochs=2)
MAX_LENGTH_RANGE = (8, 48)  # the demo's tasks are shorter than the suite's
THREADS = 2


def rel(path: Path) -> str:
    """``path`` as the recipes spell it: relative to the repository root."""
    return str(path.relative_to(ROOT))


def run_task(task_dir: Path, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Fine-tune one task from ``base`` on all its training texts, save it, and return its measurements."""
    task = load_task(task_dir)
    max_length = pick_max_length(tokenizer, task.train.texts, MAX_LENGTH_RANGE)
    return train_and_measure(
        task, task.train, base, tokenizer, BASE_DIR, FINETUNED_DIR / task.name, max_length, SETTINGS
    )


def main() -> None:
    """Build data, export the base, fine-tune what is stale, and write the report."""
    started = time.perf_counter()
    configure_torch(THREADS)
    STAMP_DIR.mkdir(parents=True, exist_ok=True)

    print(f"building tasks in {rel(DATA_DIR)}", flush=True)
    metas = build_all(DATA_DIR)
    for name, meta in metas.items():
        print(f"  {name}: {len(meta['labels'])} classes, {meta['counts']}", flush=True)
    base_sha256 = export_base(BASE_DIR, STAMP_DIR / "base.json")

    base = tokenizer = None
    report: dict = {"settings": dataclasses.asdict(SETTINGS), "base": rel(BASE_DIR), "tasks": {}}
    for name, meta in metas.items():
        key = {
            "settings": dataclasses.asdict(SETTINGS),
            "head": {"logit_scale": LOGIT_SCALE, "label_max_length": LABEL_MAX_LENGTH},
            "max_length_range": list(MAX_LENGTH_RANGE),
            "base_sha256": base_sha256,
            "labels": meta["labels"],
            "data_sha256": meta["sha256"],
        }
        stamp_path = STAMP_DIR / f"{name}.json"
        weights = FINETUNED_DIR / name / "model.safetensors"
        results = cached_results(stamp_path, key, weights)
        if results is not None:
            print(f"{name}: cached ({rel(weights.parent)})", flush=True)
        else:
            print(f"{name}: fine-tuning", flush=True)
            if base is None:
                base, tokenizer = load_encoder(BASE_DIR)
            results = run_task(DATA_DIR / name, base, tokenizer)
            write_stamp(stamp_path, key, results)
        report["tasks"][name] = results
        print(summary(results), flush=True)

    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.1f} s")
    print(f"base:      {rel(BASE_DIR)}")
    for name in metas:
        print(f"finetuned: {rel(FINETUNED_DIR / name)}")
    print(f"data:      {rel(DATA_DIR)}")
    print(f"report:    {rel(REPORT)}")


if __name__ == "__main__":
    main()
