"""Train one LoRA adapter per suite task on the base encoder, under finetune.py's frozen label-name head.

    .venv/bin/python benchmarks/text_suite/finetune_lora.py [--tasks NAME ...] [--device cuda]

Same data (the first 2000 training texts), head, seed, max length, batch size, epochs, schedule and loop as
`finetune.py` (its functions are imported); only the trainable parameters differ: rank-8 LoRA (alpha 16, no
dropout, no bias) on the query/key/value, attention-output, intermediate and output dense projections of every
encoder layer (not the pooler, not the embeddings), with a learning rate of 1e-3 instead of 1e-4.

Everything goes under `<cache>/lora/`: one PEFT adapter folder per task (`<task>/adapter_config.json`,
`<task>/adapter_model.safetensors`), stamps (`stamps/<task>.json`) and `finetune_lora_report.json` (val/test
accuracy of the base with the adapter merged, evaluated as `finetune.py` evaluates). A task whose stamp
(settings, LoRA config, head, base and data checksums) matches is skipped. The adapters' config names the base
as `--base-ref` (default: the base folder relative to the repository root, `.cache/text_suite/base`, as the
suite's recipes name it; recipes are run from the repository root).

Needs only torch, transformers, safetensors, huggingface_hub, numpy and peft (no hubmerge), and no network.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is read from local folders
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # as a script, only this folder is on the path

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from benchmarks.text_suite.finetune import (  # noqa: E402
    CACHE,
    LABEL_MAX_LENGTH,
    LOGIT_SCALE,
    MAX_LENGTH_BOUNDS,
    SUITE_SETTINGS,
    TRAIN_EXAMPLES,
    Settings,
    Split,
    Task,
    accuracy,
    cached_results,
    configure_torch,
    finetune,
    label_embeddings,
    load_encoder,
    load_task,
    pick_max_length,
    sha256_file,
    task_vector_stats,
    write_stamp,
)

# vader_sentiment val accuracy (3 epochs, CPU): 3e-4 60.5%, 1e-3 65.7%, 3e-3 65.9% (‖ΔW‖₂ 2.5, 5.9, 19.2;
# full fine-tuning at 1e-4: 66.4%, ‖τ‖₂ 3.0). 3e-3 ties 1e-3 on val at three times the weight change.
LORA_LR = 1e-3
# Every encoder layer's attention query/key/value, attention-output, intermediate and output dense layers
# (fullmatch on module names such as "encoder.layer.0.attention.self.query"); the pooler stays out.
TARGET_MODULES = (
    r".*encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "target_modules": TARGET_MODULES}


def default_base_ref(base_dir: Path) -> str:
    """The base folder as a recipe names it: relative to the repository root if inside it, else absolute."""
    resolved = base_dir.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def train_adapter(
    task: Task,
    train: Split,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: Path,
    max_length: int,
    settings: Settings,
    device: torch.device,
    base_ref: str,
) -> dict:
    """Train a LoRA adapter for ``task`` on a copy of ``base``, save it to ``out_dir``, return measurements."""
    head = label_embeddings(base, tokenizer, task.label_texts).to(device)  # on the (CPU) base, as finetune.py
    torch.manual_seed(settings.seed)  # LoRA A init, on the CPU so that every device starts from the same A
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**LORA)).to(device)
    peft_model.peft_config["default"].base_model_name_or_path = base_ref
    trainable, total = peft_model.get_nb_trainable_parameters()
    results: dict = {
        "max_length": max_length,
        "classes": len(task.label_texts),
        "train_examples": len(train.texts),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "total_params": total,
    }
    start = time.perf_counter()
    results["steps"] = finetune(peft_model, tokenizer, head, train, max_length, settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    results["seconds_per_step"] = round(results["train_seconds"] / results["steps"], 3)
    results["adapter_val_acc"] = accuracy(peft_model, tokenizer, head, task.val, max_length)  # unmerged
    peft_model.save_pretrained(out_dir)
    merged = peft_model.merge_and_unload()
    results["val_acc"] = accuracy(merged, tokenizer, head, task.val, max_length)
    results["test_acc"] = accuracy(merged, tokenizer, head, task.test, max_length)
    results.update(task_vector_stats(base, merged.cpu()))
    return results


def summary(results: dict) -> str:
    return (
        f"  train {results['train_seconds']} s ({results['steps']} steps, {results['seconds_per_step']} s/step,"
        f" {results['device']}, max length {results['max_length']})"
        f" | val {results['val_acc']:.1%} (unmerged {results['adapter_val_acc']:.1%})"
        f" | test {results['test_acc']:.1%} | ‖ΔW‖₂ {results['tau_l2']:.3f}"
    )


def main(argv: list[str] | None = None) -> None:
    """Train every stale task's adapter and write ``<cache>/lora/finetune_lora_report.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache", type=Path, default=CACHE, help="holds base/ and data/; adapters go to lora/"
    )
    parser.add_argument("--data", type=Path, help="output folder of tasks.py (default: <cache>/data)")
    parser.add_argument("--tasks", nargs="*", help="task names (default: every task under --data)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=LORA_LR)
    parser.add_argument("--base-ref", help="base_model_name_or_path written into the adapters' config")
    parser.add_argument(
        "--max-steps", type=int, help="smoke test: one epoch on the first N batches (N optimizer steps)"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    configure_torch(args.threads)
    device = torch.device(args.device)
    base_dir, lora_dir = args.cache / "base", args.cache / "lora"
    data_dir = args.data or args.cache / "data"
    stamp_dir = lora_dir / "stamps"
    stamp_dir.mkdir(parents=True, exist_ok=True)
    base_ref = args.base_ref or default_base_ref(base_dir)
    base_sha256 = sha256_file(base_dir / "model.safetensors")
    settings = dataclasses.replace(SUITE_SETTINGS, lr=args.lr)
    if args.max_steps:
        settings = dataclasses.replace(settings, epochs=1)
    names = args.tasks or sorted(path.parent.name for path in data_dir.glob("*/meta.json"))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__};"
        f" device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''},"
        f" {torch.get_num_threads()} threads; base {base_dir} (config names it {base_ref!r})",
        flush=True,
    )

    base = tokenizer = None
    report_path = lora_dir / "finetune_lora_report.json"
    report: dict = {
        "settings": dataclasses.asdict(settings),
        "lora": LORA,
        "max_steps": args.max_steps,
        "train_examples": TRAIN_EXAMPLES,
        "max_length_bounds": list(MAX_LENGTH_BOUNDS),
        "head": {"logit_scale": LOGIT_SCALE, "label_max_length": LABEL_MAX_LENGTH, "pooling": "mean"},
        "base_ref": base_ref,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "tasks": {},
    }
    if report_path.exists():  # keep the other tasks' rows when only some are (re)trained, same settings
        previous = json.loads(report_path.read_text())
        if all(
            previous.get(field) == report[field] for field in ("settings", "lora", "max_steps", "base_ref")
        ):
            report["tasks"] = previous.get("tasks", {})
    for name in names:
        meta = json.loads((data_dir / name / "meta.json").read_text(encoding="utf-8"))
        key = {
            "settings": report["settings"],
            "lora": LORA,
            "max_steps": args.max_steps,
            "train_examples": TRAIN_EXAMPLES,
            "head": report["head"],
            "max_length_bounds": report["max_length_bounds"],
            "base_sha256": base_sha256,
            "base_ref": base_ref,
            "labels": meta["labels"],
            "label_texts": meta["label_texts"],
            "data_sha256": meta["sha256"],
        }
        stamp_path = stamp_dir / f"{name}.json"
        out_dir = lora_dir / name
        results = cached_results(stamp_path, key, out_dir / "adapter_model.safetensors")
        if results is not None:
            print(f"{name}: cached ({out_dir})", flush=True)
        else:
            print(f"{name}: training LoRA adapter", flush=True)
            if base is None:
                base, tokenizer = load_encoder(base_dir)
            task = load_task(data_dir / name)
            train = Split(task.train.texts[:TRAIN_EXAMPLES], task.train.labels[:TRAIN_EXAMPLES])
            max_length = pick_max_length(
                tokenizer, train.texts, MAX_LENGTH_BOUNDS
            )  # on all 2000, as finetune
            if args.max_steps:
                n = args.max_steps * settings.batch_size
                train = Split(train.texts[:n], train.labels[:n])
            results = train_adapter(
                task, train, base, tokenizer, out_dir, max_length, settings, device, base_ref
            )
            write_stamp(stamp_path, key, results)
        report["tasks"][name] = results
        print(summary(results), flush=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")  # after every task: usable if interrupted
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
