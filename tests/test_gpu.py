"""The GPU path writes byte for byte what the CPU path writes; reads are pinned; NCCL with one process.

Tests marked `gpu` need a CUDA device (conftest.py skips them without one; `pytest -m gpu` runs only them,
`benchmarks/gpu_check.sh` runs them on a GPU machine). The unmarked tests run the same code on the CPU where
a stand-in exists: a one-process gloo group through the same Accelerate set-up as the one-process NCCL group.

Why byte identity is expected on a GPU: the CPU computes in the fused C kernels, the GPU in torch operations,
but the float operations of the methods are element-wise IEEE float32 operations without contraction (the
methods write α·τ and θ0 + α·τ as separate operations; no FMA), applied in the same task order on both; the
thresholds come from integer radix histograms of the magnitudes' bit patterns (or `kthvalue`, an exact
selection); signs, agreement and kept counts are integer sums; DARE's random drops come from a counter-based
hash of (seed, tensor, task, entry), the same on every device.

The exceptions are the settings whose plan has a per-tensor statistics pass (`not_byte_identical` says why:
DARE's and DELLA's L1 rescale, Model Stock's cosines, SLERP's norms and angle): it sums floats (float64) over
a whole tensor, which a GPU reduces in another order than the CPU, so a sum can differ in its last bit (and
the functions of the sums, sqrt, acos, sin, may come from another library). Where that moves a per-tensor
float32 scalar (Model Stock's t, a rescale factor) across a rounding boundary, every entry computed from it
may differ by an ulp of the operands: on an H200, Model Stock moved 16 of a 32-entry tensor's entries by one
ulp, and an entry near zero, where t·θ_avg and (1 − t)·θ0 cancel, by 128 ulps of itself. So their outputs are
checked to differ by at most MAX_ULPS ulps of each tensor's largest entry, in any number of entries.
"""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from transformers import BertModel

from hubmerge import parse_recipe, run_recipe
from hubmerge.distributed import SINGLE, Group, join, join_launched, leave
from hubmerge.methods import METHODS
from hubmerge.sources import Checkpoint
from tests.test_distributed import files_of
from tests.tiny_models import bert_config, perturb_

