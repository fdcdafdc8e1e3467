# .venv/bin/python benchmarks/memory.py --write-docs   (4 methods, 16-layer 1.08 GB fp32 model, T = 4)
"""Peak memory, wall time and read throughput of `hubmerge run` on a generated Llama-style checkpoint.

The claim checked: the engine holds the T+1 input pieces of one tensor (row blocks of at most
DEFAULT_BLOCK_ENTRIES entries) plus a few float32 work pieces, so peak memory is O((T+2) × piece size),
independent of model size and far below (T+1) × model size.

Inputs are generated once (seeded, cached under .cache/bench/memory/): a base in sharded safetensors and T
fine-tunes = base + structured, partly sparse deltas. Every method runs as a child process under GNU time,
which gives its peak RSS (ru_maxrss); /proc/PID/status is sampled every 0.05 s to split resident memory into
anonymous memory and file-backed pages (mapped shared libraries; hubmerge reads inputs with pread, not mmap).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import (
    DOCS,
    GENERATOR_VERSION,
    HUBMERGE,
    REPO,
    ChildUsage,
    LlamaConfig,
    cpu_model,
    page_cache_bound,
    run_child,
    shard_plan,
    shell,
    weight_files,
    write_docs,
    write_model,
)
from hubmerge.planning import DEFAULT_BLOCK_ENTRIES, plan_summary, prepare
from hubmerge.recipe import load_recipe

BEGIN, END = "<!-- memory.py: begin -->", "<!-- memory.py: end -->"
METHOD_PARAMETERS: dict[str, dict[str, object]] = {
    "task_arithmetic": {},
    "ties": {},
    "tall_masks": {"merge": "task_arithmetic", "lambda": 0.4},
    "consensus": {"k": 2},
}
MIB = 1 << 20


@dataclass(frozen=True)
class ModelConfig(LlamaConfig):
    """A Llama-style decoder, float32, and the number of its fine-tunes."""

    tasks: int = 4

    @property
    def root(self) -> Path:
        return REPO / ".cache" / "bench" / "memory" / f"llama-l{self.layers}-t{self.tasks}"

    def model_dirs(self) -> list[Path]:
        return [self.root / "base", *(self.root / f"task{t}" for t in range(self.tasks))]


def ensure_models(cfg: ModelConfig) -> list[Path]:
    """Generate the base and the fine-tunes unless the cache holds them with the same settings."""
    stamp = cfg.root / "settings.json"
    settings = json.dumps({**asdict(cfg), "generator": GENERATOR_VERSION}, sort_keys=True)
    dirs = cfg.model_dirs()
    if stamp.is_file() and stamp.read_text() == settings:
        return dirs
    shutil.rmtree(cfg.root, ignore_errors=True)
    started = time.perf_counter()
    for task, directory in zip([None, *range(cfg.tasks)], dirs, strict=True):
        write_model(cfg, directory, task)
    stamp.write_text(settings)
    print(f"generated {cfg.root} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return dirs


@dataclass
class Measurement:
    method: str
    layers: int
    params: int
    model_bytes: int
    passes: int
    estimate_bytes: int
    load: float  # 1-minute load average when the run started
    usage: ChildUsage
    engine_s: float
    bytes_read: int
    output_bytes: int

    @property
    def throughput(self) -> float:
        """Bytes read per engine second, in GB/s."""
        return self.bytes_read / self.engine_s / 1e9


def write_recipe(path: Path, method: str, dirs: list[Path]) -> None:
    recipe = {
        "version": 1,
        "base": str(dirs[0]),
        "models": [{"source": str(d), "name": d.name} for d in dirs[1:]],
        "method": method,
        "parameters": METHOD_PARAMETERS[method],
    }
    path.write_text(json.dumps(recipe, indent=2) + "\n")  # JSON is YAML


def baseline(cfg: ModelConfig, dirs: list[Path]) -> ChildUsage:
    """`hubmerge run --dry-run`: interpreter, imports and headers, no tensor data."""
    work = cfg.root / "runs"
    work.mkdir(exist_ok=True)
    recipe = work / "task_arithmetic.yaml"
    write_recipe(recipe, "task_arithmetic", dirs)
    command = [str(HUBMERGE), "run", str(recipe), "--output", str(work / "dry"), "--dry-run"]
    return run_child(command, work / "dry-run.time")


def measure(cfg: ModelConfig, method: str, dirs: list[Path]) -> Measurement:
    """Run one method once; the output is deleted afterwards."""
    work = cfg.root / "runs"
    work.mkdir(exist_ok=True)
    recipe, output = work / f"{method}.yaml", work / f"out-{method}"
    write_recipe(recipe, method, dirs)
    job = prepare(load_recipe(recipe), str(recipe))
    plan = plan_summary(job)
    job.close()
    command = [str(HUBMERGE), "run", str(recipe), "--output", str(output), "--overwrite", "-q"]
    print("$", " ".join(command), file=sys.stderr)
    load = os.getloadavg()[0]
    usage = run_child(command, work / f"{method}.time")
    record = json.loads((output / "hubmerge.json").read_text())
    size = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
    shutil.rmtree(output)
    return Measurement(
        method=method,
        layers=cfg.layers,
        params=cfg.params,
        model_bytes=cfg.nbytes,
        passes=len(plan["passes"]),
        estimate_bytes=plan["peak_memory_estimate"],
        load=load,
        usage=usage,
        engine_s=record["seconds"],
        bytes_read=record["bytes_read"],
        output_bytes=size,
    )


def table(rows: list[Measurement], first: str) -> str:
    head = (
        f"| {first} | passes | wall s | engine s | CPU s | load | peak RSS MiB | RssAnon MiB | RssFile MiB "
        "| dry-run estimate MiB | bytes read GB | read GB/s | output GB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in rows:
        u = m.usage
        label = (
            m.method
            if first == "method"
            else f"{m.layers} ({m.params / 1e6:.0f} M, {m.model_bytes / 1e9:.2f} GB)"
        )
        lines.append(
            f"| {label} | {m.passes} | {u.wall_s:.1f} | {m.engine_s:.1f} | {u.cpu_s:.1f} | {m.load:.1f} "
            f"| {u.peak_rss_kib / 1024:.0f} | {u.peak_anon_kib / 1024:.0f} | {u.peak_file_kib / 1024:.0f} "
            f"| {m.estimate_bytes / MIB:.0f} | {m.bytes_read / 1e9:.2f} | {m.throughput:.2f} "
            f"| {m.output_bytes / 1e9:.2f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    cpu = cpu_model() or platform.processor()
    return (
        f"- date: {shell('date -u')}\n"
        f"- CPU: {cpu}, `nproc` = {shell('nproc')}, torch threads = {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}\n"
        f"- torch {torch.__version__}, Python {platform.python_version()}\n"
        f"- `free -g`:\n\n```\n{shell('free -g')}\n```"
    )


@dataclass
class Results:
    bound: float
    baseline: ChildUsage
    rows: list[Measurement]
    scaling: list[Measurement]


def report(cfg: ModelConfig, results: Results, command: str) -> str:
    t = cfg.tasks
    inputs_mib = (t + 1) * cfg.nbytes / MIB
    anon = max(m.usage.peak_anon_kib for m in results.rows) / 1024
    rss = max(m.usage.peak_rss_kib for m in results.rows) / 1024
    file = max(m.usage.peak_file_kib for m in results.rows) / 1024
    start = results.baseline
    return f"""## Peak memory and throughput (`benchmarks/memory.py`)

