"""Engine time of the fused CPU kernels and of torch operations against the CPU span size (how many entries
of a piece the torch path computes at once).

Runs each recipe in this process with every setting in turn (alternating, `--repeats` rounds, outputs to a
temporary directory, no model card) and prints a markdown table of the median engine seconds (`seconds` of
the run record: every pass, reading and writing included; interpreter start-up excluded). A span of 2^21
entries or more computes whole pieces at once. `--fused` adds a column for the fused kernels (which compute
whole pieces whatever the span); the span columns use torch operations only.

    .venv/bin/python benchmarks/span_sizes.py RECIPE.yaml [RECIPE.yaml ...] --fused --spans 262144
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from hubmerge.recipe import load_recipe
from hubmerge.run import run_recipe


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipes", nargs="+", type=Path)
    parser.add_argument("--spans", nargs="*", type=int, default=[1 << 21, 1 << 17, 1 << 18, 1 << 19])
    parser.add_argument("--fused", action="store_true", help="also time the fused kernels")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # (label, span_entries, fused_kernels)
    settings = [("fused kernels", None, True)] if args.fused else []
    settings += [(f"torch, span 2^{s.bit_length() - 1}", s, False) for s in args.spans]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| recipe | " + " | ".join(label for label, _, _ in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for path in args.recipes:
        recipe = load_recipe(path)
        seconds: dict[str, list[float]] = {label: [] for label, _, _ in settings}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                for label, span, kernels in settings:
                    result = run_recipe(
                        recipe,
                        output=Path(tmp) / "out",
                        overwrite=True,
                        device="cpu",
                        span_entries=span,
                        fused_kernels=kernels,
                        model_card=False,
                    )
                    seconds[label].append(result.record["seconds"])
        cells = [f"{statistics.median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)})" for v in seconds.values()]
        print(f"| {path.name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