TASKS = ["t0", "t1", "t2", "t3"]  # a method takes 3 of them, or as many as it can take
BLOCK_ENTRIES = 1024  # several pieces per tensor (the embeddings hold 99 × 32 entries)
# Differ between two runs of one recipe by design.
VOLATILE_RECORD_KEYS = {"created", "seconds", "device"}
MAX_ULPS = 2  # where a setting with a per-tensor statistics pass differs, by at most this many ulps
# Non-default settings that take other code paths than the defaults (per-tensor trim, `max`, TIES inside TALL).
VARIANTS = {
    "ties_tensor": ("ties", {"trim": "tensor"}),
    "ties_max": ("ties", {"merge": "max"}),
    "tall_ties": ("tall_masks", {"merge": "ties"}),
    "consensus_ties": ("consensus", {"merge": "ties", "k": 1}),
    # DARE without the L1 rescale: no statistics pass left, so byte-identical (its random drops included)
    "dare_ties_plain": ("dare_ties", {"rescale": False}),
}


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def models(request, tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT base and four sparse fine-tunes (transformers directories), stored in the param's dtype."""
    root = tmp_path_factory.mktemp(f"models-{request.param}")
    dtype = getattr(torch, request.param)
    torch.manual_seed(0)
    base = BertModel(bert_config())
    paths = {"base": root / "base"}
    base.to(dtype).save_pretrained(paths["base"])
    for i, name in enumerate(TASKS):
        tuned = BertModel(bert_config())
        tuned.load_state_dict(base.float().state_dict())
        torch.manual_seed(i + 1)
        perturb_(tuned, scale=0.02, keep=0.5)
        paths[name] = root / name
        tuned.to(dtype).save_pretrained(paths[name])
    return paths


def tasks_of(method: str) -> list[str]:
    """3 of TASKS, or as many as `method` takes (SLERP: exactly 2)."""
    spec = METHODS[method]
    low, high = getattr(spec, "min_tasks", 1), getattr(spec, "max_tasks", None) or len(TASKS)
    return TASKS[: min(max(3, low), high)]


def not_byte_identical(method: str, parameters: dict | None = None) -> str | None:
    """Why this setting's GPU output may differ from the CPU's in last bits (None: it may not)."""
    spec = METHODS[method].spec(parameters or {}, tasks_of(method))
    if getattr(spec, "tensor_statistics", None) is None:
        return None
    return "a per-tensor statistics pass sums floats over whole tensors, in another order on a GPU"


def recipe_of(models: dict[str, Path], method: str, parameters: dict | None = None):
    """The recipe of `method` over the tiny models, with the method's defaults unless `parameters`."""
    return parse_recipe(
        {
            "version": 1,
            "base": str(models["base"]),
            "models": [{"source": str(models[t]), "name": t} for t in tasks_of(method)],
            "method": method,
            "parameters": parameters or {},
        }
    )


def merge(recipe, output: Path, device: str | torch.device, group: Group = SINGLE) -> Path:
    return run_recipe(
        recipe,
        output=output,
        device=device,
        group=group,
        block_entries=BLOCK_ENTRIES,
        max_shard_size="100KB",  # several shards
        model_card=False,
    ).output


def record_of(directory: Path) -> dict:
    record = json.loads((directory / "hubmerge.json").read_text())
    return {k: v for k, v in record.items() if k not in VOLATILE_RECORD_KEYS}


def assert_same_output(expected: Path, got: Path) -> None:
    expected_files, got_files = files_of(expected), files_of(got)
    assert any(name.endswith(".safetensors") for name in expected_files)
    assert expected_files.keys() == got_files.keys()
    differing = [name for name in expected_files if expected_files[name] != got_files[name]]
    assert not differing, f"files differ: {differing}"
    assert record_of(got) == record_of(expected)


INTEGER_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def assert_within_ulps(expected: Path, got: Path) -> None:
    """The outputs hold the same files and tensors, whose entries differ by at most MAX_ULPS ulps of the
    tensor's largest entry; the other files are byte-identical."""
    expected_files, got_files = files_of(expected), files_of(got)
    assert expected_files.keys() == got_files.keys()
    for name in expected_files:
        if expected_files[name] == got_files[name]:
            continue
        assert name.endswith(".safetensors"), f"{name} differs"
        a, b = load_file(expected / name), load_file(got / name)
        assert a.keys() == b.keys()
        for key in a:
            x, y = a[key], b[key]
            assert x.dtype == y.dtype and x.shape == y.shape, key
            if x.dtype not in INTEGER_VIEW:
                assert torch.equal(x, y), f"{name}: {key} ({x.dtype}) differs"
                continue
            # an ulp of the largest entry is at most eps times its magnitude
            scale = float(x.float().abs().max()) * torch.finfo(x.dtype).eps
            worst = float((x.float() - y.float()).abs().max())
            assert worst <= MAX_ULPS * scale, f"{name}: {key} differs by {worst / max(scale, 1e-45):.1f} ulps"
    # the files' hashes differ, and the statistics may hold float sums
    stable = {k: v for k, v in record_of(expected).items() if k not in ("files", "stats")}
    assert {k: v for k, v in record_of(got).items() if k not in ("files", "stats")} == stable


def assert_gpu_output(method: str, parameters: dict | None, cpu: Path, cuda: Path) -> None:
    if not_byte_identical(method, parameters):
        assert_within_ulps(cpu, cuda)
    else:
        assert_same_output(cpu, cuda)


# -- CPU against GPU ----------------------------------------------------------------------------------------


def ids(names: list[str], settings: dict[str, tuple[str, dict | None]]) -> list:
    """The names, marked `-within-N-ulps` where `not_byte_identical` (the test then checks that)."""
    return [
        pytest.param(n, id=f"{n}-within-{MAX_ULPS}-ulps") if not_byte_identical(*settings[n]) else n
        for n in names
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ids(list(METHODS), {m: (m, None) for m in METHODS}))
def test_gpu_writes_the_bytes_of_the_cpu(method, models, tmp_path):
    recipe = recipe_of(models, method)
    cpu, cuda = merge(recipe, tmp_path / "cpu", "cpu"), merge(recipe, tmp_path / "cuda", "cuda")
    assert_gpu_output(method, None, cpu, cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ids(list(VARIANTS), VARIANTS))
def test_gpu_writes_the_bytes_of_the_cpu_for_other_settings(variant, models, tmp_path):
    method, parameters = VARIANTS[variant]
    recipe = recipe_of(models, method, parameters)
    cpu, cuda = merge(recipe, tmp_path / "cpu", "cpu"), merge(recipe, tmp_path / "cuda", "cuda")
    assert_gpu_output(method, parameters, cpu, cuda)


def test_the_ulp_comparison_accepts_last_bit_differences_only(models, tmp_path):
    """The comparison the GPU tests use where `not_byte_identical`, on two CPU outputs."""
    recipe = recipe_of(models, "task_arithmetic")
    expected, got = merge(recipe, tmp_path / "a", "cpu"), merge(recipe, tmp_path / "b", "cpu")
    assert_within_ulps(expected, got)
    name = next(n for n in files_of(got) if n.endswith(".safetensors"))
    tensors = load_file(got / name)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 2000)
    bits = tensors[key].view(INTEGER_VIEW[tensors[key].dtype])
    largest = int(tensors[key].abs().argmax())
    # its ulps are at least half an eps of its magnitude: 4·MAX_ULPS of them exceed MAX_ULPS eps
    for ulps, accepted in [(1, True), (MAX_ULPS, True), (4 * MAX_ULPS, False)]:
        changed = bits.clone()
        changed.view(-1)[largest] += ulps
        save_file({**tensors, key: changed.view(tensors[key].dtype)}, got / name)
        if accepted:
            assert_within_ulps(expected, got)
        else:
            with pytest.raises(AssertionError, match="ulps"):
                assert_within_ulps(expected, got)