{machine()}

Command: `{command}`

Model: Llama-style, float32, {cfg.layers} layers, vocab {cfg.vocab}, hidden {cfg.hidden}, intermediate \
{cfg.intermediate}: {cfg.params:,} parameters, {cfg.nbytes / 1e9:.2f} GB per checkpoint in \
{len(shard_plan(cfg))} safetensors shards; T = {t} fine-tunes (base + partly sparse deltas), so \
{(t + 1) * cfg.nbytes / 1e9:.2f} GB of inputs. Each method ran once as \
`hubmerge run RECIPE --output DIR --overwrite -q` (device cpu), inputs in the page cache.

Claim checked: peak memory is O((T+2) × piece size), independent of model size. Pieces are row blocks of at \
most {DEFAULT_BLOCK_ENTRIES:,} entries ({DEFAULT_BLOCK_ENTRIES * 4 / MIB:.0f} MiB as float32), so the \
tensors held at once should take a few hundred MiB, far below (T+1) × model size = {inputs_mib:,.0f} MiB.

{table(results.rows, "method")}

Page-cache read bound (`cat` of all {(t + 1) * cfg.nbytes / 1e9:.2f} GB of input shards, warm second run): \
{results.bound:.2f} GB/s. Start-up alone (`hubmerge run --dry-run`: imports, headers, no tensor data): \
peak RSS {start.peak_rss_kib / 1024:.0f} MiB, RssAnon {start.peak_anon_kib / 1024:.0f} MiB, \
{start.wall_s:.1f} s.

