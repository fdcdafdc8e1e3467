"""hubmerge on a GPU and on the CPU of the same machine: a 1 B bfloat16 Llama-style model, T = 4 and 8.

    python benchmarks/gpu_bench.py                           # full: 1.0 B parameters, T = 4 and 8, cuda and cpu
    python benchmarks/gpu_bench.py --smoke --devices cpu     # a tiny model, T = 2: checks the script in seconds

Inputs are generated seeded on the GPU when there is one (on the CPU otherwise), cast to the stored dtype,
and written shard by shard with safetensors by a few writer threads; they are cached (with a completion
marker per checkpoint) in `.cache/bench/gpu/`. Each `hubmerge run` is a child process: a small wrapper runs
the CLI in-process and reports torch's CUDA peak allocation at exit, while this script samples the child's
VmHWM (peak resident memory). A warm `cat` of the T+1 input checkpoints is the plain-read baseline.
`bash benchmarks/gpu_check.sh` runs this after the GPU tests.

Prints one table: method, T, device, seconds (hubmerge's own, from hubmerge.json), wall seconds of the
command, GB read (all passes), GB/s (read ÷ seconds), peak host RSS, peak GPU memory (torch's allocation;
the caching allocator's reserve is in the JSON results), seconds ÷ seconds of one plain read of the inputs,
and whether the GPU output is byte-identical to the CPU output (files' SHA-256 from hubmerge.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import (
    DTYPES,
    LlamaConfig,
    cat_seconds,
    cpu_model,
    proc_fields,
    shard_plan,
    write_index_and_config,
)

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench" / "gpu"
GENERATOR_VERSION = 1  # bump when the generated weights change, to invalidate cached inputs
FULL = LlamaConfig(
    layers=17, hidden=2048, intermediate=5632, heads=16, dtype="bfloat16", shard_bytes=500_000_000
)  # 1,004,607,488 parameters, 2.01 GB per checkpoint
SMOKE = LlamaConfig(
    layers=2, vocab=1000, hidden=64, intermediate=176, heads=4, dtype="bfloat16", shard_bytes=200_000
)
METHODS = ("task_arithmetic", "ties", "tall_masks", "consensus")
WRITERS = 4  # threads writing shards while the next ones are drawn
# Runs `hubmerge ARGS...` in this process and writes torch's CUDA peaks to STATS at exit (typer exits through
# SystemExit, which runs atexit handlers).
CHILD = r"""
import atexit, json, sys

def report():
    import torch
    peak = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}
    with open(sys.argv[1], "w") as out:
        json.dump(peak, out)

