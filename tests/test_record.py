"""`RunRecord`, the model of `hubmerge.json`: the records that hubmerge writes validate, read back as typed
attributes, and dump to the very bytes they were read from (unknown keys and key order included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hubmerge.output import MANIFEST, read_manifest, read_record
from hubmerge.record import Evaluation, RunRecord, SearchRecord
from tests.test_cli import Workspace, invoke

# Methods that take the workspace's two models, one per kind of record: merged, masks, values, consensus.
METHODS = ("task_arithmetic", "ties", "tall_masks", "consensus", "magnitude_masking", "magnitude_pruning")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Outputs written by the current code: one per method, and a task's model rebuilt from an artifact."""
    ws = Workspace(tmp_path_factory.mktemp("records"))
    written = {}
    for method in METHODS:
        output = ws.root / f"out-{method}"
        result = invoke("run", ws.write(method=method, output=str(output)), "-q")
        assert result.exit_code == 0, result.output
        written[method] = output
    task = ws.root / "task-a"
    result = invoke("materialize", written["tall_masks"], "-t", "a", "-o", task)
    assert result.exit_code == 0, result.output
    written["task"] = task
    return written


@pytest.mark.parametrize("name", [*METHODS, "task"])
def test_a_written_record_round_trips_to_the_same_bytes(outputs: dict[str, Path], name: str) -> None:
    text = (outputs[name] / MANIFEST).read_text()
    record = RunRecord.model_validate(json.loads(text))
    assert record.to_json() == text
    assert read_record(outputs[name]).to_json() == text
    assert read_record(outputs[name]).to_dict() == read_manifest(outputs[name])


def test_attributes_of_an_artifact(outputs: dict[str, Path]) -> None:
    raw = read_manifest(outputs["tall_masks"])
    record = read_record(outputs["tall_masks"])
    assert record.compressed and record.result == "compressed" and record.method == "tall_masks"
    assert record.task_names == ["a", "b"] == [t["name"] for t in raw["tasks"]]
    assert [t.lambda_ for t in record.tasks] == [t["lambda"] for t in raw["tasks"]]
    assert record.base.source == raw["base"]["source"] and record.base.sha256 == raw["base"]["sha256"]
    assert record.stats.agreement_histogram == raw["stats"]["agreement_histogram"]
    assert record.storage is not None and record.storage.paper_bits == raw["storage"]["paper_bits"]
    assert record.files is not None
    assert {n: (f.size, f.sha256) for n, f in record.files.items()} == {
        n: (f["size"], f["sha256"]) for n, f in raw["files"].items()
    }
    assert record.tasks[0]["lambda"] == raw["tasks"][0]["lambda"]  # by JSON key, too
    with pytest.raises(KeyError):
        record["evaluation"]


def test_attributes_of_a_merged_model_and_of_a_task_model(outputs: dict[str, Path]) -> None:
    merged = read_record(outputs["consensus"])
    assert merged.result == "merged" and not merged.compressed and merged.storage is None
    assert merged.stats.consensus_kept == read_manifest(outputs["consensus"])["stats"]["consensus_kept"]
    pruned = read_record(outputs["magnitude_pruning"])
    assert pruned.vector is None and pruned.values is not None and pruned.values.dir == "values"
    assert pruned.storage is not None and pruned.storage.paper_bits is None
    task = read_record(outputs["task"])
    assert (task.result, task.task, task.tasks) == ("task", "a", [])
    assert task.artifact is not None and task.base.source == merged.base.source


def test_inspect_json_is_the_record(outputs: dict[str, Path]) -> None:
    for output in outputs.values():
        result = invoke("inspect", output, "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout) == json.loads((output / MANIFEST).read_text())


EVALUATION = {
    "head": "sequence_classification",
    "metric": "accuracy",
    "split": "test",
    "datasets": {"a": {"dataset": "local", "config": None, "split": "test"}},
    "rows": {
        "tall_masks": {
            "accuracy": {"a": 0.75},
            "normalized": {"a": 1.0},
            "mean_accuracy": 0.75,
            "mean_normalized": 1.0,
            "future_column": [1, 2],
        }
    },
}
SEARCH = {
    "split": "validation",
    "chosen": {"lambda": {"a": 0.4}},
    "finetuned": {"a": 0.8},
    "candidates": [
        {"lambda": 0.4, "accuracy": {"a": 0.7}, "normalized": {"a": 0.875}, "mean_normalized": 0.875}
    ],
}


def test_unknown_keys_and_any_key_order_survive(outputs: dict[str, Path]) -> None:
    data = json.loads((outputs["tall_masks"] / MANIFEST).read_text())
    data["evaluation"] = EVALUATION  # after "files", as `hubmerge eval` adds it to a finished output
    data["search"] = SEARCH
    data["from_the_future"] = {"nested": [1.5, None, "x"]}
    data["base"]["mirror"] = "somewhere"
    data["tasks"][0]["note"] = 3
    data["stats"]["new_statistic"] = 0.25
    data = {"created": data.pop("created"), **data}  # another order than today's writer's
    text = json.dumps(data, indent=2) + "\n"
    record = RunRecord.model_validate(json.loads(text))
    assert record.to_json() == text
    assert isinstance(record.evaluation, Evaluation) and isinstance(record.search, SearchRecord)
    assert record.evaluation.rows["tall_masks"].mean_accuracy == 0.75
    assert record.from_the_future == {"nested": [1.5, None, "x"]}  # type: ignore[attr-defined]


def test_numbers_keep_their_json_type() -> None:
    record = RunRecord.model_validate(
        {
            "format": "hubmerge-merged",
            "method": "task_arithmetic",
            "result": "merged",
            "base": {"source": "b", "location": "/b", "revision": None},
            "tasks": [{"name": "a", "lambda": 1, "density": 0.5}],
            "seconds": 2,
            "stats": {"topk_thresholds": [1, 0.5, None]},
        }
    )
    dumped = record.to_dict()
    assert dumped["tasks"][0] == {"name": "a", "lambda": 1, "density": 0.5}
    assert type(dumped["tasks"][0]["lambda"]) is int and type(dumped["seconds"]) is int
    assert dumped["stats"]["topk_thresholds"] == [1, 0.5, None]
    assert list(dumped) == ["format", "method", "result", "base", "tasks", "seconds", "stats"]


def test_a_record_set_later_is_written_last(outputs: dict[str, Path]) -> None:
    record = read_record(outputs["task_arithmetic"])
    record.evaluation = Evaluation.model_validate(EVALUATION)
    dumped = record.to_dict()
    assert list(dumped)[-1] == "evaluation" and dumped["evaluation"] == EVALUATION
