# .venv/bin/python benchmarks/vs_mergekit.py --write-docs   (1.0 B bf16 model, T = 4 and 8: ~1-1.5 h, 30 GB)
"""hubmerge against mergekit 0.1.5 on the same generated checkpoints, and how hubmerge scales with size and T.

Inputs are generated once (seeded, cached under .cache/bench/vs_mergekit/, shard by shard): a Llama-style
bfloat16 decoder with a LlamaForCausalLM config.json and sharded safetensors + index (vocab 32000, hidden
2048, intermediate 5632, 17 layers, untied lm_head: 1.005 B parameters, 2.0 GB) and up to 8 fine-tunes =
base + structured, partly sparse deltas. Each fine-tune is its own cached directory, so T = 8 reuses the
models of T = 2 and 4. The size scaling uses the same shape with 2 and 7 layers (0.23 B and 0.49 B
parameters).

Every run is a child process under GNU time (peak RSS, wall and CPU time, block-device reads) with
/proc/PID/status and /proc/PID/io sampled, inputs warmed into the page cache by a `cat` right before, and the
same thread count for both tools. mergekit runs from its own venv (.cache/bench/mergekit-venv, created on
first use). After each method the outputs of both tools are compared, then deleted.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import (
    DOCS,
    GENERATOR_VERSION,
    HUBMERGE,
    REPO,
    ChildUsage,
    LlamaConfig,
    cat_seconds,
    cpu_model,
    page_cache_bound,
    run_child,
    shard_plan,
    shell,
    weight_files,
    write_docs,
    write_model,
)

CACHE = REPO / ".cache" / "bench" / "vs_mergekit"
MERGEKIT_VENV = REPO / ".cache" / "bench" / "mergekit-venv"
MERGEKIT_YAML = MERGEKIT_VENV / "bin" / "mergekit-yaml"
# Installed in this order: torch pinned first, so pip takes the local CPU wheel instead of a multi-GB CUDA
# build; mergekit 0.1.5 asks only for torch>=2.0.0 and keeps it.
MERGEKIT_PINS = ("torch==2.13.0", "mergekit==0.1.5")
MERGEKIT_VERSION = "0.1.5"
BEGIN, END = "<!-- vs_mergekit.py: begin -->", "<!-- vs_mergekit.py: end -->"


@dataclass(frozen=True)
class Preset:
    """The model and run grid of a full or a quick (validation) run."""

    model: LlamaConfig
    tasks: tuple[int, ...]  # T of the head-to-head runs, on `model`
    scale_layers: tuple[int, ...]  # model sizes of the size scaling, at T = size_tasks
    size_tasks: int
    scale_tasks: tuple[int, ...]  # T of the T scaling, on `model`


FULL = Preset(
    LlamaConfig(
        layers=17, hidden=2048, intermediate=5632, heads=16, dtype="bfloat16", shard_bytes=500_000_000
    ),
    tasks=(4, 8),
    scale_layers=(2, 7, 17),
    size_tasks=4,
    scale_tasks=(2, 4, 8),
)
QUICK = Preset(
    LlamaConfig(layers=2, hidden=256, intermediate=704, heads=4, dtype="bfloat16", shard_bytes=10_000_000),
    tasks=(2,),
    scale_layers=(1, 2),
    size_tasks=2,
    scale_tasks=(2, 3),
)


@dataclass(frozen=True)
class Case:
    """One measured configuration: a tool, its method and parameters, and the row label."""

    tool: str  # hubmerge | mergekit
    label: str
    method: str
    parameters: Mapping[str, object]
    per_model: Mapping[str, object] = field(default_factory=dict)  # mergekit: every fine-tune's parameters


# By --methods key, mergekit first: its output is kept until each hubmerge output of the method is compared.
CASES: dict[str, tuple[Case, ...]] = {
    "task_arithmetic": (
        Case("mergekit", "task_arithmetic", "task_arithmetic", {"normalize": False}, {"weight": 1.0}),
        Case("hubmerge", "task_arithmetic", "task_arithmetic", {"scaling": 1.0}),
    ),
    "ties": (
        # normalize: true divides by the weights of the entries that agree with the elected sign, i.e. the
        # disjoint mean (hubmerge's merge: mean); int8_mask changes only the mask's dtype, left at its default
        Case(
            "mergekit",
            "ties",
            "ties",
            {"normalize": True, "int8_mask": False},
            {"weight": 1.0, "density": 0.2},
        ),
        Case("hubmerge", "ties, trim global", "ties", {"density": 0.2, "merge": "mean", "trim": "global"}),
        Case("hubmerge", "ties, trim tensor", "ties", {"density": 0.2, "merge": "mean", "trim": "tensor"}),
    ),
    "tall_masks": (
        Case("hubmerge", "tall_masks", "tall_masks", {"merge": "task_arithmetic", "lambda": 0.4}),
    ),
    "consensus": (Case("hubmerge", "consensus", "consensus", {"k": 2}),),
}


@dataclass
class Run:
    """One measured run of a case on (T+1) checkpoints of one model."""

    case: Case
    cfg: LlamaConfig
    tasks: int
    load: float  # 1-minute load average when the run started
    usage: ChildUsage
    bytes_read: int  # hubmerge: its own count over all passes; mergekit: the inputs, each tensor mapped once
    engine_s: float | None  # hubmerge's own timing (no start-up)

    @property
    def input_bytes(self) -> int:
        return (self.tasks + 1) * self.cfg.nbytes

    @property
    def throughput(self) -> float:
        """Bytes read per wall second, GB/s (the same definition for both tools)."""
        return self.bytes_read / self.usage.wall_s / 1e9


@dataclass
class Agreement:
    """hubmerge's output against mergekit's for one method, over every tensor of the (bf16) outputs."""

    hubmerge: str
    mergekit: str
    cfg: LlamaConfig
    tasks: int
    max_abs: float
    differing: int
    entries: int
    max_change: float  # max |θ_mergekit − θ0|, the scale of the merge


def model_root(cfg: LlamaConfig) -> Path:
    return CACHE / f"llama-{cfg.dtype}-h{cfg.hidden}-l{cfg.layers}"


def model_dirs(cfg: LlamaConfig, tasks: int) -> list[Path]:
    root = model_root(cfg)
    return [root / "base", *(root / f"task{t}" for t in range(tasks))]


def stamp_of(cfg: LlamaConfig, directory: Path, task: int | None) -> tuple[Path, str]:
    """The stamp file of one generated checkpoint (beside it, not in it) and the settings it must hold."""
    settings = json.dumps({**asdict(cfg), "task": task, "generator": GENERATOR_VERSION}, sort_keys=True)
    return directory.with_name(f"{directory.name}.generated.json"), settings


def missing(cfg: LlamaConfig, tasks: int) -> list[tuple[Path, int | None]]:
    """Checkpoints (directory, task) that the cache lacks or holds with other settings."""
    todo = []
    for task, directory in zip([None, *range(tasks)], model_dirs(cfg, tasks), strict=True):
        stamp, settings = stamp_of(cfg, directory, task)
        if not (stamp.is_file() and stamp.read_text() == settings):
            todo.append((directory, task))
    return todo


def generate(cfg: LlamaConfig, tasks: int) -> None:
    """Write the missing checkpoints one by one; the stamp comes last, so an interrupted one is redone."""
    for directory, task in missing(cfg, tasks):
        stamp, settings = stamp_of(cfg, directory, task)
        shutil.rmtree(directory, ignore_errors=True)
        started = time.perf_counter()
        write_model(cfg, directory, task)
        stamp.write_text(settings)
        print(
            f"generated {directory.relative_to(REPO)} ({cfg.nbytes / 1e9:.2f} GB) "
            f"in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
        )


def check_disk(needs: Mapping[LlamaConfig, int]) -> None:
    """Refuse to start when the inputs still to generate plus two outputs at a time do not fit on the disk."""
    todo = sum(cfg.nbytes * len(missing(cfg, tasks)) for cfg, tasks in needs.items())
    total = sum(cfg.nbytes * (tasks + 1) for cfg, tasks in needs.items())
    outputs = 2 * max(cfg.nbytes for cfg in needs)  # mergekit's output waits for hubmerge's
    CACHE.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(CACHE).free
    print(
        f"inputs {total / 1e9:.1f} GB ({todo / 1e9:.1f} GB to generate), "
        f"outputs up to {outputs / 1e9:.1f} GB at a time; {free / 1e9:.1f} GB free",
        file=sys.stderr,
    )
    if todo + outputs > free:
        raise SystemExit(f"not enough free disk in {CACHE}: need {(todo + outputs) / 1e9:.1f} GB")


def ensure_mergekit() -> dict[str, str]:
    """Create the mergekit venv on first use and return the versions it runs with."""
    python = MERGEKIT_VENV / "bin" / "python"
    if not MERGEKIT_YAML.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(MERGEKIT_VENV)], check=True)
        for pin in MERGEKIT_PINS:
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", pin], check=True)
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({p: m.version(p) for p in ('mergekit', 'torch', 'transformers', 'safetensors')}))"
    )
    versions = json.loads(shell(f"{shlex.quote(str(python))} -c {shlex.quote(script)}"))
    if versions["mergekit"] != MERGEKIT_VERSION:
        raise SystemExit(f"{MERGEKIT_VENV} has mergekit {versions['mergekit']}, not {MERGEKIT_VERSION}")
    return versions


def slug(label: str) -> str:
    return label.replace(", ", "-").replace(" ", "-")


class Bench:
    """Runs cases on cached inputs, with the same threads and environment for both tools."""

    def __init__(self, threads: int, hubmerge_args: list[str]) -> None:
        self.threads = threads
        self.hubmerge_args = hubmerge_args
        # both tools size torch's thread pool from these; CUDA hidden so neither can pick a GPU
        self.env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "CUDA_VISIBLE_DEVICES": "",
            "HF_HUB_OFFLINE": "1",
        }
        self.work = CACHE / "runs"
        self.bounds: dict[tuple[int, int], float] = {}  # (layers, T) -> page-cache read bound, GB/s

    def command(self, case: Case, dirs: list[Path], output: Path) -> list[str]:
        """Write the case's recipe or config (JSON, which is YAML) and return the command that runs it."""
        config = self.work / f"{case.tool}-{slug(case.label)}.yaml"
        if case.tool == "mergekit":
            spec: dict[str, object] = {
                "merge_method": case.method,
                "base_model": str(dirs[0]),
                "models": [{"model": str(d), "parameters": dict(case.per_model)} for d in dirs[1:]],
                "parameters": dict(case.parameters),
                "dtype": "float32",  # compute in float32 like hubmerge, write bf16 like the inputs
                "out_dtype": "bfloat16",
            }
            config.write_text(json.dumps(spec, indent=2) + "\n")
            return [
                str(MERGEKIT_YAML),
                str(config),
                str(output),
                "--no-copy-tokenizer",
                "--lazy-unpickle",
                "--num-threads",
                str(self.threads),
                "--quiet",
            ]
        recipe = {
            "version": 1,
            "base": str(dirs[0]),
            "models": [{"source": str(d), "name": d.name} for d in dirs[1:]],
            "method": case.method,
            "parameters": dict(case.parameters),
        }
        config.write_text(json.dumps(recipe, indent=2) + "\n")
        command = [str(HUBMERGE), "run", str(config), "--output", str(output), "--overwrite", "-q"]
        return [*command, "--device", "cpu", *self.hubmerge_args]

    def run(self, case: Case, cfg: LlamaConfig, tasks: int, output: Path) -> Run:
        """Run one case once on warm inputs; its output stays for the comparison."""
        dirs = model_dirs(cfg, tasks)
        files = weight_files(dirs)
        self.work.mkdir(parents=True, exist_ok=True)
        if (cfg.layers, tasks) not in self.bounds:
            self.bounds[cfg.layers, tasks] = page_cache_bound(files)
        shutil.rmtree(output, ignore_errors=True)
        command = self.command(case, dirs, output)
        cat_seconds(files)  # the previous runs may have pushed these inputs out of the page cache
        print("$", shlex.join(command), file=sys.stderr)
        load = os.getloadavg()[0]
        usage = run_child(command, self.work / f"{case.tool}-{slug(case.label)}.time", self.env)
        if case.tool == "hubmerge":
            record = json.loads((output / "hubmerge.json").read_text())
            bytes_read, engine_s = int(record["bytes_read"]), float(record["seconds"])
        else:
            bytes_read, engine_s = (tasks + 1) * cfg.nbytes, None
        return Run(case, cfg, tasks, load, usage, bytes_read, engine_s)

    def method(self, method: str, cfg: LlamaConfig, tasks: int, mergekit: bool) -> Iterator[Run | Agreement]:
        """Every case of a method; each hubmerge output is compared with mergekit's, then both are deleted."""
        reference: tuple[Case, Path] | None = None
        for case in CASES[method]:
            if case.tool == "mergekit" and not mergekit:
                continue
            output = self.work / f"out-{case.tool}-{slug(case.label)}"
            yield self.run(case, cfg, tasks, output)
            if case.tool == "mergekit":
                reference = case, output
                continue
            if reference:
                yield compare(output, reference[1], model_dirs(cfg, 0)[0], case, reference[0], cfg, tasks)
            shutil.rmtree(output)
        if reference:
            shutil.rmtree(reference[1])


