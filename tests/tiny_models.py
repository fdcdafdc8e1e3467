"""Tiny random transformers models for tests: configs small enough to build and save in milliseconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertTokenizerFast, CLIPConfig, LlamaConfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_config(**overrides) -> BertConfig:
    settings = {
        "vocab_size": 99,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 37,
    }
    return BertConfig(**{**settings, **overrides})


def llama_config(**overrides) -> LlamaConfig:
    """A tiny Llama-style decoder (grouped-query attention, gated MLP); ids 0/1/2 are pad/BOS/EOS."""
    settings = {
        "vocab_size": 40,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    return LlamaConfig(**{**settings, **overrides})


def clip_config(text_vocab_size: int = 99) -> CLIPConfig:
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1, "num_attention_heads": 2}
    return CLIPConfig(
        text_config={**tower, "vocab_size": text_vocab_size, "max_position_embeddings": 16},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )


def wordpiece_tokenizer(directory: Path, words: list[str]) -> BertTokenizerFast:
    """A BERT tokenizer whose vocabulary is the special tokens plus `words` (ids 5, 6, ...)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, *words]) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab))


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float, keep: float = 1.0) -> None:
    """Add scale·N(0, 1) noise in place, to a random share `keep` of the entries: a stand-in fine-tune."""
    for p in model.parameters():
        noise = scale * torch.randn_like(p)
        p.add_(noise if keep >= 1 else noise * (torch.rand_like(p) < keep))