atexit.register(report)
from hubmerge.cli import app
app(args=sys.argv[2:], prog_name="hubmerge")
"""


# -- inputs -------------------------------------------------------------------------------------------------


def seed_of(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def normal(shape: tuple[int, ...], device: torch.device, *parts: object) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed_of(*parts)), device=device)


def weights(
    cfg: LlamaConfig, name: str, shape: tuple[int, ...], task: int | None, device: torch.device
) -> torch.Tensor:
    """The base's tensor, or a fine-tune's: base + a structured, partly sparse delta like synthetic.py's (3/4
    of the layers change: every entry by ~1e-5, which bfloat16 mostly rounds away, a quarter of the rows by
    ~1e-3 with a per-task bias; embedding and lm_head in 5 % of their rows; norms for odd tasks only)."""
    norm = name.endswith("norm.weight")
    x = normal(shape, device, cfg.seed, name)
    x = x.mul_(0.05).add_(1) if norm else x.mul_(0.02)
    layer = name.split(".")[2] if name.startswith("model.layers.") else name
    if task is None or seed_of(cfg.seed, "layer", task, layer) % 4 == 0:
        return x
    if norm:
        return x.add_(normal(shape, device, cfg.seed, "norm", task, name), alpha=1e-3) if task % 2 else x
    vocab = shape[0] == cfg.vocab
    if not vocab:
        x.add_(normal(shape, device, cfg.seed, "small", task, name), alpha=1e-5)
    rows = normal((shape[0],), device, cfg.seed, "rows", task, name).argsort()[
        : max(1, int((0.05 if vocab else 0.25) * shape[0]))
    ]
    delta = normal((len(rows), *shape[1:]), device, cfg.seed, "rows delta", task, name)
    x[rows] += delta.mul_(1e-3).add_(2e-4 if task % 2 else -2e-4)
    return x


def write_checkpoint(
    cfg: LlamaConfig, directory: Path, task: int | None, device: torch.device, writers: ThreadPoolExecutor
) -> None:
    """One checkpoint (the base if task is None): drawn on `device` shard by shard, written by `writers`."""
    directory.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(cfg)
    dtype = DTYPES[cfg.dtype]
    pending: list[Future[None]] = []
    weight_map = {}
    for i, shard in enumerate(plan):
        file = directory / f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: weights(cfg, name, shape, task, device).to(dtype).cpu() for name, shape in shard}
        weight_map.update(dict.fromkeys(tensors, file.name))
        pending.append(writers.submit(save_file, tensors, str(file), {"format": "pt"}))
        while len(pending) > WRITERS:  # memory: a few shards in flight
            pending.pop(0).result()
    for done in pending:
        done.result()
    write_index_and_config(directory, cfg, weight_map)


def inputs(cfg: LlamaConfig, tasks: int, cache: Path) -> list[Path]:
    """The base and `tasks` fine-tunes, generated where missing (on the GPU when there is one)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = (
        cache
        / f"llama-{cfg.dtype}-h{cfg.hidden}-l{cfg.layers}-v{cfg.vocab}-{device.type}-g{GENERATOR_VERSION}"
    )
    dirs = [root / "base", *(root / f"task_{t}" for t in range(tasks))]
    missing = [
        (d, t) for d, t in zip(dirs, [None, *range(tasks)], strict=True) if not (d / ".complete").is_file()
    ]
    if missing:
        started = time.perf_counter()
        with ThreadPoolExecutor(WRITERS, thread_name_prefix="write") as writers:
            for directory, task in missing:
                shutil.rmtree(directory, ignore_errors=True)
                write_checkpoint(cfg, directory, task, device, writers)
                (directory / ".complete").write_text("")
        gb = len(missing) * cfg.nbytes / 1e9
        seconds = time.perf_counter() - started
        print(
            f"generated {len(missing)} checkpoints ({gb:.2f} GB) on {device.type} in {seconds:.1f} s",
            flush=True,
        )
    return dirs