Over the {len(results.rows)} methods, the largest sampled RssAnon is {anon:.0f} MiB \
({100 * anon / inputs_mib:.1f} % of (T+1) × model size), start-up included. The largest peak RSS is \
{rss:.0f} MiB ({100 * rss / inputs_mib:.0f} %); it also counts up to {file:.0f} MiB of file-backed \
pages, mostly the mapped code of torch and Python (inputs are read with pread, so they do not stay mapped).

Task Arithmetic at two model sizes (same T):

{table(results.scaling, "layers")}

Columns: *peak RSS* is `ru_maxrss` of the `hubmerge` process (`/usr/bin/time`'s %M); *RssAnon* and \
*RssFile* are the peaks of /proc/PID/status sampled every 0.05 s (anonymous memory vs. file-backed pages: \
mapped libraries and files, which the kernel can drop at any time); *dry-run estimate* is \
`peak_memory_estimate` of `hubmerge run --dry-run`; *read GB/s* is bytes read / engine seconds (from \
`hubmerge.json`); *wall s* (GNU time's %e) includes interpreter start-up and imports; *CPU s* is user + \
system time of the process; *load* is the 1-minute load average when the run started (other processes on \
the machine slow wall times, not memory).
"""


def scaling_runs(
    args: argparse.Namespace, cfg: ModelConfig, rows: list[Measurement], dirs: list[Path]
) -> Iterator[Measurement]:
    for layers in sorted(set(args.scale_layers)):
        done = [m for m in rows if m.method == "task_arithmetic" and m.layers == layers]
        if done:
            yield done[0]
            continue
        small = ModelConfig(layers=layers, tasks=cfg.tasks, seed=cfg.seed)
        yield measure(small, "task_arithmetic", dirs if layers == cfg.layers else ensure_models(small))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: 271 M params, 1.08 GB)")
    parser.add_argument("--tasks", type=int, default=4, help="number of fine-tunes T")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHOD_PARAMETERS), default=list(METHOD_PARAMETERS)
    )
    parser.add_argument(
        "--scale-layers",
        type=int,
        nargs="*",
        help="layer counts for the Task Arithmetic size check (default: half and all of --layers)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write-docs", action="store_true", help=f"replace the section in {DOCS.relative_to(REPO)}"
    )
    args = parser.parse_args()
    if args.scale_layers is None:
        args.scale_layers = [max(1, args.layers // 2), args.layers]
    command = " ".join([".venv/bin/python", "benchmarks/memory.py", *sys.argv[1:]])

    cfg = ModelConfig(layers=args.layers, tasks=args.tasks, seed=args.seed)
    dirs = ensure_models(cfg)
    bound = page_cache_bound(weight_files(dirs))
    start = baseline(cfg, dirs)
    rows = [measure(cfg, method, dirs) for method in args.methods]
    results = Results(bound, start, rows, list(scaling_runs(args, cfg, rows, dirs)))
    section = report(cfg, results, command)
    print(section)
    if args.write_docs:
        write_docs(section, BEGIN, END)


if __name__ == "__main__":
    main()
