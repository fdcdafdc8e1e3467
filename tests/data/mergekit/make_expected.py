"""Run as: .cache/bench/mergekit-venv/bin/python tests/data/mergekit/make_expected.py  (from the repo root)

Reference outputs of mergekit 0.1.5 (torch 2.13.0 CPU) for the merge methods hubmerge shares with it. The venv:

    python3 -m venv .cache/bench/mergekit-venv
    .cache/bench/mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5

mergekit is only ever run as its `mergekit-yaml` command, never imported. Writes, under tests/data/mergekit/:

* inputs/{base,task0..task3}/{model.safetensors,config.json}: a tiny float32 LlamaForCausalLM (hidden 16,
  intermediate 32, 2 layers, 4 heads, 2 kv heads, vocab 64, untied lm_head). Fine-tune t is base + τ_t with
  τ_t = s_t·(0.7·S + N_t)·B_t: a shared direction S (so the τ's correlate), own noise N_t, growing scale s_t and
  a Bernoulli keep mask B_t (exact zeros of τ); signs conflict between tasks, nonzero magnitudes are distinct.
  Edge case on purpose: task1's model.layers.1.post_attention_layernorm.weight equals the base (τ_1 = 0).
* expected/<case>/{mergekit.yaml,model.safetensors}: the exact config given to mergekit-yaml (every method
  parameter written out) and mergekit's merged weights (float32; config/tokenizer/card files dropped).
* expected/random_stats.json: for the random methods (dare_linear, dare_ties, della, della_linear), the keep
  rates and rescale factors observed in mergekit's output, single-task runs over several --random-seed values.
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
MERGEKIT = str(Path(sys.executable).with_name("mergekit-yaml"))
BASE = "inputs/base"
TASKS = 4
SCALES = [0.02, 0.03, 0.04, 0.05]  # s_t
KEEP = [0.7, 0.5, 0.9, 0.6]  # P(τ_t entry nonzero)
ZERO_TAU = ("task1", "model.layers.1.post_attention_layernorm.weight")
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 4,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def shapes() -> dict[str, tuple[int, ...]]:
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = CONFIG["num_key_value_heads"] * CONFIG["head_dim"]
    out = {"model.embed_tokens.weight": (v, h)}
    for layer in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    out |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return out


def write_model(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def make_inputs() -> None:
    shutil.rmtree(INPUTS, ignore_errors=True)
    gen = torch.Generator().manual_seed(20240611)
    base = {}
    for key, shape in shapes().items():
        if len(shape) == 1:  # RMSNorm gains around 1
            base[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            base[key] = 0.05 * torch.randn(shape, generator=gen)
    write_model(INPUTS / "base", base)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for t in range(TASKS):
        tuned = {}
        for key, value in base.items():
            own = torch.randn(value.shape, generator=gen)
            keep = torch.rand(value.shape, generator=gen) < KEEP[t]
            tau = SCALES[t] * (0.7 * shared[key] + own) * keep
            tuned[key] = value if (f"task{t}", key) == ZERO_TAU else value + tau
        write_model(INPUTS / f"task{t}", tuned)


# ---------------------------------------------------------------------------------------------------------
# deterministic cases


def gta_case(method, tasks, *, weight, density, extra_per_model=None, lam, normalize, rescale, int8_mask):
    """A generalized-task-arithmetic config (task_arithmetic, ties, breadcrumbs*, dare*, della*): every
    parameter of mergekit's spec (generalized_task_arithmetic.py:41-82) written out."""
    models = []
    for i, t in enumerate(tasks):
        params = {"weight": weight[i], "density": density[i]}
        for key, values in (extra_per_model or {}).items():
            params[key] = values[i]
        models.append({"model": f"inputs/task{t}", "parameters": params})
    return {
        "merge_method": method,
        "base_model": BASE,
        "models": models,
        "parameters": {"lambda": lam, "normalize": normalize, "rescale": rescale, "int8_mask": int8_mask},
    }