def weight_files(dirs: list[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


# -- runs ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    tasks: int
    device: str
    seconds: float | None = None  # hubmerge's own (hubmerge.json)
    wall_s: float | None = None
    bytes_read: int | None = None
    peak_rss_kib: int | None = None
    gpu_allocated: int | None = None
    gpu_reserved: int | None = None
    plain_read_s: float | None = None
    digests: dict[str, str] | None = None
    note: str = ""


def run(recipe: Path, out: Path, device: str, row: Row, env: dict[str, str]) -> None:
    stats = out.with_suffix(".cuda.json")
    command = [sys.executable, "-c", CHILD, str(stats), "run", str(recipe), "-o", str(out)]
    command += ["--device", device, "-q", "--overwrite", "--no-push"]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, proc_fields(child.pid, "status", "kB").get("VmHWM", 0))  # monotonic per process
        time.sleep(0.05)
    row.wall_s = time.perf_counter() - started
    stderr = child.stderr.read() if child.stderr else ""
    if child.returncode:
        row.note = f"failed (exit {child.returncode}): {stderr.strip().splitlines()[-1:]}"
        return
    record = json.loads((out / "hubmerge.json").read_text())
    row.seconds, row.bytes_read, row.peak_rss_kib = record["seconds"], record["bytes_read"], peak
    row.digests = {name: f["sha256"] for name, f in record["files"].items()}
    cuda = json.loads(stats.read_text()) if stats.is_file() else {}
    row.gpu_allocated, row.gpu_reserved = cuda.get("allocated"), cuda.get("reserved")
    shutil.rmtree(out)
    stats.unlink(missing_ok=True)


def table(rows: list[Row]) -> str:
    head = [
        "method",
        "T",
        "device",
        "seconds",
        "wall s",
        "read GB",
        "GB/s",
        "peak RSS MiB",
        "peak GPU MiB",
        "× plain read",
        "= cpu bytes",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cpu = {(r.method, r.tasks): r.digests for r in rows if r.device == "cpu" and r.digests}

    def fmt(value: float | None, spec: str) -> str:
        return "–" if value is None else format(value, spec)

    for r in rows:
        if r.seconds is None:
            lines.append(f"| {r.method} | {r.tasks} | {r.device} | {r.note} |" + " |" * (len(head) - 4))
            continue
        same = "–"
        if r.device != "cpu" and (r.method, r.tasks) in cpu:
            same = "yes" if cpu[(r.method, r.tasks)] == r.digests else "NO"
        cells = [
            r.method,
            str(r.tasks),
            r.device,
            fmt(r.seconds, ".1f"),
            fmt(r.wall_s, ".1f"),
            fmt(r.bytes_read / 1e9, ".2f"),
            fmt(r.bytes_read / 1e9 / r.seconds, ".2f"),
            fmt(r.peak_rss_kib / 1024, ".0f"),
            fmt(None if r.gpu_allocated is None else r.gpu_allocated / 2**20, ".0f"),
            fmt(None if r.plain_read_s is None else r.seconds / r.plain_read_s, ".2f"),
            same,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model and T = 2: checks the script")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cuda cpu (cpu without a GPU)")
    parser.add_argument("--tasks", nargs="+", type=int, default=None, help="default: 4 8 (smoke: 2)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument(
        "--deadline-s", type=float, default=0, help="start no run after this many seconds (0: no limit)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="write every row here (default: CACHE/results.json)"
    )
    args = parser.parse_args()
    started = time.monotonic()
    cfg = SMOKE if args.smoke else FULL
    tasks = args.tasks or ([2] if args.smoke else [4, 8])
    devices = args.devices or (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--devices cuda: torch sees no CUDA device")
    args.cache.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.cache).free
    need = (max(tasks) + 1) * cfg.nbytes * 1.3
    if free < need:
        raise SystemExit(f"{args.cache}: {free / 1e9:.1f} GB free, need about {need / 1e9:.1f} GB")
    dirs = inputs(cfg, max(tasks), args.cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    work = args.cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    rows: list[Row] = []
    plain: dict[int, tuple[float, int]] = {}
    for t in tasks:
        files = weight_files(dirs[: t + 1])
        cat_seconds(files)  # warm the page cache
        plain[t] = (cat_seconds(files), sum(f.stat().st_size for f in files))
        for device in devices:
            for method in args.methods:
                row = Row(method, t, device, plain_read_s=plain[t][0])
                rows.append(row)
                if args.deadline_s and time.monotonic() - started > args.deadline_s:
                    row.note = "skipped: past --deadline-s"
                    continue
                recipe = work / f"{method}-t{t}.json"  # JSON is YAML
                recipe.write_text(
                    json.dumps(
                        {
                            "version": 1,
                            "base": str(dirs[0]),
                            "models": [str(d) for d in dirs[1 : t + 1]],
                            "method": method,
                        }
                    )
                )
                run(recipe, work / f"{method}-t{t}-{device}", device, row, env)
                print(
                    f"  {method}, T = {t}, {device}: {row.seconds or row.note} s", file=sys.stderr, flush=True
                )
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(
        f"\n{cfg.params:,} parameters ({cfg.dtype}, {cfg.nbytes / 1e9:.3f} GB per checkpoint); "
        f"GPU: {gpu}; CPU: {cpu_model() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )
    for t, (seconds, size) in plain.items():
        print(
            f"plain read, T = {t}: {size / 1e9:.2f} GB of inputs in {seconds:.2f} s ({size / 1e9 / seconds:.2f} GB/s, warm cat)"
        )
    print()
    print(table(rows))
    print(
        "\nseconds: hubmerge.json's; GB/s: bytes read (all passes) ÷ seconds; peak RSS: VmHWM of the run; "
        "peak GPU: torch.cuda.max_memory_allocated; × plain read: seconds ÷ one warm read of the T+1 "
        "checkpoints; = cpu bytes: output files' SHA-256 equal to the CPU run's"
    )
    results = args.json or args.cache / "results.json"
    results.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    cpu = {(r.method, r.tasks): r.digests for r in rows if r.device == "cpu" and r.digests}
    different = [r for r in rows if r.digests and cpu.get((r.method, r.tasks), r.digests) != r.digests]
    if any(r.note.startswith("failed") for r in rows) or different:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
