"""Generated Llama-style checkpoints and child-process measurement, shared by the benchmarks.

A base in sharded safetensors and fine-tunes = base + structured, partly sparse deltas, drawn in float32
from seeded generators and stored in the config's dtype. Every checkpoint is written shard by shard: memory
holds one shard, never a model. Measured commands run under GNU time, which gives their peak RSS;
/proc/PID/status and /proc/PID/io of the command's processes are sampled while it runs.
"""

from __future__ import annotations

import json
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
HUBMERGE = REPO / ".venv" / "bin" / "hubmerge"
TIME = Path("/usr/bin/time")
DOCS = REPO / "docs" / "benchmarks.md"
GENERATOR_VERSION = 2  # bump when the generated weights change, to invalidate cached inputs
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style decoder: multi-head attention, untied lm_head, weights stored as `dtype`."""

    layers: int
    vocab: int = 32000
    hidden: int = 1024
    intermediate: int = 2816
    heads: int = 16
    seed: int = 0
    shard_bytes: int = 400_000_000
    dtype: str = "float32"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, m = self.hidden, self.intermediate
        specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            specs += [(f"{p}self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
            specs += [(f"{p}mlp.gate_proj.weight", (m, h)), (f"{p}mlp.up_proj.weight", (m, h))]
            specs += [(f"{p}mlp.down_proj.weight", (h, m))]
            specs += [(f"{p}input_layernorm.weight", (h,)), (f"{p}post_attention_layernorm.weight", (h,))]
        return [*specs, ("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    @property
    def params(self) -> int:
        return sum(numel(shape) for _, shape in self.tensors())

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    @property
    def nbytes(self) -> int:
        return self.itemsize * self.params


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def generator(seed: int, *parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, *parts)).encode()))


def base_tensor(cfg: LlamaConfig, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1 + 0.05 * torch.randn(shape, generator=generator(cfg.seed, name))
    return 0.02 * torch.randn(shape, generator=generator(cfg.seed, name))


def finetune_tensor(cfg: LlamaConfig, task: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """base + a structured, partly sparse delta: ~3/4 of the layers change; in them every entry moves a
    little (~1e-5) and a quarter of the rows a lot (~1e-3, with a per-task bias); embedding and lm_head change
    in 5 % of their rows only; norms change only for odd tasks. Untouched entries equal the base exactly.
    Stored as bfloat16, most of the ~1e-5 moves round away, so τ is sparser there."""
    tensor = base_tensor(cfg, name, shape)
    gen = generator(cfg.seed, "task", task, name)
    layer = name.split(".")[2] if name.startswith("model.layers.") else name
    if torch.rand((), generator=generator(cfg.seed, "layer", task, layer)) >= 0.75:
        return tensor
    if name.endswith("norm.weight"):
        if task % 2:
            tensor += 1e-3 * torch.randn(shape, generator=gen)
        return tensor
    if shape[0] != cfg.vocab:
        tensor += 1e-5 * torch.randn(shape, generator=gen)
    share = 0.05 if shape[0] == cfg.vocab else 0.25
    rows = torch.randperm(shape[0], generator=gen)[: max(1, int(share * shape[0]))]
    delta = 1e-3 * torch.randn((len(rows), *shape[1:]), generator=gen)
    tensor[rows] += delta + 2e-4 * (1 if task % 2 else -1)
    return tensor


def shard_plan(cfg: LlamaConfig) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in cfg.tensors():
        nbytes = cfg.itemsize * numel(shape)
        if shards[-1] and size + nbytes > cfg.shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_model(cfg: LlamaConfig, directory: Path, task: int | None) -> None:
    """One checkpoint (the base if task is None), shard by shard, with a transformers config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(cfg)
    dtype = DTYPES[cfg.dtype]
    weight_map = {}
    for i, shard in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        # each float32 draw is cast right away, so the shard is held in the stored dtype
        tensors = {
            name: (
                base_tensor(cfg, name, shape) if task is None else finetune_tensor(cfg, task, name, shape)
            ).to(dtype)
            for name, shape in shard
        }
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    write_index_and_config(directory, cfg, weight_map)