ONES = [1.0] * 4
W = [1.0, 0.5, 2.0, 1.5]
ALL = (0, 1, 2, 3)
CASES: dict[str, dict] = {
    "task_arithmetic": gta_case(
        "task_arithmetic",
        ALL,
        weight=ONES,
        density=ONES,
        lam=1.0,
        normalize=False,
        rescale=False,
        int8_mask=False,
    ),
    "task_arithmetic_lambda": gta_case(
        "task_arithmetic",
        ALL,
        weight=ONES,
        density=ONES,
        lam=0.7,
        normalize=False,
        rescale=False,
        int8_mask=False,
    ),
    "task_arithmetic_normalize": gta_case(
        "task_arithmetic",
        ALL,
        weight=W,
        density=ONES,
        lam=0.9,
        normalize=True,
        rescale=False,
        int8_mask=False,
    ),
    "ties": gta_case(
        "ties", ALL, weight=ONES, density=[0.5] * 4, lam=1.0, normalize=True, rescale=False, int8_mask=False
    ),
    "ties_weighted": gta_case(
        "ties",
        ALL,
        weight=W,
        density=[0.3, 0.5, 0.7, 0.9],
        lam=0.8,
        normalize=True,
        rescale=False,
        int8_mask=True,
    ),
    "ties_rescale_sum": gta_case(
        "ties", ALL, weight=W, density=[0.5] * 4, lam=1.0, normalize=False, rescale=True, int8_mask=False
    ),
    "breadcrumbs": gta_case(
        "breadcrumbs",
        ALL,
        weight=ONES,
        density=[0.6] * 4,
        extra_per_model={"gamma": [0.1] * 4},
        lam=1.0,
        normalize=False,
        rescale=False,
        int8_mask=False,
    ),
    "breadcrumbs_weighted": gta_case(
        "breadcrumbs",
        ALL,
        weight=W,
        density=[0.6] * 4,
        extra_per_model={"gamma": [0.1] * 4},
        lam=0.9,
        normalize=False,
        rescale=False,
        int8_mask=False,
    ),
    "breadcrumbs_rescale_normalize": gta_case(
        "breadcrumbs",
        ALL,
        weight=W,
        density=[0.6] * 4,
        extra_per_model={"gamma": [0.1] * 4},
        lam=1.0,
        normalize=True,
        rescale=True,
        int8_mask=False,
    ),
    "breadcrumbs_ties": gta_case(
        "breadcrumbs_ties",
        ALL,
        weight=ONES,
        density=[0.6] * 4,
        extra_per_model={"gamma": [0.1] * 4},
        lam=1.0,
        normalize=False,
        rescale=False,
        int8_mask=False,
    ),
    "breadcrumbs_ties_normalize": gta_case(
        "breadcrumbs_ties",
        ALL,
        weight=W,
        density=[0.6] * 4,
        extra_per_model={"gamma": [0.1] * 4},
        lam=0.9,
        normalize=True,
        rescale=False,
        int8_mask=False,
    ),
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": BASE,
        "models": [{"model": BASE}, *({"model": f"inputs/task{t}"} for t in ALL)],
        "parameters": {"filter_wise": False},
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": BASE,
        "models": [{"model": BASE}, *({"model": f"inputs/task{t}"} for t in ALL)],
        "parameters": {"filter_wise": True},
    },
    "model_stock_2tasks": {
        "merge_method": "model_stock",
        "base_model": BASE,
        "models": [{"model": BASE}, {"model": "inputs/task0"}, {"model": "inputs/task1"}],
        "parameters": {"filter_wise": False},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": BASE,
        "models": [{"model": BASE}, {"model": "inputs/task0"}],
        "parameters": {"t": 0.3},
    },
}
for _name, _flatten, _row_wise in (
    ("nuslerp", True, False),
    ("nuslerp_rows", False, False),
    ("nuslerp_columns", False, True),
):
    _models = [
        {"model": "inputs/task0", "parameters": {"weight": 0.3}},
        {"model": "inputs/task1", "parameters": {"weight": 0.7}},
    ]
    _params = {"nuslerp_flatten": _flatten, "nuslerp_row_wise": _row_wise}
    CASES[_name] = {"merge_method": "nuslerp", "base_model": BASE, "models": _models, "parameters": _params}
    if _name != "nuslerp_columns":  # without base_model: slerp of the two weights themselves
        CASES[_name.replace("nuslerp", "nuslerp_nobase")] = {
            "merge_method": "nuslerp",
            "models": _models,
            "parameters": _params,
        }


def run_mergekit(config: dict, seed: int | None = None) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mergekit.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            MERGEKIT,
            str(path),
            str(Path(tmp) / "out"),
            "--no-copy-tokenizer",
            "--no-write-model-card",
            "--device",
            "cpu",
            "--quiet",
        ]
        if seed is not None:
            command += ["--random-seed", str(seed)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"mergekit-yaml failed:\n{done.stdout}\n{done.stderr}")
        merged = {}
        for shard in sorted((Path(tmp) / "out").glob("*.safetensors")):
            merged |= load_file(shard)
    return merged


def finish(config: dict) -> dict:
    return {**config, "dtype": "float32", "out_dtype": "float32"}


# ---------------------------------------------------------------------------------------------------------
# random methods: statistics only


RANDOM = {
    "dare_linear": dict(density=0.4, extra=None),
    "dare_ties": dict(density=0.4, extra=None),
    "della": dict(density=0.5, extra={"epsilon": [0.2]}),
    "della_linear": dict(density=0.5, extra={"epsilon": [0.2]}),
}
RANDOM_TASK = 3
SEEDS = [0, 1, 2, 3]
BUCKETS = 10


