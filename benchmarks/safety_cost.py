"""What the data-safety checks cost a run: the SHA-256 of every output file (taken while writing), the NaN/Inf
count of every input (taken by the fused kernels as they load), the output lock and path checks.

Runs Task Arithmetic and TALL masks on a generated Llama-style model, each run in a fresh process, alternating
three variants: this tree; this tree with the output hashes switched off; and `--before`, a checkout without
the checks (e.g. `git worktree add /tmp/before fb9a1fe`). Prints the median wall time of `run_recipe`.

    .venv/bin/python benchmarks/safety_cost.py --before /tmp/before --layers 16 --tasks 4 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.synthetic import LlamaConfig, write_model

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "benchmarks" / "safety"
RUN = """
import sys, time
from unittest import mock
from hubmerge import parse_recipe, run_recipe
recipe = parse_recipe(__import__("json").loads(sys.argv[1]))
with mock.patch(sys.argv[3], lambda *args, **kwargs: None) if sys.argv[3:] else mock.MagicMock():
    started = time.perf_counter()
    run_recipe(recipe, output=sys.argv[2], overwrite=True, model_card=False)
    print(time.perf_counter() - started)
"""


def models(cfg: LlamaConfig, tasks: int) -> list[Path]:
    root = CACHE / f"l{cfg.layers}-{cfg.dtype}"
    dirs = [root / "base", *(root / f"task{t}" for t in range(tasks))]
    for task, directory in enumerate(dirs):
        if not (directory / "done").exists():
            directory.mkdir(parents=True, exist_ok=True)
            write_model(cfg, directory, None if task == 0 else task - 1)
            (directory / "done").write_text("")
    return dirs


def timed_run(tree: Path, recipe: dict, output: Path, patch: str | None) -> float:
    command = [sys.executable, "-c", RUN, json.dumps(recipe), str(output), *([patch] if patch else [])]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout without the checks")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cfg = LlamaConfig(layers=args.layers, dtype=args.dtype)
    dirs = models(cfg, args.tasks)
    variants = {
        "with every check": (REPO, None),
        "output hashes off": (REPO, "hubmerge.run.record_hashes"),
        f"before ({args.before})": (args.before, None),
    }
    print(f"{cfg.params:,} parameters, {cfg.dtype}, T = {args.tasks}, {args.repeats} runs each, alternated")
    print("| method | variant | median s | runs s | vs before |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for method in ("task_arithmetic", "tall_masks"):
            recipe = {
                "version": 1,
                "base": str(dirs[0]),
                "models": [str(d) for d in dirs[1:]],
                "method": method,
            }
            times: dict[str, list[float]] = {name: [] for name in variants}
            for tree, _ in variants.values():  # warm the page cache and compile each tree's kernels
                timed_run(tree, recipe, Path(tmp) / "out", None)
            for _ in range(args.repeats):
                for name, (tree, patch) in variants.items():
                    times[name].append(timed_run(tree, recipe, Path(tmp) / "out", patch))
            before = statistics.median(times[f"before ({args.before})"])
            for name, runs in times.items():
                median = statistics.median(runs)
                shown = ", ".join(f"{t:.2f}" for t in runs)
                print(f"| {method} | {name} | {median:.2f} | {shown} | {median / before:.3f} |")


if __name__ == "__main__":
    main()
