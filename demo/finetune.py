"""Fine-tune the encoder of one task under the frozen label-name head (benchmark-suite.md §5)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from textcls import Task, encode_batch, logits
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Settings:
    """Everything besides the data and the base that determines a fine-tuned checkpoint."""

    epochs: int = 2
    batch_size: int = 32
    lr: float = 1e-4
    # 0 keeps rows of never-seen tokens exactly at the base, so task vectors stay sparse.
    weight_decay: float = 0.0
    warmup_share: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0


def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    head: torch.Tensor,
    task: Task,
    max_length: int,
    settings: Settings,
) -> int:
    """Train ``model`` in place on ``task.train``; return the number of optimizer steps."""
    torch.manual_seed(settings.seed)  # dropout masks
    order = torch.Generator().manual_seed(settings.seed)
    texts, labels = task.train.texts, torch.tensor(task.train.labels)
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
