"""Log-likelihood scoring for the `causal_lm` evaluation head: perplexity and multiple choice.

Both reduce to one quantity: the summed log-probability of the last `scored` tokens of a token sequence,
each given the tokens before it. Sequences are tokenized once per split (the overlay changes the weights,
never the tokens) and scored in right-padded batches whose padding is masked out and never scored.

* Perplexity: a text is tokenized as the tokenizer does by default (`add_special_tokens=True`: a Llama
  tokenizer prepends BOS and appends nothing), truncated to its first `max_length` tokens; every token but
  the first is predicted, so BOS is conditioned on, never scored. Perplexity is exp(total NLL / number of
  predicted tokens) over the whole split (token-level, not a mean of per-text perplexities).
* Multiple choice: as lm-eval-harness scores `loglikelihood` requests, the context and each choice are
  tokenized separately and their ids concatenated (context with the tokenizer's default special tokens,
  the choice with none), so every choice sees the same context tokens and a merge across the boundary
  cannot move tokens between them; trailing whitespace of the context moves to the start of the choice. A
  choice's score is the summed (not length-normalized) log-likelihood of its tokens; the prediction is the
  best-scoring choice, the lowest index among equal scores. A pair longer than `max_length` loses tokens
  from the left (the start of the context), so the choice is kept whole whenever it fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TokenSequence:
    """Token ids of one text or (context, choice) pair; its last `scored` tokens are the ones predicted."""

    ids: list[int]
    scored: int


def text_sequences(tokenizer: Any, texts: list[str], max_length: int) -> list[TokenSequence]:
    """Perplexity inputs: each text with the tokenizer's default special tokens, cut to `max_length` tokens.

    Args:
        tokenizer: a transformers tokenizer.
        texts: the split's texts.
        max_length: the most tokens kept per text (special tokens included).

    Returns:
        One sequence per text; all its tokens but the first are scored.
    """
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [TokenSequence(ids, max(len(ids) - 1, 0)) for ids in encoded]


def choice_sequences(
    tokenizer: Any, contexts: list[str], choices: list[list[str]], max_length: int
) -> list[TokenSequence]:
    """Multiple-choice inputs: context ids + choice ids for every (example, choice) pair, in that order.

    Args:
        tokenizer: a transformers tokenizer.
        contexts: each example's context.
        choices: each example's choices.
        max_length: the most tokens per pair; longer pairs lose tokens from the left.

    Returns:
        One sequence per pair, examples in order and each example's choices in order; the choice's tokens
        are scored (all but the first token of the sequence, if the choice alone fills `max_length`).
    """
    sequences = []
    for context, options in zip(contexts, choices, strict=True):
        stripped = context.rstrip()
        context_ids = tokenizer(stripped)["input_ids"]
        for option in options:
            option_ids = tokenizer(context[len(stripped) :] + option, add_special_tokens=False)["input_ids"]
            ids = (context_ids + option_ids)[-max_length:]
            sequences.append(TokenSequence(ids, max(min(len(option_ids), len(ids) - 1), 0)))
    return sequences


@torch.no_grad()
def log_likelihoods(
    model: torch.nn.Module, sequences: list[TokenSequence], device: torch.device
) -> torch.Tensor:
    """Summed log-probability of each sequence's scored tokens, in one right-padded batch.

    Args:
        model: a causal LM returning `logits` of shape (batch, length, vocabulary).
        sequences: the batch.
        device: where the batch goes.

    Returns:
        A float64 tensor (on the CPU) with one sum per sequence.
    """
    longest = max(len(s.ids) for s in sequences)
    if longest < 2:  # one token or none: nothing is predicted
        return torch.zeros(len(sequences), dtype=torch.float64)
    # any valid id pads: padded positions are masked from attention and never scored
    ids = torch.zeros(len(sequences), longest, dtype=torch.int64)
    scored = torch.zeros(len(sequences), longest, dtype=torch.bool)
    mask = torch.zeros(len(sequences), longest, dtype=torch.int64)
    for row, sequence in enumerate(sequences):
        n = len(sequence.ids)
        ids[row, :n] = torch.tensor(sequence.ids, dtype=torch.int64)
        mask[row, :n] = 1
        scored[row, n - sequence.scored : n] = True
    # position i predicts token i + 1; the first token is never predicted
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
    sums = []
    # row by row: a float32 copy of the whole batch's logits (batch × length × vocabulary) can be large
    for row, target, keep in zip(logits, ids[:, 1:].to(device), scored[:, 1:].to(device), strict=True):
        values = row.float()
        token = values.gather(-1, target.unsqueeze(-1)).squeeze(-1) - values.logsumexp(-1)
        # where, not a product: a row that is all padding may hold NaN logits
        sums.append(torch.where(keep, token.double(), 0.0).sum())
    return torch.stack(sums).cpu()


def perplexity(sums: torch.Tensor, sequences: list[TokenSequence]) -> float:
    """exp(total negative log-likelihood / number of predicted tokens) over all `sequences`."""
    return float(torch.exp(-sums.sum() / sum(s.scored for s in sequences)))


def predict_choices(sums: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each example's best choice (the lowest index among equal scores).

    Args:
        sums: the scores of every (example, choice) pair, examples in order.
        counts: each example's number of choices.

    Returns:
        The predicted choice index per example (int64).
    """
    predictions = []
    for scores in torch.split(sums, counts):
        values = scores.tolist()
        predictions.append(values.index(max(values)))  # index() finds the first of equal maxima
    return torch.tensor(predictions, dtype=torch.int64)
