"""Streaming safetensors files and all-or-nothing output directories."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hubmerge import parse_recipe, run_recipe
from hubmerge.engine import Engine
from hubmerge.errors import HubmergeError
from hubmerge.output import atomic_directory
from hubmerge.writer import (
    SafetensorsFile,
    ShardedFiles,
    Slot,
    ValueSpool,
    assemble_spooled,
)
from tests.golden import recipe
from tests.processes import long_ties_recipe, start_when_staging


def test_file_written_in_pieces_in_any_order_loads_with_safetensors(tmp_path):
    tensors = {
        "b": torch.arange(12, dtype=torch.float32).reshape(4, 3),
        "a": torch.tensor(2.5, dtype=torch.bfloat16),
        "empty": torch.zeros(0, 3),
        "c": torch.arange(5, dtype=torch.int64),
    }
    file = SafetensorsFile(
        tmp_path / "x.safetensors", [Slot(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    )
    file.create()
    file.write("c", tensors["c"])
    file.write("b", tensors["b"][1:], start=3)
    file.write("a", tensors["a"])
    file.write("b", tensors["b"][:1])
    file.close()
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert file.written == file.data_bytes == 4 * 12 + 2 + 8 * 5


def test_file_refuses_wrong_dtype_unknown_keys_and_overflow(tmp_path):
    file = SafetensorsFile(tmp_path / "x.safetensors", [Slot("a", torch.float32, (2,))])
    file.create()
    with pytest.raises(RuntimeError, match="float32"):
        file.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="no tensor 'b'"):
        file.write("b", torch.zeros(2))
    with pytest.raises(RuntimeError, match="too many bytes"):
        file.write("a", torch.zeros(2), start=1)
    file.close()


def test_sharded_files_give_oversized_tensors_their_own_shard(tmp_path):
    tensors = {"a": torch.ones(4), "big": torch.arange(64, dtype=torch.float32), "c": torch.full((4,), 3.0)}
    files = ShardedFiles(tmp_path, [Slot(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], 40)
    files.create()
    for k, v in reversed(tensors.items()):
        files.write(k, v)
    files.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * 72
    assert len(set(index["weight_map"].values())) == 2
    loaded = {}
    for name in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / name))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_spooled_values_of_several_processes_assemble_in_key_then_piece_order(tmp_path):
    path = tmp_path / "v.safetensors"
    first, second = ValueSpool(path, torch.float32, rank=0), ValueSpool(path, torch.float32, rank=1)
    second.write("k1", 8, torch.tensor([3.0]))
    first.write("k2", 0, torch.tensor([]))
    first.write("k1", 0, torch.tensor([1.0, 2.0]))
    idle = ValueSpool(path, torch.float32, rank=2)
    pieces = first.finish() + second.finish() + idle.finish()

    assemble_spooled(path, torch.float32, ["k1", "k2", "k3"], pieces)

    loaded = load_file(path)
    assert loaded["k1"].tolist() == [1.0, 2.0, 3.0]
    assert loaded["k2"].numel() == 0 and loaded["k3"].numel() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]


def test_atomic_directory_leaves_nothing_on_failure_and_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError), atomic_directory(target, overwrite=False) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise ValueError("crash")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target, overwrite=False) as staging:
        record = {"format": "hubmerge-merged", "result": "merged", "method": "task_arithmetic", "tasks": []}
        (staging / "hubmerge.json").write_text(
            json.dumps({**record, "base": {"source": "b", "location": "b"}})
        )
    with pytest.raises(ValueError), atomic_directory(target, overwrite=True) as staging:
        (staging / "second").write_text("2")
        raise ValueError("crash")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in target.iterdir()] == ["hubmerge.json"]
    with pytest.raises(HubmergeError, match="previous hubmerge output"), atomic_directory(target, False):
        pass


def test_run_interrupted_mid_stream_writes_nothing(tmp_path, monkeypatch):
    """A failure after some tensors were written (here: the 5th piece) leaves no output and no partial files."""
    calls = []
    original = Engine._compressed_piece

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Engine, "_compressed_piece", failing)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(parse_recipe(recipe("tall_masks")), output=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_run_leaves_no_staging_directory(tmp_path):
    recipe_file = long_ties_recipe(tmp_path)
    hubmerge = Path(sys.executable).with_name("hubmerge")
    command = [str(hubmerge), "run", str(recipe_file), "-o", str(tmp_path / "out"), "-q"]
    process = start_when_staging(command, tmp_path)

    process.send_signal(signal.SIGTERM)

    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "base.safetensors",
        "ties.yaml",
    ]