def tensor_files(directory: Path, stack: ExitStack) -> dict[str, Any]:
    """Tensor name -> open safetensors handle, over every shard of a directory."""
    handles = {}
    for file in sorted(directory.glob("*.safetensors")):
        handle = stack.enter_context(safe_open(str(file), "pt"))
        handles.update(dict.fromkeys(handle.keys(), handle))
    return handles


def compare(
    ours: Path, theirs: Path, base: Path, case: Case, reference: Case, cfg: LlamaConfig, tasks: int
) -> Agreement:
    """Max |hubmerge − mergekit| over all tensors, one tensor in memory at a time."""
    with ExitStack() as stack:
        a, b, z = (tensor_files(d, stack) for d in (ours, theirs, base))
        if set(a) != set(b):
            raise SystemExit(f"{ours} and {theirs} hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
        max_abs = max_change = 0.0
        differing = entries = 0
        for name in sorted(a):
            x, y = a[name].get_tensor(name).float(), b[name].get_tensor(name).float()
            diff = (x - y).abs()
            max_abs = max(max_abs, float(diff.max()))
            differing += int(torch.count_nonzero(diff))
            entries += diff.numel()
            max_change = max(max_change, float((y - z[name].get_tensor(name).float()).abs().max()))
    return Agreement(case.label, reference.label, cfg, tasks, max_abs, differing, entries, max_change)


def counterpart(run: Run, runs: list[Run]) -> Run | None:
    """mergekit's run of the same method on the same inputs."""
    key = (run.case.method, run.cfg, run.tasks)
    return next(
        (o for o in runs if o.case.tool == "mergekit" and (o.case.method, o.cfg, o.tasks) == key), None
    )


def find(runs: list[Run], tool: str, label: str, cfg: LlamaConfig, tasks: int) -> Run | None:
    return next(
        (r for r in runs if (r.case.tool, r.case.label, r.cfg, r.tasks) == (tool, label, cfg, tasks)), None
    )


def model_label(cfg: LlamaConfig) -> str:
    return f"{cfg.layers} layers, {cfg.params / 1e9:.2f} B"


def runs_table(runs: list[Run], everything: list[Run]) -> str:
    head = (
        "| tool | method | wall s | engine s | CPU s | load | peak RSS MiB | RssAnon MiB | RssFile MiB "
        "| read GB | read GB/s | rchar GB | disk reads GB | mergekit ÷ this |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        u, other = r.usage, counterpart(r, everything)
        engine = f"{r.engine_s:.1f}" if r.engine_s is not None else "–"
        ratio = f"{other.usage.wall_s / u.wall_s:.2f}×" if other and other is not r else "–"
        lines.append(
            f"| {r.case.tool} | {r.case.label} | {u.wall_s:.1f} | {engine} | {u.cpu_s:.1f} | {r.load:.1f} "
            f"| {u.peak_rss_kib / 1024:.0f} | {u.peak_anon_kib / 1024:.0f} | {u.peak_file_kib / 1024:.0f} "
            f"| {r.bytes_read / 1e9:.2f} | {r.throughput:.2f} | {u.rchar / 1e9:.2f} "
            f"| {u.storage_read_bytes / 1e9:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def agreement_table(agreements: list[Agreement]) -> str:
    head = "| model | T | hubmerge | mergekit | max abs diff | differing entries | max abs change vs base |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a in agreements:
        lines.append(
            f"| {model_label(a.cfg)} | {a.tasks} | {a.hubmerge} | {a.mergekit} | {a.max_abs:.3g} "
            f"| {a.differing:,} of {a.entries:,} ({100 * a.differing / a.entries:.3f} %) "
            f"| {a.max_change:.3g} |"
        )
    return "\n".join(lines)


def verdict(name: str, value: float | None, bound: float, at_most: bool, unit: str = "×") -> str:
    if value is None:
        return f"- {name}: not measured"
    met = value <= bound if at_most else value >= bound
    shown = f"{value:.0f}" if value >= 100 else f"{value:.2f}"
    return f"- {name}: {shown}{unit} — **{'met' if met else 'missed'}**"


def targets(runs: list[Run], cfg: LlamaConfig, tasks: tuple[int, ...]) -> list[str]:
    """The issue's targets on the main model; speedups are ratios of whole-process wall times."""

    def wall(tool: str, label: str, t: int) -> float | None:
        run = find(runs, tool, label, cfg, t)
        return run.usage.wall_s if run else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None else None

    lines = []
    for t in tasks:
        ta = wall("hubmerge", "task_arithmetic", t)
        lines.append(
            verdict(
                f"T = {t}: TA ≥ 2× faster than mergekit",
                ratio(wall("mergekit", "task_arithmetic", t), ta),
                2,
                False,
            )
        )
        for trim in ("global", "tensor"):
            hm = wall("hubmerge", f"ties, trim {trim}", t)
            name = f"T = {t}: TIES (trim {trim}) ≥ 10× faster than mergekit's TIES"
            lines.append(verdict(name, ratio(wall("mergekit", "ties", t), hm), 10, False))
        for method in ("consensus", "tall_masks"):
            name = f"T = {t}: {method} within 2× TA's time"
            lines.append(verdict(name, ratio(wall("hubmerge", method, t), ta), 2, True))
    at_eight = [r for r in runs if r.case.tool == "hubmerge" and r.cfg == cfg and r.tasks == 8]
    if cfg.params < 1e9 or not at_eight:
        lines.append(
            f"- peak RSS ≤ 1 GiB, 1 B model, T = 8: not checked (this run's model has "
            f"{cfg.params / 1e9:.2f} B parameters, T = {', '.join(map(str, tasks))})"
        )
    for r in at_eight if cfg.params >= 1e9 else []:
        name = f"T = 8: peak RSS ≤ 1 GiB, hubmerge {r.case.label}"
        lines.append(verdict(name, r.usage.peak_rss_kib / 1024, 1024, True, " MiB"))
    return lines


def scaling_table(points: list[tuple[LlamaConfig, int]], runs: list[Run]) -> str:
    head = (
        "| model | T | inputs GB | hubmerge wall s | hubmerge peak RSS MiB | hubmerge read GB/s "
        "| mergekit wall s | mergekit peak RSS MiB | mergekit ÷ hubmerge |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for cfg, t in points:
        hm = find(runs, "hubmerge", "task_arithmetic", cfg, t)
        mk = find(runs, "mergekit", "task_arithmetic", cfg, t)
        if hm is None:
            continue
        theirs = "– | – | –"
        if mk:
            speedup = mk.usage.wall_s / hm.usage.wall_s
            theirs = f"{mk.usage.wall_s:.1f} | {mk.usage.peak_rss_kib / 1024:.0f} | {speedup:.2f}×"
        lines.append(
            f"| {model_label(cfg)} | {t} | {hm.input_bytes / 1e9:.2f} | {hm.usage.wall_s:.1f} "
            f"| {hm.usage.peak_rss_kib / 1024:.0f} | {hm.throughput:.2f} | {theirs} |"
        )
    return "\n".join(lines)


def plot(
    sizes: list[tuple[LlamaConfig, int]], counts: list[tuple[LlamaConfig, int]], runs: list[Run], path: Path
) -> None:
    """Wall time and peak RSS of Task Arithmetic against model size (top) and T (bottom)."""
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = (
        (sizes, lambda cfg, t: cfg.params / 1e9, f"parameters (B), T = {sizes[0][1] if sizes else '–'}"),
        (
            counts,
            lambda cfg, t: t,
            f"T (fine-tunes), {counts[0][0].params / 1e9:.2f} B parameters" if counts else "T",
        ),
    )
    for row, (points, x_of, xlabel) in enumerate(panels):
        if not points:
            for ax in axes[row]:
                ax.set_axis_off()
            continue
        for tool, style in (("hubmerge", "o-"), ("mergekit", "s--")):
            found = [
                (x_of(cfg, t), r) for cfg, t in points if (r := find(runs, tool, "task_arithmetic", cfg, t))
            ]
            if not found:
                continue
            xs = [x for x, _ in found]
            axes[row][0].plot(xs, [r.usage.wall_s for _, r in found], style, label=tool)
            axes[row][1].plot(xs, [r.usage.peak_rss_kib / 1024 for _, r in found], style, label=tool)
        axes[row][1].axhline(1024, linestyle=":", color="gray", label="1 GiB")
        ticks = sorted({x_of(cfg, t) for cfg, t in points})
        for ax, ylabel in zip(axes[row], ("wall time (s)", "peak RSS (MiB)"), strict=True):
            ax.set_xticks(ticks, [f"{x:.3g}" for x in ticks])  # only the measured sizes / T
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle("Task Arithmetic, bf16 Llama-style checkpoints: hubmerge vs. mergekit 0.1.5")
    fig.savefig(path, dpi=110)


@dataclass
class Results:
    """Everything the report shows."""

    cfg: LlamaConfig
    tasks: tuple[int, ...]
    sizes: list[tuple[LlamaConfig, int]]  # scaling points: (model, T)
    counts: list[tuple[LlamaConfig, int]]
    runs: list[Run]
    agreements: list[Agreement]
    bounds: dict[tuple[int, int], float]
    mergekit: dict[str, str]  # versions in the mergekit venv; empty with --skip-mergekit
    threads: int
    hubmerge_args: list[str]


def setup_lines(results: Results) -> str:
    mk = results.mergekit
    revision = shell(f"git -C {shlex.quote(str(REPO))} describe --always --dirty")
    hubmerge = (
        f"hubmerge {importlib.metadata.version('hubmerge')} (git {revision}), torch {torch.__version__}, "
        f"safetensors {importlib.metadata.version('safetensors')}, in `.venv`"
    )
    theirs = (
        f"mergekit {mk['mergekit']}, torch {mk['torch']}, transformers {mk['transformers']}, safetensors "
        f"{mk['safetensors']}, in `{MERGEKIT_VENV.relative_to(REPO)}` "
        f"(`pip install {MERGEKIT_PINS[0]}`, then `pip install {MERGEKIT_PINS[1]}`)"
        if mk
        else "mergekit: skipped (`--skip-mergekit`)"
    )
    n = results.threads
    return (
        f"- date: {shell('date -u')}\n"
        f"- CPU: {cpu_model()}, `nproc` = {shell('nproc')}\n"
        f"- {hubmerge}\n- {theirs}\n"
        f"- threads: OMP_NUM_THREADS = MKL_NUM_THREADS = {n} for both tools (hubmerge's torch takes its "
        f"thread count from it) and mergekit's `--num-threads {n}` (torch intra- and inter-op threads); "
        f"CUDA_VISIBLE_DEVICES empty, HF_HUB_OFFLINE = 1\n"
        f"- `free -g`:\n\n```\n{shell('free -g')}\n```"
    )


def report(results: Results, command: str, plot_link: str) -> str:
    cfg, runs = results.cfg, results.runs
    extra = f" {shlex.join(results.hubmerge_args)}" if results.hubmerge_args else ""
    sections = []
    for t in results.tasks:
        rows = [r for r in runs if r.cfg == cfg and r.tasks == t]
        bound = results.bounds.get((cfg.layers, t), 0.0)
        sections.append(
            f"### T = {t}: {(t + 1) * cfg.nbytes / 1e9:.2f} GB of inputs, page-cache read bound "
            f"{bound:.2f} GB/s\n\n{runs_table(rows, runs)}"
        )
    scaling = ""
    if results.sizes:
        scaling += f"Model size at T = {results.sizes[0][1]}:\n\n{scaling_table(results.sizes, runs)}\n\n"
    if results.counts:
        label = model_label(results.counts[0][0])
        scaling += f"T on the {label} model:\n\n{scaling_table(results.counts, runs)}\n\n"
    if scaling:
        scaling = f"### Scaling of Task Arithmetic\n\n{scaling}{plot_link}\n\n"
    return f"""## hubmerge vs. mergekit (`benchmarks/vs_mergekit.py`)

{setup_lines(results)}

Command: `{command}`

Model: Llama-style, {cfg.dtype}, {cfg.layers} layers, vocab {cfg.vocab}, hidden {cfg.hidden}, intermediate \
{cfg.intermediate}, untied lm_head: {cfg.params:,} parameters, {cfg.nbytes / 1e9:.2f} GB per checkpoint in \
{len(shard_plan(cfg))} safetensors shards with `model.safetensors.index.json` and a LlamaForCausalLM \
`config.json`; T fine-tunes = base + structured, partly sparse deltas. Every run starts with its inputs \
warmed by a `cat`; outputs are bf16 and deleted after the method's comparison.

- hubmerge: `hubmerge run RECIPE --output OUT --overwrite -q --device cpu{extra}`; parameters: \
task_arithmetic `scaling: 1.0`; ties `density: 0.2, merge: mean` with `trim: global` (default, the paper's \
model-wide threshold per task) and `trim: tensor`; tall_masks `merge: task_arithmetic, lambda: 0.4`; \
consensus `k: 2`; dtype auto (= bf16); float32 arithmetic.
- mergekit: `mergekit-yaml CONFIG OUT --no-copy-tokenizer --lazy-unpickle --num-threads {results.threads} \
--quiet`, CPU. `--lazy-unpickle` only concerns pickled `.bin` checkpoints: mergekit always opens safetensors \
lazily (`safe_open`, memory-mapped, one tensor at a time). Config of the TIES run (Task Arithmetic: \
`merge_method: task_arithmetic`, `weight: 1.0` per model, `normalize: false`):

```yaml
merge_method: ties
base_model: .../base
models:
  - model: .../task0
    parameters: {{weight: 1.0, density: 0.2}}
  # ... one entry per fine-tune
parameters: {{normalize: true, int8_mask: false}}
dtype: float32       # arithmetic in float32, as hubmerge
out_dtype: bfloat16  # written in the inputs' dtype, as hubmerge's dtype: auto
```

{chr(10).join(sections)}

### Agreement of the outputs (hubmerge vs. mergekit, every tensor, as bf16 values)

{agreement_table(results.agreements)}

Task Arithmetic computes the same thing in both tools (τ in float32, summed in task order, added to θ0, \
rounded to bf16), so any difference there is a bug. TIES differs by design: mergekit keeps exactly max(1, \
int(0.2·n)) entries of each tensor's |τ| (argsort: ties at the threshold broken by sort order); hubmerge \
`trim: tensor` keeps |τ| ≥ the (n − int(0.2·n))-th smallest |τ| of the tensor (one more entry, plus every \
tie, the reference implementation's rule; bf16 task vectors have many equal magnitudes), and `trim: global` \
uses one threshold per task over the whole model. Both elect the sign of the float32 sum of the trimmed \
vectors; where that sum is exactly 0, mergekit takes + and hubmerge the model-wide majority sign. mergekit's \
`normalize: true` divides the agreeing entries' weighted sum by their summed weights, with weight 1 the \
disjoint mean that hubmerge's `merge: mean` computes.

### Targets (main model; speedups are ratios of whole-process wall times, start-up included)

{chr(10).join(targets(runs, cfg, results.tasks))}

{scaling}Columns: *wall s* is GNU time's %e (interpreter start-up and imports included); *engine s* is \
hubmerge's own `seconds` in `hubmerge.json`; *CPU s* is user + system time; *load* is the 1-minute load \
average when the run started; *peak RSS* is GNU time's %M (of the largest single process, should \
`--hubmerge-args` start several); *RssAnon* / *RssFile* are peaks of /proc/PID/status sampled every 0.05 s \
and summed over the command's processes (pages of memory-mapped files, such as mergekit's inputs, count as \
RssFile); *read GB* is hubmerge's `bytes_read` (all passes) and, for mergekit, its input tensors once ((T+1) \
× checkpoint: it maps every tensor once, and no per-process counter sees reads through a mapping); *read \
GB/s* is read GB / wall s for both; *rchar* is /proc/PID/io's count of bytes through read()/pread() \
(sampled, so up to 0.05 s short), start-up's Python modules included (about 0.03 GB for hubmerge, 0.15 GB \
for mergekit): hubmerge reads its inputs with pread, so the rest is its read GB, while mergekit's tensor \
reads are page faults on mappings and do not show; *disk reads* is GNU time's %I × 512, the bytes fetched \
from the block device (0 when everything came from the page cache); *mergekit ÷ this* is mergekit's wall \
time for the same method over this row's.
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny validation run (hidden 256, 2 layers, T = 2; a minute or two); prints, never writes docs",
    )
    parser.add_argument("--layers", type=int, help="decoder layers of the main model (full: 17, 1.005 B)")
    parser.add_argument("--tasks", type=int, nargs="+", help="T of the head-to-head runs (full: 4 8)")
    parser.add_argument("--methods", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument(
        "--scale-layers",
        type=int,
        nargs="*",
        help="layer counts of the Task Arithmetic size scaling (full: 2 7 17, at T = 4); empty skips it",
    )
    parser.add_argument(
        "--scale-tasks",
        type=int,
        nargs="*",
        help="T of the Task Arithmetic scaling on the main model (full: 2 4 8); empty skips it",
    )
    parser.add_argument("--skip-mergekit", action="store_true", help="run hubmerge only")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="threads for both tools (default: all cores)"
    )
    parser.add_argument(
        "--hubmerge-args",
        default="",
        help='extra arguments for every `hubmerge run`, e.g. --hubmerge-args="--num-processes 2"',
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--write-docs",
        action="store_true",
        help=f"replace the section in {DOCS.relative_to(REPO)} and write docs/scaling.png",
    )
    args = parser.parse_args()
    if args.write_docs and args.quick:
        parser.error("--quick is a validation run: it prints its report and writes no docs")
    return args


def main() -> None:
    args = parse_args()
    preset = QUICK if args.quick else FULL
    cfg = replace(preset.model, layers=args.layers or preset.model.layers, seed=args.seed)
    tasks = tuple(args.tasks or preset.tasks)
    scale_layers = preset.scale_layers if args.scale_layers is None else args.scale_layers
    scale_tasks = preset.scale_tasks if args.scale_tasks is None else args.scale_tasks
    sizes = [(replace(cfg, layers=n), preset.size_tasks) for n in sorted(set(scale_layers))]
    counts = [(cfg, t) for t in sorted(set(scale_tasks))]
    needs: dict[LlamaConfig, int] = {}  # model -> most fine-tunes any run uses
    for model, t in [*((cfg, t) for t in tasks), *sizes, *counts]:
        needs[model] = max(needs.get(model, 0), t)

    check_disk(needs)
    mergekit = {} if args.skip_mergekit else ensure_mergekit()
    for model, t in needs.items():
        generate(model, t)

    bench = Bench(args.threads, shlex.split(args.hubmerge_args))
    runs: list[Run] = []
    agreements: list[Agreement] = []

    def collect(items: Iterator[Run | Agreement]) -> None:
        for item in items:
            if isinstance(item, Run):
                runs.append(item)
                u = item.usage
                print(
                    f"  {item.case.tool} {item.case.label}, {model_label(item.cfg)}, T = {item.tasks}: "
                    f"{u.wall_s:.1f} s, peak RSS {u.peak_rss_kib / 1024:.0f} MiB",
                    file=sys.stderr,
                )
            else:
                agreements.append(item)

    for t in tasks:
        for method in args.methods:
            collect(bench.method(method, cfg, t, not args.skip_mergekit))
    for model, t in [*sizes, *counts]:
        if not find(runs, "hubmerge", "task_arithmetic", model, t):
            collect(bench.method("task_arithmetic", model, t, not args.skip_mergekit))

    plot_path = REPO / "docs" / "scaling.png" if args.write_docs else CACHE / "scaling.png"
    results = Results(
        cfg,
        tasks,
        sizes,
        counts,
        runs,
        agreements,
        bench.bounds,
        mergekit,
        args.threads,
        bench.hubmerge_args,
    )
    link = ""
    if sizes or counts:
        plot(sizes, counts, runs, plot_path)
        link = "![Task Arithmetic scaling](scaling.png)" if args.write_docs else f"(plot: {plot_path})"
    command = shlex.join([".venv/bin/python", "benchmarks/vs_mergekit.py", *sys.argv[1:]])
    section = report(results, command, link)
    print(section)
    if args.write_docs:
        write_docs(section, BEGIN, END)


if __name__ == "__main__":
    main()
