"""Several processes (torchrun, gloo, CPU) write byte for byte what one process writes; prefetch changes nothing.

The multi-process runs cut tensors into tiny pieces, so that the pieces of one tensor, and the entries of the
global statistics, are spread over both processes; the single-process references use the default pieces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge import parse_recipe, run_recipe
from hubmerge.engine import Engine, prepare
from tests.golden import FIXTURE, TASKS
from tests.processes import hubmerge_cli

ROOT = Path(__file__).resolve().parent.parent
CASES = {
    "weight_average": ("weight_average", {}),
    "task_arithmetic": ("task_arithmetic", {"scaling": 0.7}),
    "ties_global": ("ties", {"density": 0.2}),
    "ties_tensor": ("ties", {"density": 0.3, "trim": "tensor", "merge": "max"}),
    "consensus_ta": ("consensus", {"k": 2, "lambda": 0.4}),
    "consensus_ties": ("consensus", {"merge": "ties", "k": 2, "lambda": 0.5}),
    "tall_ta": ("tall_masks", {"lambda": {"task_00": 0.2, "task_01": 0.4, "task_02": 0.6, "task_03": 0.3}}),
    "tall_ties": ("tall_masks", {"merge": "ties", "lambda": 0.4}),
    "magnitude_masking": ("magnitude_masking", {"density": 0.1}),
    "magnitude_pruning": ("magnitude_pruning", {"density": 0.1}),
}
# Differ between these runs by design: creation time, wall time, process count, and bytes read (`trim: tensor`
# reads a tensor twice when it spans several pieces, and the runs use different piece sizes).
VOLATILE_RECORD_KEYS = {"created", "seconds", "processes", "bytes_read"}
SHARD_BYTES = 300_000  # several output shards, so processes share files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """The golden fixture plus an integer tensor (copied, not merged), stored in bfloat16."""
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name in ["base", *TASKS]:
        state = {k: v.to(torch.bfloat16) for k, v in load_file(FIXTURE / f"{name}.safetensors").items()}
        state["step"] = torch.arange(10, dtype=torch.int64)
        paths[name] = root / f"{name}.safetensors"
        save_file(state, paths[name])
    return paths


def recipe_of(models: dict, case: str) -> dict:
    method, parameters = CASES[case]
    return {
        "version": 1,
        "base": str(models["base"]),
        "models": [{"source": str(models[t]), "name": t} for t in TASKS],
        "method": method,
        "parameters": parameters,
        "dtype": "float32" if case == "task_arithmetic" else "auto",
    }


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return subprocess.run(
        [*command, *args], env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def last_low_code_recipe(tmp_path_factory) -> dict:
    """TIES over two tasks where the second task's threshold is the last low code (0xFFFF) of its bucket, in
    the tensor the second process holds: the last bins of the last task's low histogram must be summed too."""
    root = tmp_path_factory.mktemp("last-low-code")
    last_code = torch.tensor([0x3F80FFFF], dtype=torch.int32).view(torch.float32).item()
    save_file({k: torch.zeros(8, 8) for k in ("a", "b")}, root / "base.safetensors")
    save_file({k: torch.ones(8, 8) for k in ("a", "b")}, root / "t0.safetensors")
    save_file({"a": torch.ones(8, 8), "b": torch.full((8, 8), last_code)}, root / "t1.safetensors")
    return {
        "version": 1,
        "base": str(root / "base.safetensors"),
        "models": [str(root / f"t{i}.safetensors") for i in range(2)],
        "method": "ties",
        "parameters": {"density": 0.1, "merge": "sum"},
    }


@pytest.fixture(scope="module")
def two_process_outputs(models, last_low_code_recipe, tmp_path_factory) -> Path:
    """Every case run by 2 processes in one process group, pieces of at most 2048 entries."""
    out = tmp_path_factory.mktemp("two")
    recipes = {c: recipe_of(models, c) for c in CASES} | {"last_low_code": last_low_code_recipe}
    jobs = [
        {
            "recipe": recipe,
            "output": str(out / c),
            "block_entries": 2048,
            "max_shard_size": SHARD_BYTES,
        }
        for c, recipe in recipes.items()
    ]
    (out / "jobs.json").write_text(json.dumps(jobs))
    done = torchrun(2, str(ROOT / "tests" / "distributed_worker.py"), str(out / "jobs.json"))
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def files_of(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in ("hubmerge.json", "README.md")  # README: written from hubmerge.json
    }


