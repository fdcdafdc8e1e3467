# .venv/bin/python benchmarks/serving.py --write-docs   (16-layer 271 M-parameter Llama-style model, T = 4,
#                                                         stored as float32 and as bfloat16)
"""Serving T tasks from one compressed artifact: `load_model` against `from_pretrained`, and `set_task`.

Each setting (`--dtypes`, default float32 and bfloat16) has its own base and fine-tunes stored in that dtype and
its own artifact with τ_MTL in it (`tau_dtype`), so loading and switching read and write that dtype's bytes;
the report has one row per setting in each table.

1. Loading one task. Peak memory of `CompressedMerge.load_model(task)` (built on the meta device, filled tensor
   by tensor from the artifact) against `AutoModelForCausalLM.from_pretrained` of the same task materialized
   with `save_task` (outside the measurement), same dtype, each in a fresh process under GNU time (as
   `memory.py` measures); beside them the model's own parameter bytes and a process that only imports.
   Both processes save the logits of one fixed input, which must be bit-identical (torch.equal).
2. Switching. `merge.switchable()`: resident bytes (θ0 + τ_MTL + T·P/8 packed masks + task-private tensors)
   against T loaded models, and the time of `set_task` (median over switches between different tasks) against a
   plain memory copy of the same bytes into the same parameters (`p.copy_(src)` for every merged parameter),
   measured alternately in the same process. Afterwards every parameter of the switched model must equal the
   materialized task's tensors, and its logits the loaded model's.

Inputs are generated once (seeded, cached under .cache/bench/serving/): a Llama-style base and T fine-tunes
(`synthetic.py`: base + structured, partly sparse deltas), a `tall_masks` artifact made from them
(Task Arithmetic τ_MTL, λ = 0.4, `tau_dtype` = the setting's dtype) and one task materialized with
`save_task`; a cached artifact is remade when hubmerge's version or the artifact format version changes.
`--device cuda` runs the loads and the switching on a GPU (peak RSS is then host memory; CUDA peak allocation
is reported too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.synthetic import (
    DOCS,
    DTYPES,
    GENERATOR_VERSION,
    REPO,
    ChildUsage,
    LlamaConfig,
    cpu_model,
    run_child,
    shard_plan,
    shell,
    weight_files,
    write_docs,
    write_model,
)

BEGIN, END = "<!-- serving: begin -->", "<!-- serving: end -->"
MIB = 1 << 20
LAMBDA = 0.4
INPUT_TOKENS = 32
MODES = ("imports", "load_model", "from_pretrained")


@dataclass(frozen=True)
class ServingConfig(LlamaConfig):
    """A Llama-style decoder, its T fine-tunes and the tall_masks artifact made from them."""

    tasks: int = 4
    tau_dtype: str = "float32"

    @property
    def root(self) -> Path:
        name = f"llama-{self.dtype}-l{self.layers}-t{self.tasks}-s{self.seed}"
        return REPO / ".cache" / "bench" / "serving" / name

    def model_dirs(self) -> list[Path]:
        return [self.root / "base", *(self.root / f"task{t}" for t in range(self.tasks))]

    @property
    def artifact(self) -> Path:
        return self.root / f"tall-tau-{self.tau_dtype}"

    def task_dir(self, task: str) -> Path:
        return self.root / f"materialized-tau-{self.tau_dtype}-{task}"


def cached(stamp: Path, settings: dict[str, Any]) -> bool:
    return stamp.is_file() and stamp.read_text() == json.dumps(settings, sort_keys=True)


def ensure_models(cfg: ServingConfig) -> list[Path]:
    """Generate the base and the fine-tunes unless the cache holds them with the same settings."""
    dirs = cfg.model_dirs()
    settings = {**asdict(cfg), "tau_dtype": None, "generator": GENERATOR_VERSION}
    stamp = cfg.root / "settings.json"
    if cached(stamp, settings):
        return dirs
    shutil.rmtree(cfg.root, ignore_errors=True)
    started = time.perf_counter()
    for task, directory in zip([None, *range(cfg.tasks)], dirs, strict=True):
        write_model(cfg, directory, task)
    stamp.write_text(json.dumps(settings, sort_keys=True))
    print(f"generated {cfg.root} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return dirs


def artifact_settings(cfg: ServingConfig, dirs: list[Path]) -> dict[str, Any]:
    from hubmerge import __version__
    from hubmerge.artifacts import FORMAT_VERSION

    recipe = {
        "version": 1,
        "base": str(dirs[0]),
        "models": [{"source": str(d), "name": d.name} for d in dirs[1:]],
        "method": "tall_masks",
        "parameters": {"merge": "task_arithmetic", "lambda": LAMBDA},
        "tau_dtype": cfg.tau_dtype,
    }
    return {"recipe": recipe, "format_version": FORMAT_VERSION, "hubmerge": __version__}


def ensure_artifact(cfg: ServingConfig, dirs: list[Path], fresh: bool) -> float | None:
    """Make the tall_masks artifact (seconds taken; None when it was cached)."""
    from hubmerge import parse_recipe, run_recipe

    settings = artifact_settings(cfg, dirs)
    stamp = cfg.artifact.with_suffix(".json")
    if not fresh and cached(stamp, settings) and (cfg.artifact / "hubmerge.json").is_file():
        return None
    stamp.unlink(missing_ok=True)
    print(f"making the tall_masks artifact {cfg.artifact}", file=sys.stderr)
    started = time.perf_counter()
    run_recipe(parse_recipe(settings["recipe"]), output=cfg.artifact, overwrite=True, device="cpu")
    seconds = time.perf_counter() - started
    stamp.write_text(json.dumps(settings, sort_keys=True))
    return seconds


def ensure_task_dir(cfg: ServingConfig, task: str, fresh: bool) -> float | None:
    """Materialize `task` with `save_task` (seconds taken; None when it was cached)."""
    from hubmerge import CompressedMerge

    target = cfg.task_dir(task)
    stamp = target.with_suffix(".json")
    settings = {"artifact": json.loads(cfg.artifact.with_suffix(".json").read_text()), "task": task}
    if not fresh and cached(stamp, settings) and target.is_dir():
        return None
    stamp.unlink(missing_ok=True)
    print(f"materializing {task} into {target}", file=sys.stderr)
    started = time.perf_counter()
    CompressedMerge.from_pretrained(cfg.artifact).save_task(task, target, overwrite=True)
    seconds = time.perf_counter() - started
    stamp.write_text(json.dumps(settings, sort_keys=True))
    return seconds


def dir_bytes(directory: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in directory.rglob(pattern) if f.is_file())


# -- measured processes -----------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def mapped_file(tensor: torch.Tensor | None) -> str | None:
    """The file a CPU tensor's memory maps (/proc/self/maps), or None for anonymous memory."""
    if tensor is None or tensor.device.type != "cpu":
        return None
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end:
            path = fields[5].strip() if len(fields) > 5 else ""
            return path if path.startswith("/") else None
    return None


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fixed_input(vocab: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(vocab, (1, INPUT_TOKENS), generator=gen).to(device)


@torch.no_grad()
def logits_of(model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    return model(fixed_input(model.config.vocab_size, device)).logits.float().cpu()


def cuda_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def child_load(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One of MODES: import only, `load_model`, or `from_pretrained` of the materialized task."""
    import accelerate  # noqa: F401  (both paths import it; the baseline should hold it too)
    import transformers

    from hubmerge import CompressedMerge
    from hubmerge import serving as _serving  # noqa: F401

    result: dict[str, Any] = {"threads": torch.get_num_threads()}
    if args.child == "imports":
        result["hwm_kib"] = proc_status_kib("VmHWM")
        return result
    started = time.perf_counter()
    if args.child == "load_model":
        merge = CompressedMerge.from_pretrained(args.artifact)
        model = merge.load_model(args.task, device=device, dtype=args.dtype)
    else:
        extra = {} if device.type == "cpu" else {"device_map": str(device)}
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.task_dir, dtype=DTYPES[args.dtype], **extra
        ).eval()
    sync(device)
    result.update(
        seconds=time.perf_counter() - started,
        hwm_kib=proc_status_kib("VmHWM"),  # peak RSS up to here: the load alone, before any forward pass
        model_bytes=model_bytes(model),
        cuda_peak=cuda_peak(device),
        cls=type(model).__name__,
        dtypes=sorted({str(p.dtype) for p in model.parameters()}),
    )
    torch.save(logits_of(model, device), args.logits)
    return result


def switch_sequence(tasks: list[str], count: int) -> list[str]:
    """`count` switches, each to a task other than the current one, visiting all of them in turn."""
    order = tasks[1:] + tasks[:1] if len(tasks) > 1 else tasks
    return [order[i % len(order)] for i in range(count)]


def child_switch(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from safetensors import safe_open

    from hubmerge import CompressedMerge

    merge = CompressedMerge.from_pretrained(args.artifact)
    started = time.perf_counter()
    model = merge.switchable(device=device, dtype=args.dtype)
    sync(device)
    build_s = time.perf_counter() - started
    hwm = proc_status_kib("VmHWM")
    switcher = model.task_switcher
    resident = switcher.resident_bytes()
    private = {
        t: sum(v.numel() * v.element_size() for v in merge.private_tensors(t).values()) for t in merge.tasks
    }
    params = model.state_dict(keep_vars=True)
    missing = [k for k in switcher.keys if k not in params]
    if missing:
        raise SystemExit(f"merged tensor {missing[0]!r} is not a parameter name of {type(model).__name__}")
    targets = [params[k].data for k in switcher.keys]
    written = sum(t.numel() * t.element_size() for t in targets)
    # the copy's sources: same-size buffers; θ0 itself where the resident θ0 has the parameter's dtype
    sources = []
    for key, target in zip(switcher.keys, targets, strict=True):
        theta0 = switcher.theta0[key]
        if theta0.dtype == target.dtype:
            sources.append(theta0.view(target.shape))
        else:
            sources.append(target.clone())

    def copy_all() -> None:
        for target, source in zip(targets, sources, strict=True):
            target.copy_(source)

    sequence = switch_sequence(merge.tasks, args.switches)
    timings = []
    threads = args.switch_threads if device.type == "cpu" else [torch.get_num_threads()]
    for count in threads or [torch.get_num_threads()]:
        torch.set_num_threads(count)
        switches, copies, load = [], [], os.getloadavg()[0]
        for i, task in enumerate([*sequence[:1], *sequence]):  # the first switch and copy are warm-up
            sync(device)
            started = time.perf_counter()
            model.set_task(task)
            sync(device)
            switch_s = time.perf_counter() - started
            started = time.perf_counter()
            copy_all()
            sync(device)
            copy_s = time.perf_counter() - started
            if i:
                switches.append(switch_s)
                copies.append(copy_s)
        timings.append({"threads": count, "switch_s": switches, "copy_s": copies, "load": load})
    torch.set_num_threads(threads[0] if threads else torch.get_num_threads())
    model.set_task(merge.tasks[0] if args.task != merge.tasks[0] else merge.tasks[-1])
    model.set_task(args.task)  # back to the measured task, from another one
    # every parameter of the switched model against the materialized task's tensors
    mismatched = []
    names = set(params)
    for file in sorted(Path(args.task_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                names.discard(key)
                if not torch.equal(params[key].detach().cpu(), f.get_tensor(key).to(params[key].dtype)):
                    mismatched.append(key)
    loaded = torch.load(args.logits)
    logits = logits_of(model, device)
    return {
        "threads": torch.get_num_threads(),
        "build_s": build_s,
        "hwm_kib": hwm,
        "cuda_peak": cuda_peak(device),
        "resident": resident,
        "private": private,
        "model_bytes": model_bytes(model),
        "written_bytes": written,
        "merged_tensors": len(targets),
        "copy_from_theta0": all(
            s.dtype == t.dtype and s.data_ptr() != t.data_ptr() for s, t in zip(sources, targets, strict=True)
        ),
        "sequence": sequence,
        "timings": timings,
        "tau_mapped": mapped_file(next(iter(switcher.tau.values()), None)),
        "theta0_mapped": mapped_file(next(iter(switcher.theta0.values()), None)),
        "params_checked": len(params) - len(names),
        "params_total": len(params),
        "params_mismatched": mismatched,
        "logits_equal": torch.equal(logits, loaded),
        "logits_max_diff": (logits - loaded).abs().max().item(),
    }


def child_main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = child_switch(args, device) if args.child == "switch" else child_load(args, device)
    Path(args.result).write_text(json.dumps(result, indent=2) + "\n")


# -- the parent ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    usage: ChildUsage
    result: dict[str, Any]
    load: float  # 1-minute load average when the process started


def measure(
    args: argparse.Namespace, cfg: ServingConfig, mode: str, task: str, extra: list[str] | None = None
) -> Run:
    work = cfg.root / "runs"
    work.mkdir(exist_ok=True)
    result = work / f"{mode}.json"
    result.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        mode,
        "--artifact",
        str(cfg.artifact),
        "--task",
        task,
        "--task-dir",
        str(cfg.task_dir(task)),
        "--dtype",
        cfg.dtype,
        "--device",
        args.device,
        "--logits",
        str(work / f"logits-{mode if mode != 'switch' else 'load_model'}.pt"),
        "--result",
        str(result),
        *(["--threads", str(args.threads)] if args.threads else []),
        *(extra or []),
    ]
    print(f"$ ... --child {mode}", file=sys.stderr)
    load = os.getloadavg()[0]
    usage = run_child(command, work / f"{mode}.time")
    return Run(usage, json.loads(result.read_text()), load)


@dataclass
class Setting:
    """One stored dtype: its inputs, the three load processes and the switching process."""

    cfg: ServingConfig
    runs: dict[str, Run]
    switch: Run
    made: dict[str, float | None]

    @property
    def params(self) -> int:
        return self.runs["load_model"].result["model_bytes"]

    def logits_identical(self) -> bool:
        work = self.cfg.root / "runs"
        return torch.equal(
            torch.load(work / "logits-load_model.pt"), torch.load(work / "logits-from_pretrained.pt")
        )

    def over_imports(self, mode: str) -> int:
        """Peak RSS of `mode`'s process above the imports-only process's."""
        return (self.runs[mode].usage.peak_rss_kib - self.runs["imports"].usage.peak_rss_kib) * 1024

    def ratios(self) -> list[float]:
        timings = self.switch.result["timings"]
        return [statistics.median(r["switch_s"]) / statistics.median(r["copy_s"]) for r in timings]


def mib(n: float) -> str:
    return f"{n / MIB:,.0f}"


def machine(args: argparse.Namespace, threads: int) -> str:
    cpu = cpu_model() or platform.processor()
    lines = [
        f"- date: {shell('date -u')}",
        f"- CPU: {cpu}, `nproc` = {shell('nproc')}, torch threads = {threads}, "
        f"OMP_NUM_THREADS = {os.environ.get('OMP_NUM_THREADS', 'unset')}",
        f"- device: {args.device}"
        + (
            f" ({torch.cuda.get_device_name(torch.device(args.device))})"
            if args.device.startswith("cuda")
            else ""
        ),
        f"- torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"accelerate {__import__('accelerate').__version__}, Python {platform.python_version()}",
    ]
    return "\n".join(lines)


def load_table(settings: list[Setting]) -> str:
    head = (
        "| weights | process | load s | peak RSS MiB | peak RSS − imports MiB | ÷ model bytes | RSS after load MiB "
        "| RssAnon MiB | RssFile MiB | load |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    labels = {
        "imports": "imports only (torch, transformers, accelerate, hubmerge)",
        "load_model": "`merge.load_model(task)`",
        "from_pretrained": "`AutoModelForCausalLM.from_pretrained(materialized dir)`",
    }
    for setting in settings:
        for mode, run in setting.runs.items():
            u, r = run.usage, run.result
            measured = mode != "imports"
            over = setting.over_imports(mode)
            seconds = f"{r['seconds']:.1f}" if measured else ""
            ratio = f"{over / setting.params:.2f}" if measured else ""
            lines.append(
                f"| {setting.cfg.dtype} | {labels[mode]} | {seconds} "
                f"| {mib(u.peak_rss_kib * 1024)} | {mib(over) if measured else ''} "
                f"| {ratio} | {mib(r['hwm_kib'] * 1024)} "
                f"| {u.peak_anon_kib / 1024:,.0f} | {u.peak_file_kib / 1024:,.0f} | {run.load:.1f} |"
            )
    return "\n".join(lines)


def resident_table(settings: list[Setting]) -> str:
    t = settings[0].cfg.tasks
    head = "| resident part | " + " | ".join(f"{s.cfg.dtype} MiB" for s in settings) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def row(label: str, values: list[int], bold: bool = False) -> None:
        cells = [f"**{mib(v)}**" if bold else mib(v) for v in values]
        lines.append(f"| {f'**{label}**' if bold else label} | " + " | ".join(cells) + " |")

    parts = [s.switch.result["resident"] for s in settings]
    private = [sum(s.switch.result["private"].values()) for s in settings]
    totals = [sum(p.values()) + q for p, q in zip(parts, private, strict=True)]
    served = [s.switch.result["model_bytes"] for s in settings]
    row("θ0 (merged tensors of the base)", [p["theta0"] for p in parts])
    row("τ_MTL", [p.get("tau_mtl", p.get("values", 0)) for p in parts])
    row("packed masks, T·P/8", [p["masks"] for p in parts])
    row("task-private tensors (heads etc.)", private)
    row("total resident", totals, bold=True)
    row("the served model itself", served)
    row("resident + served model", [a + b for a, b in zip(totals, served, strict=True)], bold=True)
    row(f"T = {t} loaded models", [t * s.params for s in settings])
    return "\n".join(lines)


def switch_table(settings: list[Setting]) -> str:
    head = (
        "| weights | torch threads | load | `set_task` median s (min–max) | GB/s written "
        "| plain copy median s (min–max) | GB/s written | switch ÷ copy |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for setting in settings:
        s = setting.switch.result
        written = s["written_bytes"]
        for r in s["timings"]:
            switch, copy = statistics.median(r["switch_s"]), statistics.median(r["copy_s"])
            lines.append(
                f"| {setting.cfg.dtype} | {r['threads']} | {r['load']:.1f} "
                f"| {switch:.3f} ({min(r['switch_s']):.3f}–{max(r['switch_s']):.3f}) "
                f"| {written / switch / 1e9:.2f} | {copy:.3f} ({min(r['copy_s']):.3f}–{max(r['copy_s']):.3f}) "
                f"| {written / copy / 1e9:.2f} | **{switch / copy:.2f}** |"
            )
    return "\n".join(lines)


def setting_inputs(setting: Setting) -> str:
    cfg, s = setting.cfg, setting.switch.result
    artifact_bytes = dir_bytes(cfg.artifact, "*.safetensors")
    vector_bytes = sum(f.stat().st_size for f in cfg.artifact.glob("tau_mtl*.safetensors"))
    built = ", ".join(
        f"{what} {sec:.0f} s" if sec is not None else f"{what} cached" for what, sec in setting.made.items()
    )
    return (
        f"- **{cfg.dtype}**: base and fine-tunes stored as {cfg.dtype}, {cfg.nbytes / 1e9:.2f} GB per "
        f"checkpoint in {len(shard_plan(cfg))} safetensors shards, loaded as {cfg.dtype}. Artifact: τ_MTL "
        f"stored as {cfg.tau_dtype}, {s['merged_tensors']} merged tensors (all of the model's), "
        f"{artifact_bytes / 1e9:.2f} GB of safetensors (τ_MTL {vector_bytes / 1e9:.2f} GB, masks "
        f"{(artifact_bytes - vector_bytes) / 1e6:.0f} MB) against {cfg.tasks * cfg.nbytes / 1e9:.2f} GB for "
        f"the {cfg.tasks} fine-tunes. Inputs: {built}."
    )


def load_summary(args: argparse.Namespace, setting: Setting) -> str:
    load, auto = setting.runs["load_model"].result, setting.runs["from_pretrained"].result
    params = setting.params
    load_over, auto_over = setting.over_imports("load_model"), setting.over_imports("from_pretrained")
    verdict = "bit-identical" if setting.logits_identical() else "NOT identical"
    device_note = (
        f" CUDA peak allocation: `load_model` {mib(load['cuda_peak'])} MiB, `from_pretrained` "
        f"{mib(auto['cuda_peak'])} MiB, `switchable` {mib(setting.switch.result['cuda_peak'])} MiB."
        if args.device.startswith("cuda")
        else ""
    )
    return (
        f"- **{setting.cfg.dtype}**: the model's own parameter bytes are **{mib(params)} MiB** ({params:,} B, "
        f"{load['cls']}, {', '.join(load['dtypes'])}). Logits of a fixed {INPUT_TOKENS}-token input from the "
        f"two models: **{verdict}** (`torch.equal`). `load_model` peaks at the start-up footprint + "
        f"{mib(load_over)} MiB, i.e. one model + {mib(load_over - params)} MiB of pieces and bookkeeping; "
        f"`from_pretrained`: start-up + {mib(auto_over)} MiB (`load_model` − `from_pretrained`: "
        f"{mib(load_over - auto_over)} MiB).{device_note}"
    )


def switch_summary(setting: Setting) -> str:
    s, usage = setting.switch.result, setting.switch.usage
    tau_where = (
        f"a memory map of `{Path(s['tau_mapped']).name}` (file-backed pages, counted in RssFile)"
        if s["tau_mapped"]
        else "anonymous memory (read, not mapped)"
    )
    return (
        f"- **{setting.cfg.dtype}**: `switchable()` took {s['build_s']:.1f} s; its process's RSS peaked at "
        f"{mib(s['hwm_kib'] * 1024)} MiB right after and at {mib(usage.peak_rss_kib * 1024)} MiB over the "
        f"whole run (RssAnon {usage.peak_anon_kib / 1024:,.0f} MiB, RssFile {usage.peak_file_kib / 1024:,.0f} "
        f"MiB; start-up and the checks below included). The resident τ_MTL is {tau_where}; θ0 is "
        f"{'a memory map' if s['theta0_mapped'] else 'anonymous memory'}."
    )


def switch_verdict(args: argparse.Namespace, setting: Setting) -> str:
    s = setting.switch.result
    ratios = setting.ratios()
    goal = "met" if max(ratios) <= 2 else ("met with some thread counts" if min(ratios) <= 2 else "missed")
    ratio_text = ", ".join(
        f"{x:.2f}× {'the copy ' if i == 0 else ''}with {r['threads']} torch thread{'s' if r['threads'] > 1 else ''}"
        for i, (x, r) in enumerate(zip(ratios, s["timings"], strict=True))
    )
    mismatched = s["params_mismatched"]
    differing = f" ({', '.join(mismatched[:3])})" if mismatched else ""
    switched_logits = "bit-identical to" if s["logits_equal"] else "DIFFERENT from"
    sources = "θ0 itself" if s["copy_from_theta0"] else "same-size buffers"
    return (
        f"- **{setting.cfg.dtype}**: **a switch costs {ratio_text}** (goal ≤ 2×: {goal}); copy sources: "
        f"{sources}. Back on `{args.task}` after the switches: {s['params_checked']} of {s['params_total']} "
        f"parameters compared with the materialized task's tensors, {len(mismatched)} differ{differing}; logits "
        f"{switched_logits} `load_model`'s (max |Δ| {s['logits_max_diff']:.3g})."
    )


def report(args: argparse.Namespace, settings: list[Setting], command: str) -> str:
    cfg, s = settings[0].cfg, settings[0].switch.result
    t = cfg.tasks
    sequence = s["sequence"]
    dtypes = " and ".join(x.cfg.dtype for x in settings)
    newline = "\n"
    return f"""## Serving T tasks from one artifact (`benchmarks/serving.py`)

{machine(args, s["threads"])}

Command: `{command}`

Model: Llama-style `LlamaForCausalLM`, {cfg.layers} layers, vocab {cfg.vocab}, hidden {cfg.hidden}, \
intermediate {cfg.intermediate}, untied lm_head: {cfg.params:,} parameters; T = {t} synthetic fine-tunes \
(`synthetic.py`: base + structured, partly sparse deltas). Artifact: `tall_masks` (τ_MTL = Task Arithmetic, \
λ = {LAMBDA}). Settings ({dtypes}), each with its own generated base, fine-tunes (same seed) and artifact:

{newline.join(setting_inputs(x) for x in settings)}

Task measured: `{args.task}`, materialized beforehand with `merge.save_task` (not measured). Every measured step \
ran in a fresh process, inputs in the page cache.

### Loading one task: `load_model` against `from_pretrained` of the materialized task

{load_table(settings)}

{newline.join(load_summary(args, x) for x in settings)}

Columns: *peak RSS* is `ru_maxrss` of the process (GNU time's %M), the whole run including the forward pass of \
the logits check; *RSS after load* is VmHWM read right after the model was ready (the load alone); *RssAnon* and \
*RssFile* are peaks of /proc/PID/status sampled every 0.05 s (anonymous memory vs. file-backed pages such as \
mapped libraries or mmap'd safetensors); *÷ model bytes* is (peak RSS − imports) / the model's parameter bytes; \
*load* is the 1-minute load average when the process started (other processes slow wall times, not memory).

### Switching: one resident copy for {t} tasks (`merge.switchable()`, `set_task`)

{resident_table(settings)}

{newline.join(switch_summary(x) for x in settings)}

{switch_table(settings)}

Each row: {len(sequence)} switches ({" → ".join(sequence[:8])}{" → …" if len(sequence) > 8 else ""}), \
each followed by one copy, alternately in the same process after one warm-up of each; *load* is the 1-minute \
load average when the row started ({shell("nproc")} cores; other work on the machine slows both alike). The \
copy is `p.copy_(src)` for every merged parameter, its sources the resident θ0 tensors where they have the \
parameter's dtype (else same-size buffers), so it reads and writes the bytes `set_task` writes.

{newline.join(switch_verdict(args, x) for x in settings)}
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16: 271 M params)")
    parser.add_argument("--tasks", type=int, default=4, help="number of fine-tunes T")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        choices=list(DTYPES),
        default=list(DTYPES),
        help="settings: the dtype the base and fine-tunes are stored and loaded in, one run each",
    )
    parser.add_argument(
        "--tau-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="τ_MTL's dtype in every artifact (default: each setting's dtype)",
    )
    parser.add_argument("--task", help="the task loaded and checked (default: the second)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--threads", type=int, help="torch threads in the measured processes (default: torch's)"
    )
    parser.add_argument("--switches", type=int, default=12, help="timed switches (and as many copies)")
    parser.add_argument(
        "--switch-threads",
        type=int,
        nargs="*",
        help="torch thread counts to time switching with, in the same process (default: the torch default, then 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="remake the artifacts and the materialized task")
    parser.add_argument(
        "--write-docs", action="store_true", help=f"replace the section in {DOCS.relative_to(REPO)}"
    )
    # the measured child processes
    parser.add_argument("--child", choices=[*MODES, "switch"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=list(DTYPES), help=argparse.SUPPRESS)
    for name in ("--artifact", "--task-dir", "--logits", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    return parser.parse_args()


def run_setting(args: argparse.Namespace, dtype: str) -> Setting:
    """Inputs of one stored dtype (generated or reused), then its measured processes."""
    cfg = ServingConfig(
        layers=args.layers, tasks=args.tasks, seed=args.seed, dtype=dtype, tau_dtype=args.tau_dtype or dtype
    )
    dirs = ensure_models(cfg)
    made = {"artifact": ensure_artifact(cfg, dirs, args.fresh)}
    from hubmerge import CompressedMerge

    tasks = CompressedMerge.from_pretrained(cfg.artifact).tasks
    args.task = args.task or tasks[min(1, len(tasks) - 1)]
    made["materialized task"] = ensure_task_dir(cfg, args.task, args.fresh)
    # warm the page cache: the base, the artifact and the materialized task
    for f in weight_files([dirs[0], cfg.artifact, cfg.artifact / "masks", cfg.task_dir(args.task)]):
        with f.open("rb") as handle:
            while handle.read(64 << 20):
                pass
    runs = {mode: measure(args, cfg, mode, args.task) for mode in MODES}
    threads = ["--switch-threads", *map(str, args.switch_threads)]
    switch = measure(args, cfg, "switch", args.task, ["--switches", str(args.switches), *threads])
    return Setting(cfg, runs, switch, made)


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    command = " ".join([".venv/bin/python", "benchmarks/serving.py", *sys.argv[1:]])
    if args.switch_threads is None:
        default = args.threads or torch.get_num_threads()
        args.switch_threads = [default, 1] if default > 1 else [default]
    started = time.perf_counter()
    settings = [run_setting(args, dtype) for dtype in dict.fromkeys(args.dtypes)]
    print(f"all settings in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    section = report(args, settings, command)
    print(section)
    if args.write_docs:
        write_docs(section, BEGIN, END)


if __name__ == "__main__":
    main()
