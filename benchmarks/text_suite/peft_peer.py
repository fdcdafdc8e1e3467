"""The peer of hubmerge's LoRA rows: PEFT's own `add_weighted_adapter` on the suite's eight LoRA adapters.

    .venv/bin/python benchmarks/text_suite/peft_peer.py [--device cpu|cuda] [--types linear ties ...]

Loads the base (`AutoModel`, `.cache/text_suite/base`), the first adapter with `PeftModel.from_pretrained` and
the other seven with `load_adapter`, then for each combination type and each α of the (reduced) grid calls
`add_weighted_adapter(adapters, [α] * 8, name, combination_type, density, majority_sign_method="total")`,
forms θ0 + `get_delta_weight` of the new adapter for every LoRA module (the weights `merge_and_unload` gives)
and scores them with hubmerge's own `Evaluator` and the evaluation section `run.py --inputs lora` writes (same
data, head, max lengths, batching), so the accuracies compare with hubmerge's rows. α is chosen on validation
(mean normalized accuracy, normalized by the adapters' own accuracy, as hubmerge does), reported on test.
`dare_ties` draws its random masks after `torch.manual_seed(seed)`. The report goes to
`.cache/text_suite/out_lora/peft_peer.json`, which `run.py --inputs lora --write-lora-docs` renders next to
hubmerge's rows (its `cat` at hubmerge TA's chosen α is the same-method check).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # as a script, only this folder is on the path

from benchmarks.text_suite.finetune import CACHE, configure_torch  # noqa: E402
from benchmarks.text_suite.run import (  # noqa: E402
    METHODS,
    PEER_REPORT,
    Grids,
    recipe_for,
    same_method_check,
    suite_tasks,
)

# combination type → density (None: the type takes none); densities as hubmerge's corresponding rows:
# ties as TIES (0.2), dare_ties as DARE-TIES (0.5), magnitude_prune as magnitude pruning (0.1).
TYPES: dict[str, float | None] = {
    "cat": None,
    "linear": None,
    "ties": 0.2,
    "dare_ties": 0.5,
    "magnitude_prune": 0.1,
    "ties_svd": 0.2,
}
DEFAULT_TYPES = ["cat", "linear", "ties", "dare_ties", "magnitude_prune"]  # ties_svd: --types ... ties_svd
SVD_RANK = 16  # ties_svd: the rank of hubmerge's merged-LoRA rows
REDUCED_SCALING = [0.3, 0.5, 0.7, 1.0]


def linear_factor_weights(weight: float, scaling: float) -> tuple[float, float]:
    """The factors PEFT's `linear` / `ties` / `dare_ties` / `magnitude_prune` put on one adapter's A and B:
    √|w·s| on both, the sign of w·s on A only (so ΔW of one adapter alone is w·s·B@A)."""
    ws = weight * scaling
    root = math.sqrt(abs(ws))
    return (root if ws >= 0 else -root), root


def summarize(accuracy: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, Any]:
    """Per-task accuracy, normalized accuracy (÷ the adapter's own) and their means, as hubmerge's rows."""
    normalized = {t: accuracy[t] / finetuned[t] for t in accuracy}
    return {
        "accuracy": dict(accuracy),
        "normalized": normalized,
        "mean_accuracy": sum(accuracy.values()) / len(accuracy),
        "mean_normalized": sum(normalized.values()) / len(normalized),
    }


def choose(candidates: list[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The candidate with the best validation mean normalized accuracy (the first of equals, as the grid runs)."""
    best = candidates[0]
    for candidate in candidates[1:]:
        if candidate["validation"]["mean_normalized"] > best["validation"]["mean_normalized"]:
            best = candidate
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="+", choices=list(TYPES), default=DEFAULT_TYPES)
    parser.add_argument("--scaling", nargs="+", type=float, default=REDUCED_SCALING, help="α grid (weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="torch seed before each dare_ties call")
    parser.add_argument("--max-examples", type=int, help="smoke test: score only the first N texts per split")
    parser.add_argument("--report", type=Path, help=f"default: .cache/text_suite/out_lora/{PEER_REPORT}")
    parser.add_argument(
        "--update", action="store_true", help="add these types to an existing report (its other types kept)"
    )
    args = parser.parse_args(argv)
    command = ".venv/bin/python benchmarks/text_suite/peft_peer.py" + "".join(
        f" {a}" for a in (sys.argv[1:] if argv is None else argv)
    )
    os.chdir(ROOT)
    configure_torch(args.threads)

    import peft
    import torch
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModel

    from hubmerge.evaluation import Evaluator
    from hubmerge.recipe import Evaluation

    device = torch.device(args.device)
    tasks = suite_tasks(CACHE, "lora")
    names = [t.name for t in tasks]
    base_dir = CACHE / "base"
    methods = {m.key: m for m in METHODS}
    out_dir = CACHE / "out_lora"
    out_dir.mkdir(parents=True, exist_ok=True)
    section = recipe_for(methods["task_arithmetic"], tasks, None, out_dir / "peer", Grids(), ROOT)[
        "evaluation"
    ]
    if args.max_examples:
        for spec in section["tasks"].values():
            spec["max_examples"] = args.max_examples
    evaluator = Evaluator(
        Evaluation.model_validate(section), base_dir, {t.name: t.finetuned for t in tasks}, device
    )
    evaluator.prepare(["validation", "test"])

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    model = PeftModel.from_pretrained(
        AutoModel.from_pretrained(base_dir), str(tasks[0].finetuned), adapter_name=names[0]
    )
    for task in tasks[1:]:
        model.load_adapter(str(task.finetuned), adapter_name=task.name)
    model.to(device).eval()
    sync()
    load_seconds = time.perf_counter() - started
    layers = {
        name: module
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }

    @torch.no_grad()
    def overlay(adapter: str) -> dict[str, torch.Tensor]:
        """θ0 + ΔW of ``adapter`` for every LoRA module: the weights merge_and_unload would give."""
        return {
            f"{name}.weight": layer.get_base_layer().weight + layer.get_delta_weight(adapter)
            for name, layer in layers.items()
            if adapter in layer.lora_A
        }

    def score(weights: dict[str, torch.Tensor], split: str, only: str | None = None) -> dict[str, float]:
        return {t: evaluator.score(t, weights, split) for t in ([only] if only else names)}

    finetuned: dict[str, dict[str, float]] = {"validation": {}, "test": {}}
    for name in names:
        own = overlay(name)
        for split in finetuned:
            finetuned[split].update(score(own, split, only=name))
    print(
        "adapters: val "
        + f"{100 * sum(finetuned['validation'].values()) / len(names):.1f} %, test "
        + f"{100 * sum(finetuned['test'].values()) / len(names):.1f} %",
        flush=True,
    )

    types: dict[str, Any] = {}
    for kind in args.types:
        density = TYPES[kind]
        candidates: list[dict[str, Any]] = []
        kept = ""
        for alpha in args.scaling:
            name = f"{kind}_{alpha:g}".replace(".", "p")  # module names cannot hold dots
            if kind == "dare_ties":
                torch.manual_seed(args.seed)
            sync()
            t0 = time.perf_counter()
            model.add_weighted_adapter(
                names,
                [alpha] * len(names),
                name,
                combination_type=kind,
                density=density,
                majority_sign_method="total",
                **({"svd_rank": SVD_RANK} if kind.endswith("svd") else {}),
            )
            weights = overlay(name)
            sync()
            seconds = time.perf_counter() - t0
            candidate = {
                "alpha": alpha,
                "merge_seconds": round(seconds, 4),
                "validation": summarize(score(weights, "validation"), finetuned["validation"]),
            }
            candidates.append(candidate)
            print(
                f"{kind} α={alpha:g}: val {100 * candidate['validation']['mean_normalized']:.1f} % normalized "
                f"({seconds:.2f} s)",
                flush=True,
            )
            if candidate is choose(candidates):  # keep the best so far; score test only for the chosen α
                if kept:
                    model.delete_adapter(kept)
                kept = name
            else:
                model.delete_adapter(name)
        best = choose(candidates)
        best["test"] = summarize(score(overlay(kept), "test"), finetuned["test"])
        model.delete_adapter(kept)
        print(
            f"{kind}: chose α={best['alpha']:g}, test {100 * best['test']['mean_normalized']:.1f} %",
            flush=True,
        )
        types[kind] = {
            "density": density,
            "svd_rank": SVD_RANK if kind.endswith("svd") else None,
            "candidates": candidates,
            "chosen_alpha": best["alpha"],
            "test": best["test"],
            "merge_seconds": best["merge_seconds"],
        }
    hub_manifest = out_dir / "task_arithmetic" / "hubmerge.json"
    hub_record = json.loads(hub_manifest.read_text()) if hub_manifest.is_file() else None
    report = {
        "command": command,
        "commands": [command],
        "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device) + (f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""),
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
        "threads": args.threads,
        "seed": args.seed,
        "alphas": list(args.scaling),
        "tasks": names,
        "load_seconds": round(load_seconds, 2),
        "finetuned": {split: summarize(acc, acc) for split, acc in finetuned.items()},
        "types": types,
        "same_method_check": same_method_check(types["cat"], hub_record) if "cat" in types else None,
    }
    path = args.report or out_dir / PEER_REPORT
    if args.update and path.is_file():
        earlier = json.loads(path.read_text())
        report["types"] = {**earlier["types"], **types}
        report["commands"] = [*earlier.get("commands", [earlier["command"]]), command]
        report["load_seconds"] = earlier["load_seconds"]
        if "cat" in earlier["types"] and "cat" not in types:
            report["same_method_check"] = earlier.get("same_method_check")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if report["same_method_check"]:
        print("same-method check:", json.dumps(report["same_method_check"]))


if __name__ == "__main__":
    main()
