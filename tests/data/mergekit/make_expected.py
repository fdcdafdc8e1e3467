"""Reference outputs of mergekit 0.1.5 for the methods hubmerge shares with it (tests/test_vs_mergekit.py).

    python3 -m venv .cache/bench/mergekit-venv
    .cache/bench/mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    .cache/bench/mergekit-venv/bin/python tests/data/mergekit/make_expected.py

Writes, under tests/data/mergekit/: inputs/{base,task0..task3} (a tiny float32 LlamaForCausalLM: base and
fine-tunes = base + seeded noise of growing scale with exact zeros), and expected/<case>/ with the mergekit
config used (mergekit.yaml) and mergekit's merged weights (model.safetensors). Deterministic methods only:
mergekit's random drops (DARE, DELLA) use torch's global generator, which hubmerge does not reproduce.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "inputs"
EXPECTED = HERE / "expected"
TASKS = 4
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def shapes() -> dict[str, tuple[int, ...]]:
    h, i, v, kv = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"], 16
    out = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return out


def write_model(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def make_inputs() -> None:
    gen = torch.Generator().manual_seed(2024)
    base = {k: torch.randn(shape, generator=gen) * 0.5 for k, shape in shapes().items()}
    write_model(INPUTS / "base", base)
    for task in range(TASKS):
        tuned = {}
        for key, value in base.items():
            noise = torch.randn(value.shape, generator=gen) * 0.01 * (task + 1)
            tuned[key] = value + noise * (torch.rand(value.shape, generator=gen) > 0.2)
        write_model(INPUTS / f"task{task}", tuned)


def models(*tasks: int, weights: list[float] | None = None, extra: dict | None = None) -> list[dict]:
    entries = []
    for i, task in enumerate(tasks):
        parameters = dict(extra or {})
        if weights is not None:
            parameters["weight"] = weights[i]
        entries.append({"model": f"inputs/task{task}", **({"parameters": parameters} if parameters else {})})
    return entries


BASE = "inputs/base"
CASES: dict[str, dict] = {
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": BASE,
        "models": models(0, 1, 2, 3, weights=[1.0, 1.0, 1.0, 1.0]),
        "parameters": {"lambda": 0.7, "normalize": False},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": BASE,
        "models": models(0, 1, 2, 3, weights=[1.0, 0.5, 2.0, 1.5], extra={"density": 0.6, "gamma": 0.1}),
        "parameters": {"lambda": 0.9, "normalize": False, "rescale": False},
    },
    "breadcrumbs_rescale_normalize": {
        "merge_method": "breadcrumbs",
        "base_model": BASE,
        "models": models(0, 1, 2, 3, weights=[1.0, 0.5, 2.0, 1.5], extra={"density": 0.6, "gamma": 0.1}),
        "parameters": {"lambda": 1.0, "normalize": True, "rescale": True},
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": BASE,
        "models": models(0, 1, 2, 3, weights=[1.0, 0.5, 2.0, 1.5], extra={"density": 0.6, "gamma": 0.1}),
        "parameters": {"lambda": 0.9, "normalize": True, "rescale": False},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": BASE,
        "models": [{"model": BASE}, *models(0, 1, 2, 3)],
        "parameters": {"filter_wise": False},
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": BASE,
        "models": [{"model": BASE}, *models(0, 1, 2)],
        "parameters": {"filter_wise": True},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": BASE,
        "models": [{"model": BASE}, *models(0)],
        "parameters": {"t": 0.3},
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": BASE,
        "models": models(0, 1, weights=[0.3, 0.7]),
        "parameters": {"nuslerp_flatten": True, "nuslerp_row_wise": False},
    },
    "nuslerp_rows": {
        "merge_method": "nuslerp",
        "base_model": BASE,
        "models": models(0, 1, weights=[0.3, 0.7]),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": False},
    },
    "nuslerp_columns": {
        "merge_method": "nuslerp",
        "base_model": BASE,
        "models": models(0, 1, weights=[0.3, 0.7]),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
}


def run_case(name: str, config: dict) -> None:
    config = {**config, "dtype": "float32", "out_dtype": "float32"}
    target = EXPECTED / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "mergekit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with tempfile.TemporaryDirectory() as out:
        mergekit = str(Path(sys.executable).with_name("mergekit-yaml"))
        command = [
            mergekit,
            str(target / "mergekit.yaml"),
            out,
            "--no-write-model-card",
            "--no-copy-tokenizer",
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        subprocess.run(command, cwd=HERE, check=True, capture_output=True, text=True, env=env)
        merged = {}
        for path in sorted(Path(out).glob("*.safetensors")):
            merged |= load_file(path)
    save_file(merged, target / "model.safetensors")


def main() -> None:
    shutil.rmtree(EXPECTED, ignore_errors=True)
    make_inputs()
    for name, config in CASES.items():
        run_case(name, config)
        print(f"{name}: ok")


if __name__ == "__main__":
    main()