# -- pinned read-ahead --------------------------------------------------------------------------------------


def record_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool, bool]]:
    """(tensor, pin_memory asked, result pinned) of every read of the pieces the engine streams from now on:
    the reads that say whether to pin (copied tensors, a compressed output's own tensors are read plainly)."""
    reads: list[tuple[str, bool, bool]] = []
    original = Checkpoint.read
    unsaid = object()

    def read(self, key, rows=None, pin_memory=unsaid):
        if pin_memory is unsaid:
            return original(self, key, rows)
        piece = original(self, key, rows, pin_memory=pin_memory)
        reads.append((key, pin_memory, piece.is_pinned()))
        return piece

    monkeypatch.setattr(Checkpoint, "read", read)
    return reads


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ties", "tall_masks"])
def test_pieces_read_for_a_gpu_are_pinned(method, models, tmp_path, monkeypatch):
    reads = record_reads(monkeypatch)
    merge(recipe_of(models, method), tmp_path / "out", "cuda")
    assert reads
    assert all(asked and pinned for _, asked, pinned in reads), [r for r in reads if not all(r[1:])][:5]


@pytest.mark.parametrize("method", ["ties", "tall_masks"])
def test_pieces_read_for_the_cpu_are_not_pinned(method, models, tmp_path, monkeypatch):
    """The CPU side of the test above: the engine asks for pinned memory only for a GPU."""
    reads = record_reads(monkeypatch)
    merge(recipe_of(models, method), tmp_path / "out", "cpu")
    assert reads and not any(asked or pinned for _, asked, pinned in reads)


# -- a process group of one: NCCL on the GPU, gloo on the CPU -----------------------------------------------


@dataclass(frozen=True)
class EveryCollective(Group):
    """A group that runs its collectives even with one process (a Group of one skips them)."""

    @property
    def is_distributed(self) -> bool:
        return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a launcher gives the one process of a group of one (restored after the test)."""
    for name, value in {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        # Accelerate sets torch's thread count on the CPU unless this is set
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }.items():
        monkeypatch.setenv(name, value)


def accelerate_initialized() -> bool:
    state = sys.modules.get("accelerate.state")
    return state is not None and bool(state.PartialState._shared_state)


COLLECTIVES = ("all_reduce", "broadcast_object_list", "all_gather_object", "barrier")


def spy_collectives(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """The names of the torch.distributed collectives called from now on."""
    used: set[str] = set()
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            used.add(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(dist, name, spy)
    return used


def one_process_group_run(recipe, output: Path, device: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    launched_alone(monkeypatch)
    group, torch_device = join_launched(torch.device(device))
    try:
        assert dist.is_initialized() and accelerate_initialized()
        assert (group.rank, group.world_size) == (0, 1)
        assert dist.get_backend() == ("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            assert torch_device == torch.device("cuda", 0) == group.collective_device
            assert torch.cuda.current_device() == 0
        else:
            assert torch_device == group.collective_device == torch.device("cpu")
        used = spy_collectives(monkeypatch)
        every = EveryCollective(group.rank, group.world_size, group.collective_device)
        written = merge(recipe, output, torch_device, every)
        assert used == set(COLLECTIVES), f"collectives not exercised: {set(COLLECTIVES) - used}"
        return written
    finally:
        leave()
        assert not dist.is_initialized() and not accelerate_initialized()


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ties", "tall_masks", "consensus", "magnitude_pruning"])
def test_one_process_nccl_group_writes_the_bytes_of_a_plain_run(method, models, tmp_path, monkeypatch):
    recipe = recipe_of(models, method)
    plain = merge(recipe, tmp_path / "plain", "cuda")
    assert_same_output(plain, one_process_group_run(recipe, tmp_path / "nccl", "cuda", monkeypatch))


@pytest.mark.parametrize("method", list(METHODS))
def test_one_process_gloo_group_writes_the_bytes_of_a_plain_run(method, models, tmp_path, monkeypatch):
    """The CPU stand-in of the NCCL test: Accelerate's set-up, then every collective, with gloo."""
    recipe = recipe_of(models, method)
    plain = merge(recipe, tmp_path / "plain", "cpu")
    assert_same_output(plain, one_process_group_run(recipe, tmp_path / "gloo", "cpu", monkeypatch))


def test_a_process_on_its_own_touches_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join(torch.device("cpu")) == (SINGLE, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert join(torch.device("cpu")) == (SINGLE, torch.device("cpu"))
    assert not dist.is_initialized() and not accelerate_initialized()
    leave()  # what `hubmerge run` does after every run: nothing to leave
    assert not dist.is_initialized() and not accelerate_initialized()
