"""safetensors headers are checked as strictly as the `safetensors` library checks them.

hubmerge reads tensors with positioned reads at the header's offsets, so a header whose byte ranges overlap,
leave gaps or miss the end of the file would be read as wrong tensors without any error. Every malformed
header here is one that `safetensors.torch.load_file` refuses too; every file `save_file` writes is accepted.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hubmerge.errors import HubmergeError
from hubmerge.sources import SAFETENSORS_DTYPES, SafetensorsReader
from tests.test_bad_input import Workspace, base_tensors, refused_without_writing


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes) -> Path:
    """A file of the safetensors layout with exactly this header and data section."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def read_header(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def shift(path: Path, key: str, by: int) -> None:
    """Move one tensor's data_offsets by `by` bytes, keeping its size: the corruption of the issue."""
    header, data = read_header(path)
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start + by, end + by]
    write_raw(path, header, data)


def f32(shape: list[int], start: int) -> dict[str, Any]:
    n = 4
    for s in shape:
        n *= s
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, start + n]}


def refused(path: Path, *fragments: str) -> str:
    """Refused by hubmerge with one line naming the file and every fragment, and by safetensors itself."""
    with pytest.raises(HubmergeError) as caught:
        SafetensorsReader(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    with pytest.raises(SafetensorError):
        load_file(path)
    return message


# -- what save_file writes is read back exactly ----------------------------------------------------------


def every_dtype() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, dtype in SAFETENSORS_DTYPES.items():
        if dtype.is_floating_point:
            values = torch.randn(3, 5, generator=g).to(dtype)
        elif dtype == torch.bool:
            values = torch.rand(3, 5, generator=g) > 0.5
        else:
            values = torch.randint(0, 100, (3, 5), generator=g).to(dtype)
        tensors[f"t.{name}"] = values
    return tensors


def test_save_file_output_is_accepted_and_read_back(tmp_path: Path) -> None:
    tensors = {
        **every_dtype(),
        "empty": torch.zeros(0, 3),
        "empty.1d": torch.zeros(0, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "scalar.bf16": torch.tensor(-1.0, dtype=torch.bfloat16),
        "big": torch.arange(1000, dtype=torch.float32).reshape(10, 100),
    }
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    reader = SafetensorsReader(path)
    assert set(reader.infos) == set(tensors)
    expected = load_file(path)
    for key, tensor in expected.items():
        got = reader.read(key)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
        assert torch.equal(got.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), key
    assert torch.equal(reader.read("big", rows=(3, 7)), expected["big"][3:7])
    reader.close()


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_file_without_tensors_is_accepted(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    path = tmp_path / "none.safetensors"
    save_file({}, str(path), metadata=metadata)
    assert SafetensorsReader(path).infos == {}


# -- each malformed header ----------------------------------------------------------------------------------

HEADER_CASES: list[tuple[str, Any, bytes, list[str]]] = [
    ("header-not-an-object", b' {"a":{}}', b"", ["does not start with '{'"]),
    ("header-a-list", b"[1, 2]  ", b"", ["does not start with '{'"]),
    ("entry-not-an-object", {"a": [1, 2]}, b"", ["'a'", "not a JSON object"]),
    ("unknown-dtype", {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16), ["'F128'"]),
    ("missing-dtype", {"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), ["'a'", "dtype None"]),
    (
        "negative-dim",
        {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
        bytes(4),
        ["shape [-1]"],
    ),
    ("float-dim", {"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, bytes(4), ["shape [1.0]"]),
    (
        "bool-dim",
        {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        bytes(4),
        ["shape [True]"],
    ),
    (
        "shape-not-a-list",
        {"a": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}},
        bytes(16),
        ["shape 4"],
    ),
    (
        "one-offset",
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
        bytes(4),
        ["data_offsets [0]"],
    ),
    (
        "three-offsets",
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}},
        bytes(8),
        ["data_offsets [0, 4, 8]"],
    ),
    (
        "negative-offset",
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}},
        bytes(4),
        ["data_offsets [-4, 0]"],
    ),
    (
        "end-before-start",
        {"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}},
        bytes(4),
        ["'a'", "data_offsets [4, 0] end before they start"],
    ),
    (
        "size-not-dtype-times-shape",
        {"a": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 16]}},
        bytes(16),
        ["'a'", "hold 16 bytes", "F16", "[2, 2]", "take 8"],
    ),
    (
        "overlap",
        {"a": f32([4], 0), "b": f32([4], 12)},
        bytes(28),
        ["tensor 'b' overlaps 'a' (data_offsets [12, 28])"],
    ),
    (
        "empty-tensor-inside-another",
        {"a": f32([4], 0), "e": f32([0], 8)},
        bytes(16),
        ["tensor 'e' overlaps 'a' (data_offsets [8, 8])"],
    ),
    ("same-range-twice", {"a": f32([4], 0), "b": f32([4], 0)}, bytes(16), ["overlaps", "[0, 16]"]),
    (
        "gap",
        {"a": f32([4], 0), "b": f32([4], 20)},
        bytes(36),
        ["tensor 'b' (data_offsets [20, 36]) leaves 4 bytes after 'a'"],
    ),
    ("gap-at-start", {"a": f32([4], 8)}, bytes(24), ["tensor 'a'", "leaves 8 bytes at the start"]),
    ("truncated", {"a": f32([4], 0), "b": f32([4], 16)}, bytes(30), ["'b' ends at byte 32", "30 bytes"]),
    ("trailing-bytes", {"a": f32([4], 0)}, bytes(20), ["4 bytes after the last tensor, 'a'"]),
    ("no-tensors-but-data", {}, bytes(8), ["8 bytes after an empty header"]),
    (
        "metadata-not-strings",
        {"__metadata__": {"epoch": 3}, "a": f32([1], 0)},
        bytes(4),
        ["__metadata__ must map strings to strings"],
    ),
    ("metadata-a-list", {"__metadata__": ["x"], "a": f32([1], 0)}, bytes(4), ["__metadata__"]),
]


@pytest.mark.parametrize(
    ("header", "data", "fragments"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_malformed_header_is_refused(tmp_path: Path, header: Any, data: bytes, fragments: list[str]) -> None:
    refused(write_raw(tmp_path / "model.safetensors", header, data), *fragments)


def test_four_byte_shift_is_refused(tmp_path: Path) -> None:
    """The issue's corruption: one tensor's offsets moved by 4 bytes into its neighbour."""
    path = tmp_path / "model.safetensors"
    save_file(base_tensors(), str(path))
    header, _ = read_header(path)
    assert header["a.bias"]["data_offsets"] == [24, 40]  # save_file's order: b.steps, a.bias, a.weight, ...
    shift(path, "a.weight", -4)
    refused(path, "tensor 'a.weight' overlaps 'a.bias' (data_offsets [36, 100])")


# -- end to end: the run refuses before writing anything ----------------------------------------------------


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path)


@pytest.mark.parametrize("which", ["base", "finetune"])
@pytest.mark.parametrize(
    ("key", "by", "what"), [("a.weight", -4, "overlaps 'a.bias'"), ("b.weight", 4, "leaves")]
)
def test_run_refuses_a_shifted_tensor(ws: Workspace, which: str, key: str, by: int, what: str) -> None:
    corrupt = (ws.base if which == "base" else ws.models[1]) / "model.safetensors"
    shift(corrupt, key, by)
    ws.write(method="task_arithmetic")
    refused_without_writing(ws, f"{corrupt}: tensor {key!r}", what)


def test_header_check_cost_on_many_tensors(tmp_path: Path) -> None:
    """2,000 tensors: the strict check is a sort and one pass over the entries, far below a second."""
    path = tmp_path / "many.safetensors"
    save_file({f"layer.{i}.weight": torch.zeros(2, 3) for i in range(2000)}, str(path))
    started = time.perf_counter()
    reader = SafetensorsReader(path)
    elapsed = time.perf_counter() - started
    assert len(reader.infos) == 2000
    assert elapsed < 1.0, elapsed