def record_of(directory: Path) -> dict:
    record = json.loads((directory / "hubmerge.json").read_text())
    return {k: v for k, v in record.items() if k not in VOLATILE_RECORD_KEYS}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_write_the_bytes_of_one(case, models, two_process_outputs, tmp_path):
    single = run_recipe(
        parse_recipe(recipe_of(models, case)),
        output=tmp_path / case,
        device="cpu",
        max_shard_size=SHARD_BYTES,
        model_card=False,
    ).output
    multi = two_process_outputs / case

    single_files, multi_files = files_of(single), files_of(multi)
    assert single_files.keys() == multi_files.keys()
    differing = [name for name in single_files if single_files[name] != multi_files[name]]
    assert not differing, f"{case}: files differ: {differing}"
    assert any(name.endswith(".safetensors") for name in single_files)
    assert record_of(multi) == record_of(single)
    assert json.loads((multi / "hubmerge.json").read_text())["processes"] == 2
    assert not list(multi.parent.glob(f".{case}.partial-*")), "staging directory left behind"


def test_two_processes_sum_the_last_bins_of_the_low_histograms(
    last_low_code_recipe, two_process_outputs, tmp_path
):
    single = run_recipe(parse_recipe(last_low_code_recipe), output=tmp_path / "single", model_card=False)
    multi = two_process_outputs / "last_low_code"
    assert files_of(multi) == files_of(single.output)
    assert record_of(multi) == record_of(single.output)


def test_cli_num_processes_runs_through_torchrun(models, tmp_path):
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(json.dumps(recipe_of(models, "ties_global")))  # JSON is YAML

    done = hubmerge_cli("run", str(recipe), "-o", str(tmp_path / "multi"), "--num-processes", "2", "-q")

    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("wrote ") == 1, "only rank 0 reports"
    single = run_recipe(
        parse_recipe(recipe_of(models, "ties_global")), output=tmp_path / "single", device="cpu"
    )
    assert files_of(tmp_path / "multi") == files_of(single.output)


def test_cli_num_processes_failure_is_reported_with_exit_code(models, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(json.dumps({**recipe_of(models, "ties_global"), "base": str(tmp_path / "missing")}))

    done = hubmerge_cli("run", str(recipe), "-o", str(tmp_path / "out"), "--num-processes", "2")

    assert done.returncode != 0
    assert "missing" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["ties_tensor", "tall_ties", "magnitude_pruning"])
def test_prefetching_engine_equals_the_plain_engine(case, models, tmp_path):
    written = {}
    for prefetch in (False, True):
        job = prepare(parse_recipe(recipe_of(models, case)))
        engine = Engine(job, torch.device("cpu"), block_entries=4096, prefetch=prefetch)
        directory = tmp_path / str(prefetch)
        directory.mkdir()
        engine.collect_statistics()
        if job.spec.result == "merged":
            engine.write_merged(directory, SHARD_BYTES)
        else:
            engine.write_artifact(directory, SHARD_BYTES)
        job.close()
        written[prefetch] = (files_of(directory), engine.stats.as_dict(), engine.bytes_read)
    assert written[True] == written[False]


def test_two_processes_record_the_nonfinite_counts_of_both(models, tmp_path):
    """Each process counts the NaN/Inf entries of its own pieces; rank 0's record holds the sum of both."""
    damaged = dict(models)
    state = load_file(models[TASKS[1]])
    first, last = sorted(k for k, v in state.items() if v.is_floating_point() and v.dim() == 2)[::-1][:2]
    state[first].view(-1)[:3] = float("nan")
    state[last].view(-1)[-2:] = float("inf")
    damaged[TASKS[1]] = tmp_path / "damaged.safetensors"
    save_file(state, damaged[TASKS[1]])
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(json.dumps(recipe_of(damaged, "task_arithmetic")))

    refused = hubmerge_cli("run", str(recipe), "-o", str(tmp_path / "refused"), "-q")
    done = hubmerge_cli(
        "run", str(recipe), "-o", str(tmp_path / "multi"), "--num-processes", "2", "-q", "--allow-nonfinite"
    )

    assert refused.returncode == 2 and "NaN/Inf" in refused.stderr
    assert done.returncode == 0, done.stderr[-4000:]
    both_refuse = hubmerge_cli(
        "run", str(recipe), "-o", str(tmp_path / "multi-refused"), "--num-processes", "2"
    )
    assert both_refuse.returncode == 2, both_refuse.stderr[-4000:]
    assert both_refuse.stderr.count("error:") == 1 and "NaN/Inf" in both_refuse.stderr, both_refuse.stderr
    assert "Traceback" not in both_refuse.stderr and not (tmp_path / "multi-refused").exists()
    record = json.loads((tmp_path / "multi" / "hubmerge.json").read_text())
    assert sorted((r["tensor"], r["count"]) for r in record["nonfinite"]) == sorted([(first, 3), (last, 2)])
