"""Frozen label-name cosine head and batched evaluation for the demo tasks (benchmark-suite.md §4).

Self-contained on purpose: it is reused to evaluate merged encoders, which share the head and the max
length of the task, never its fine-tuned weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

LOGIT_SCALE = 20.0  # temperature 0.05
LABEL_MAX_LENGTH = 16
MAX_LENGTH_RANGE = (8, 48)


@dataclass(frozen=True)
class Split:
    """Texts and integer labels of one split."""

    texts: list[str]
    labels: list[int]


@dataclass(frozen=True)
class Task:
    """A task as written by ``demo/tasks.py``: metadata plus its three splits."""

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


def pick_max_length(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> int:
    """Nearest-rank p95 of token lengths (with special tokens), clamped to ``MAX_LENGTH_RANGE``."""
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    p95 = lengths[math.ceil(0.95 * len(lengths)) - 1]
    return min(max(p95, MAX_LENGTH_RANGE[0]), MAX_LENGTH_RANGE[1])


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
        predicted = logits(model, batch, head).argmax(-1)
        correct += int((predicted == torch.tensor(split.labels[start : start + batch_size])).sum())
    return correct / len(split.texts)
