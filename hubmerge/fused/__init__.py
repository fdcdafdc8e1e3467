"""Fused CPU kernels: one loop over the stored input pieces for what the tensor functions of
`hubmerge.methods` compute in several passes over float32 temporaries, with the same bits.

`kernels.c` is compiled on first use with the system C compiler (`$CC`, else `cc`) into a cache directory
(`$HUBMERGE_CACHE`, else `~/.cache/hubmerge`) and loaded with ctypes; the kernels release the GIL, so a piece is
split across `torch.get_num_threads()` threads. Where no compiler works, or `HUBMERGE_FUSED=0`, `library()` is
None and the engine computes with the tensor functions, as on a GPU. Inputs must be contiguous CPU tensors
of float32, bfloat16 or float16 (`supports`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# -ffp-contract=off: a fused multiply-add would round differently from torch's separate mul and add
FLAGS = ["-O3", "-march=native", "-std=c11", "-ffp-contract=off", "-fno-trapping-math", "-fPIC", "-shared"]
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MERGE_CODES = {"mean": 0, "sum": 1, "max": 2, None: -1}
OUT_OF_MEMORY = -(1 << 63)  # hm_ties's INT64_MIN
MAX_TALL_TASKS = 254  # the kernel counts agreeing masks in uint8
# per task and thread: kernels.c's SPREAD × HIGH_BINS uint32 counts
HIGH_HISTOGRAM_COPIES_BYTES = 4 * (1 << 15) * 4

_pointer, _int32, _int64, _float = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
# every kernel starts with (base, base dtype, thetas, theta dtypes, tasks, start, end)
_PIECES = [_pointer, _int32, _pointer, _pointer, _int32, _int64, _int64]
_SIGNATURES = {
    "hm_histograms": (_int32, [*_PIECES, _pointer, _int64, _pointer]),
    "hm_ties": (_int64, [*_PIECES, _pointer, _pointer, _float, _int32, _int32, _float, _pointer]),
    "hm_sum": (None, [*_PIECES, _int32, _float, _pointer]),
    "hm_tall": (
        None,
        [*_PIECES, _pointer, _pointer, _int32, _pointer, _int64, _int32, _float, _pointer, _pointer],
    ),
    "hm_nonfinite": (_int64, [_pointer, _int32, _int64, _int64]),
    "hm_rebuild": (
        None,
        [_pointer, _int32, _pointer, _int32, _pointer, _int64, _int64, _int32, _pointer, _int32],
    ),
    "hm_take_nonfinite": (_int64, []),
}


def cache_directory() -> Path:
    if "HUBMERGE_CACHE" in os.environ:
        return Path(os.environ["HUBMERGE_CACHE"])
    if "XDG_CACHE_HOME" in os.environ:
        return Path(os.environ["XDG_CACHE_HOME"]) / "hubmerge"
    return Path.home() / ".cache" / "hubmerge"


def _machine() -> str:
    """What -march=native compiles for: a library built on another CPU must not be loaded."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    # x86: model name, flags; Arm: CPU implementer, part, Features (one set of lines per core: keep each once)
    fields = (
        "model name",
        "flags",
        "Features",
        "CPU implementer",
        "CPU architecture",
        "CPU variant",
        "CPU part",
    )
    described = dict.fromkeys(line for line in lines if line.startswith(fields))
    return "\n".join([platform.machine(), platform.processor(), *described])


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _machine()]).encode()).hexdigest()
    target = cache_directory() / "kernels" / f"hubmerge-kernels-{key[:20]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True, check=True
        )
        os.chmod(temporary, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
        os.replace(temporary, target)  # whole or absent, even with several processes compiling at once
    finally:
        Path(temporary).unlink(missing_ok=True)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (with one warning saying why) when they cannot be built or are off."""
    if os.environ.get("HUBMERGE_FUSED", "1") == "0":
        return None
    name = os.environ.get("CC", "cc")
    compiler = shutil.which(name)
    try:
        if compiler is None:
            raise FileNotFoundError(f"no C compiler {name!r} on PATH")
        lib = ctypes.CDLL(str(_build(compiler)))
    except Exception as error:  # whatever fails here, the torch operations compute the same results
        detail = getattr(error, "stderr", None) or error
        warnings.warn(
            f"hubmerge: fused CPU kernels unavailable ({detail}); computing with torch operations (slower)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for name, (result, arguments) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = result, arguments
    return lib


def supports(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype in DTYPE_CODES and t.is_contiguous() for t in tensors)


@functools.cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="hubmerge-fused")


_nonfinite_seen = 0
_nonfinite_lock = threading.Lock()


def _split(n: int, call: Callable[[int, int, int], object], align: int = 1) -> list:
    """call(part, start, end) over torch.get_num_threads() contiguous parts of [0, n), in parallel; every
    start a multiple of `align`."""
    parts = max(1, min(torch.get_num_threads(), n // 65536))
    bounds = [min(n, n * p // parts // align * align) for p in range(parts)] + [n]

    def counted(part: int, start: int, end: int) -> object:
        result = call(part, start, end)
        seen = library().hm_take_nonfinite()  # the kernel's count lives in the thread that ran it
        if seen:
            global _nonfinite_seen
            with _nonfinite_lock:
                _nonfinite_seen += seen
        return result

    if parts == 1:
        return [counted(0, 0, n)]
    futures = [_threads().submit(counted, p, bounds[p], bounds[p + 1]) for p in range(parts)]
    return [f.result() for f in futures]


def take_nonfinite() -> int:
    """NaN/±Inf input entries the kernels met since the last call (an entry read by several kernels counts
    once for each): whether the inputs of the pieces computed meanwhile hold any."""
    global _nonfinite_seen
    with _nonfinite_lock:
        seen, _nonfinite_seen = _nonfinite_seen, 0
    return seen


def _inputs(base: torch.Tensor, thetas: Sequence[torch.Tensor]) -> tuple:
    pointers = (ctypes.c_void_p * len(thetas))(*(t.data_ptr() for t in thetas))
    codes = (ctypes.c_int32 * len(thetas))(*(DTYPE_CODES[t.dtype] for t in thetas))
    return base.data_ptr(), DTYPE_CODES[base.dtype], pointers, codes, len(thetas)


def _at(tensor: torch.Tensor | None, start: int) -> int | None:
    return None if tensor is None else tensor.data_ptr() + start * tensor.element_size()


def magnitude_histograms(
    base: torch.Tensor, thetas: Sequence[torch.Tensor], buckets: Sequence[int] | None, counts: torch.Tensor
) -> None:
    """Add each task's radix histogram of |θ_t − θ0| into counts[t] (int64, contiguous): of the top 16 bits
    when `buckets` is None (`high_codes_`), else of the codes of `low_codes_` for task t's bucket."""
    args = _inputs(base, thetas)
    wanted = None if buckets is None else (ctypes.c_int32 * len(buckets))(*buckets)
    bins = counts.shape[1]

    def run(part: int, start: int, end: int) -> torch.Tensor:
        partial = counts if part == 0 else torch.zeros_like(counts)
        if library().hm_histograms(*args, start, end, wanted, bins, partial.data_ptr()) != 0:
            raise MemoryError("hubmerge.fused.magnitude_histograms: no memory for the histogram copies")
        return partial

    for partial in _split(base.numel(), run)[1:]:
        counts += partial


def ties(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    thresholds: Sequence[float | None],
    majority: int,
    merge: str | None,
    out: torch.Tensor | None = None,
    scaling: float | None = None,
) -> int:
    """TIES over flat pieces, as trim → elect_sign → resolve_zero_signs → disjoint_merge.

    Args:
        base, thetas: flat pieces of θ0 and θ_t.
        thresholds: per task; None keeps the task whole.
        majority: the model-wide majority sign for elected 0 signs.
        merge: mean, sum or max; None only counts the signs.
        out: float32 memory of the piece's size for τ_MTL (or θ0 + α·τ_MTL).
        scaling: α, to write θ0 + α·τ_MTL instead of τ_MTL.

    Returns:
        Σ of the elected signs (`sign_count`).
    """
    args = _inputs(base, thetas)
    limits = (ctypes.c_float * len(thresholds))(*(0.0 if thr is None else thr for thr in thresholds))
    trimmed = (ctypes.c_uint8 * len(thresholds))(*(thr is not None for thr in thresholds))
    apply = scaling is not None

    def run(_: int, start: int, end: int) -> int:
        signs = library().hm_ties(
            *args,
            start,
            end,
            limits,
            trimmed,
            float(majority),
            MERGE_CODES[merge],
            apply,
            scaling or 0.0,
            _at(out, start),
        )
        if signs == OUT_OF_MEMORY:
            raise MemoryError("hubmerge.fused.ties: no memory for the trimmed task vectors")
        return signs

    return sum(_split(base.numel(), run))


def tall(
    base: torch.Tensor,
    thetas: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    tau_mtl: torch.Tensor | None = None,
    consensus_k: int | None = None,
    masks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    scaling: float | None = None,
) -> torch.Tensor:
    """TALL masks with `mask_count`/`agreement_histograms` statistics, and the Consensus filter.

    Args:
        base, thetas: flat pieces of θ0 and θ_t (at most MAX_TALL_TASKS tasks).
        lambdas: λ_t per task.
        tau_mtl: float32 τ_MTL; None: the Task Arithmetic sum of the task vectors.
        consensus_k: keep τ_MTL only where at least k masks agree (None: no filter).
        masks: [T, n] bool memory for the masks, or None.
        out: float32 memory for the (filtered) τ_MTL, or θ0 + α·τ_MTL when `scaling` is given; may be tau_mtl.
        scaling: α.

    Returns:
        int64 counts: the agreement histogram over entries where every τ_t is 0 (T + 1), the same over the
        others (T + 1), each mask's size (T), the entries kept by the consensus filter (1).
    """
    t, n = len(thetas), base.numel()
    args = _inputs(base, thetas)
    weights = (ctypes.c_float * t)(*lambdas)
    k = -1 if consensus_k is None else consensus_k

    def run(_: int, start: int, end: int) -> torch.Tensor:
        stats = torch.zeros(3 * t + 3, dtype=torch.int64)
        library().hm_tall(
            *args,
            start,
            end,
            _at(tau_mtl, start),
            weights,
            k,
            _at(masks, start),
            n,
            scaling is not None,
            scaling or 0.0,
            _at(out, start),
            stats.data_ptr(),
        )
        return stats

    return torch.stack(_split(n, run)).sum(0)


def task_arithmetic(
    base: torch.Tensor, thetas: Sequence[torch.Tensor], out: torch.Tensor, scaling: float | None = None
) -> None:
    """`sum_in_task_order` of the task vectors into `out` (float32), or `apply_vector` of it with `scaling`."""
    args = _inputs(base, thetas)

    def run(_: int, start: int, end: int) -> None:
        library().hm_sum(*args, start, end, scaling is not None, scaling or 0.0, _at(out, start))

    _split(base.numel(), run)


def nonfinite_count(piece: torch.Tensor) -> int:
    """Entries of a contiguous CPU piece (`supports`) that are NaN or ±Inf, in one thread: the engine counts
    only the pieces `take_nonfinite` flagged, model by model, to name the one that holds them."""
    return library().hm_nonfinite(piece.data_ptr(), DTYPE_CODES[piece.dtype], 0, piece.numel())


def rebuild_into(
    base: torch.Tensor, tau: torch.Tensor, packed: torch.Tensor, stored: torch.dtype, out: torch.Tensor
) -> bool:
    """`artifacts.rebuild` of a whole tensor from its packed mask, cast to `stored` then to `out`'s dtype,
    written into `out`; False, with nothing done, where the kernel does not apply (float16 casts, a GPU,
    no compiler)."""
    rounded = (torch.float32, torch.bfloat16)
    if library() is None or stored not in rounded or out.dtype not in rounded or not supports(base, tau, out):
        return False
    if packed.device.type != "cpu" or not packed.is_contiguous():
        return False
    n = base.numel()
    if tau.numel() != n or out.numel() != n or packed.numel() < (n + 7) // 8:  # the kernel trusts the sizes
        raise ValueError(
            f"rebuild_into: θ0 has {n} entries, τ {tau.numel()}, out {out.numel()}, the mask {packed.numel()} bytes"
        )
    args = (
        base.data_ptr(),
        DTYPE_CODES[base.dtype],
        tau.data_ptr(),
        DTYPE_CODES[tau.dtype],
        packed.data_ptr(),
    )

    def run(_: int, start: int, end: int) -> None:
        library().hm_rebuild(*args, start, end, DTYPE_CODES[stored], out.data_ptr(), DTYPE_CODES[out.dtype])

    _split(base.numel(), run, align=8)
    return True
