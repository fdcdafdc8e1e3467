"""The installed `hubmerge` command in a child process, for tests of `--num-processes` (not a test module)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def hubmerge_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `hubmerge ARGS`; one thread per torch process, since a process group shares the cores."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("hubmerge")), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def long_ties_recipe(directory: Path, rows: int = 4096) -> Path:
    """A TIES recipe over a base and fine-tunes `a`, `b` of one rows × 4096 float32 tensor, in `directory`
    (base.safetensors, a.safetensors, b.safetensors, ties.yaml): a run long enough to interrupt."""
    import json

    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    base = torch.randn(rows, 4096, generator=generator)
    paths = []
    for name in ("base", "a", "b"):
        weights = base if name == "base" else base + 0.01 * torch.randn(base.shape, generator=generator)
        paths.append(directory / f"{name}.safetensors")
        save_file({"w": weights}, paths[-1])
    recipe = directory / "ties.yaml"
    recipe.write_text(
        json.dumps(
            {"version": 1, "base": str(paths[0]), "models": [str(p) for p in paths[1:]], "method": "ties"}
        )
    )
    return recipe


def start_when_staging(command: list[str], directory: Path, output: str = "out") -> subprocess.Popen:
    """Start `command` (a hubmerge run writing `directory/output`) and return once its staging directory
    exists, the process still running."""
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while (
        not list(directory.glob(f".{output}.partial-*"))
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before its staging directory was seen"
    return process