def write_index_and_config(directory: Path, cfg: LlamaConfig, weight_map: dict[str, str]) -> None:
    """The shard index and the Llama config.json of a generated checkpoint."""
    index = {"metadata": {"total_size": cfg.nbytes}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads,
        "torch_dtype": cfg.dtype,
        "tie_word_embeddings": False,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def weight_files(dirs: list[Path]) -> list[Path]:
    return [f for d in dirs for f in sorted(d.glob("*.safetensors"))]


def cat_seconds(files: list[Path]) -> float:
    """Seconds of one `cat files > /dev/null` (which also leaves them in the page cache when they fit)."""
    started = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def page_cache_bound(files: list[Path]) -> float:
    """GB/s of `cat files > /dev/null`, the second (warm) of two runs."""
    seconds = 0.0
    for _ in range(2):
        seconds = cat_seconds(files)
    return sum(f.stat().st_size for f in files) / seconds / 1e9


@dataclass
class ChildUsage:
    wall_s: float
    cpu_s: float  # user + system
    peak_rss_kib: int  # GNU time's %M (ru_maxrss of the exec'd process)
    peak_anon_kib: int  # sampled, summed over the command's processes
    peak_file_kib: int  # sampled, summed over the command's processes
    # sampled /proc/PID/io, summed: bytes through read()/pread(); page faults on mmap'd files are not counted
    rchar: int = 0
    storage_read_bytes: int = 0  # GNU time's %I × 512: bytes the block layer fetched, 0 when all was cached


def proc_fields(pid: int, name: str, unit: str = "") -> dict[str, int]:
    """The numeric fields of /proc/PID/<name> ending in `unit`; empty once the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/{name}").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        if value.strip().endswith(unit) and value.split():
            fields[key] = int(value.split()[0])
    return fields


def child_pids(pid: int) -> list[int]:
    """The children of a process, from every one of its threads."""
    pids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids += [int(c) for c in children.read_text().split()]
        except OSError:  # the thread or process just ended
            continue
    return pids


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (several when a command starts worker processes)."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += child_pids(tree[-1])
    return tree


def run_child(command: list[str], stats: Path, env: dict[str, str] | None = None) -> ChildUsage:
    """Run a command under GNU time, sampling the resident memory and I/O counters of the command itself.

    Peak RSS comes from GNU time rather than from wait4 on our own child: a child's ru_maxrss also counts the
    parent's resident memory at fork, and this process has just held model shards. GNU time reports the
    largest single process; the sampled values are sums over the command's process tree."""
    if not TIME.is_file():
        raise SystemExit(f"{TIME} not found: apt-get install -y time")
    proc = subprocess.Popen(
        [str(TIME), "-f", "%M %e %U %S %I", "-o", str(stats), *command], stdout=subprocess.DEVNULL, env=env
    )
    anon = file = rchar = 0
    while proc.poll() is None:
        tree = [p for child in child_pids(proc.pid) for p in process_tree(child)]
        status = [proc_fields(p, "status", "kB") for p in tree]
        anon = max(anon, sum(f.get("RssAnon", 0) for f in status))
        file = max(file, sum(f.get("RssFile", 0) for f in status))
        rchar = max(rchar, sum(proc_fields(p, "io").get("rchar", 0) for p in tree))
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed with exit code {proc.returncode}")
    rss, wall, user, system, blocks = stats.read_text().split()[-5:]
    return ChildUsage(
        float(wall), float(user) + float(system), int(rss), anon, file, rchar, 512 * int(blocks)
    )


def shell(command: str) -> str:
    return subprocess.run(command, shell=True, capture_output=True, text=True, check=True).stdout.rstrip()


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' when it has none)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if "model name" in line:
            return line.split(":", 1)[1].strip()
    return ""


def write_docs(section: str, begin: str, end: str, docs: Path = DOCS) -> None:
    """Replace the text between the begin and end markers in `docs` (append it if missing); the other
    benchmarks' sections stay as they are."""
    text = docs.read_text() if docs.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{section.rstrip()}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)