def random_stats() -> dict:
    base = load_file(INPUTS / "base" / "model.safetensors")
    tau = {k: v - base[k] for k, v in load_file(INPUTS / f"task{RANDOM_TASK}" / "model.safetensors").items()}
    result = {
        "what": (
            "Single-task merges (base + task3, weight 1.0, lambda 1.0, normalize false, rescale true, "
            "int8_mask false) run with mergekit-yaml --random-seed in `seeds`; per tensor, over the entries "
            "with tau = task3 - base != 0: keep_rate = share with output != base; scale_observed = median of "
            "(output - base) / tau over kept entries; scale_l1 = sum|tau| / sum|tau over kept entries| (the "
            "predicted L1 rescale, sparsify.py:37-53); max_rel_err = max |(output-base) - scale_l1*tau| / "
            "|scale_l1*tau| over kept entries. For della*, keep_by_rank pools all tensors and seeds: entries "
            "bucketed by rank_norm = (rank-1)/(ncols-1) of |tau| within each row (1-D: the whole vector), "
            "with the observed keep rate next to the mean probability density - epsilon + 2*epsilon*rank_norm "
            "(sparsify.py:160-171)."
        ),
        "seeds": SEEDS,
        "task": f"task{RANDOM_TASK}",
        "methods": {},
    }
    for method, spec in RANDOM.items():
        config = finish(
            gta_case(
                method,
                (RANDOM_TASK,),
                weight=[1.0],
                density=[spec["density"]],
                extra_per_model=spec["extra"],
                lam=1.0,
                normalize=False,
                rescale=True,
                int8_mask=False,
            )
        )
        entry = {"config": config, "density": spec["density"], "tensors": {}}
        if spec["extra"]:
            entry["epsilon"] = spec["extra"]["epsilon"][0]
        kept_total = nonzero_total = 0
        per_tensor: dict[str, dict[str, list]] = {}
        bucket_kept = torch.zeros(BUCKETS, dtype=torch.float64)
        bucket_count = torch.zeros(BUCKETS, dtype=torch.float64)
        bucket_prob = torch.zeros(BUCKETS, dtype=torch.float64)
        for seed in SEEDS:
            out = run_mergekit(config, seed)
            for key, t in tau.items():
                delta = out[key] - base[key]
                nonzero = t != 0
                kept = nonzero & (delta != 0)
                stats = per_tensor.setdefault(
                    key, {"keep_rate": [], "scale_observed": [], "scale_l1": [], "max_rel_err": []}
                )
                n_nz, n_kept = int(nonzero.sum()), int(kept.sum())
                kept_total += n_kept
                nonzero_total += n_nz
                stats["keep_rate"].append(round(n_kept / n_nz, 6) if n_nz else None)
                if n_kept:
                    scale_l1 = (t.abs().sum() / (t * kept).abs().sum()).item()
                    ratio = delta[kept] / t[kept]
                    predicted = scale_l1 * t[kept]
                    stats["scale_observed"].append(round(ratio.median().item(), 6))
                    stats["scale_l1"].append(round(scale_l1, 6))
                    rel = ((delta[kept] - predicted).abs() / predicted.abs()).max().item()
                    stats["max_rel_err"].append(float(f"{rel:.3g}"))
                if method.startswith("della"):
                    rows = t.reshape(1, -1) if t.dim() < 2 else t
                    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double() + 1
                    rank_norm = ((ranks - 1) / (rows.shape[1] - 1)).reshape(t.shape)
                    prob = spec["density"] - entry["epsilon"] + 2 * entry["epsilon"] * rank_norm
                    bucket = (rank_norm * BUCKETS).long().clamp(max=BUCKETS - 1)[nonzero]
                    bucket_count += torch.bincount(bucket, minlength=BUCKETS).double()
                    bucket_kept += torch.bincount(bucket, weights=kept[nonzero].double(), minlength=BUCKETS)
                    bucket_prob += torch.bincount(bucket, weights=prob[nonzero], minlength=BUCKETS)
        entry["tensors"] = {
            key: {"numel": tau[key].numel(), "nonzero_tau": int((tau[key] != 0).sum()), **s}
            for key, s in per_tensor.items()
        }
        entry["keep_rate_overall"] = round(kept_total / nonzero_total, 6)
        if method.startswith("della"):
            entry["keep_by_rank"] = [
                {
                    "rank_norm": [b / BUCKETS, (b + 1) / BUCKETS],
                    "entries": int(bucket_count[b]),
                    "keep_rate": round((bucket_kept[b] / bucket_count[b]).item(), 4),
                    "expected_prob": round((bucket_prob[b] / bucket_count[b]).item(), 4),
                }
                for b in range(BUCKETS)
            ]
        result["methods"][method] = entry
        print(f"{method}: keep {entry['keep_rate_overall']:.4f} (density {spec['density']})", flush=True)
    return result


def main() -> None:
    make_inputs()
    shutil.rmtree(EXPECTED, ignore_errors=True)
    for name, config in CASES.items():
        config = finish(config)
        target = EXPECTED / name
        target.mkdir(parents=True)
        (target / "mergekit.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        save_file(run_mergekit(config), target / "model.safetensors", metadata={"format": "pt"})
        print(f"{name}: ok", flush=True)
    stats = random_stats()
    (EXPECTED / "random_stats.json").write_text(json.dumps(stats, indent=1) + "\n")


if __name__ == "__main__":
    main()
