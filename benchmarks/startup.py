"""Start-up time of the hubmerge CLI: `--help`, `--version` and `import hubmerge.cli`, for this tree and, with
`--before`, another checkout (e.g. `git worktree add /tmp/before fb9a1fe`), each in fresh processes.

    .venv/bin/python benchmarks/startup.py --before /tmp/before --runs 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def wall(command: list[str], env: dict[str, str]) -> float:
    # cwd outside the repo: `-m`/`-c` would otherwise import ./hubmerge whatever PYTHONPATH says
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=tempfile.gettempdir(), capture_output=True, check=False)
    return time.perf_counter() - started


def import_seconds(env: dict[str, str]) -> float:
    """The cumulative `-X importtime` figure of hubmerge.cli."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import hubmerge.cli"],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    )
    line = [row for row in done.stderr.splitlines() if row.rstrip().endswith("| hubmerge.cli")][-1]
    return int(line.split("|")[1]) / 1e6


def row(name: str, values: list[float]) -> str:
    return f"| {name} | {statistics.median(values):.3f} s ({min(values):.3f}–{max(values):.3f}) |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="another checkout to measure the same way")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    trees = {"this tree": REPO, **({f"before ({args.before})": args.before} if args.before else {})}
    print("| command | median (min–max) |\n|---|---|")
    for label, tree in trees.items():
        env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "100"}
        for flag in ("--help", "--version"):
            command = [sys.executable, "-m", "hubmerge", flag]
            print(
                row(f"{label}: `python -m hubmerge {flag}`", [wall(command, env) for _ in range(args.runs)])
            )
        print(row(f"{label}: `import hubmerge.cli`", [import_seconds(env) for _ in range(args.runs)]))
    floor = [wall([sys.executable, "-c", "pass"], dict(os.environ)) for _ in range(args.runs)]
    print(row("`python -c pass` (the floor)", floor))


if __name__ == "__main__":
    main()
