"""`RunRecord`: the run record of an output (`hubmerge.json`), as a pydantic model.

Written by `hubmerge run` (merged models, compressed artifacts) and `hubmerge materialize` (a task's model),
read back by everything that rebuilds, scores, inspects or publishes an output; `hubmerge.output.read_record`
is the one reader. Every part keeps keys it does not know (`extra="allow"`), and a record dumps its keys in the
order it was given them, so `RunRecord.model_validate(json.loads(text)).to_json() == text` for every record that
hubmerge wrote: reading and rewriting a record changes nothing but what the code changed.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidatorFunctionWrapHandler,
    model_serializer,
    model_validator,
)

# JSON numbers as written: an int stays an int and a float a float (`int | float` matches exactly first).
Number = int | float


class _Part(BaseModel):
    """A mapping of the run record: known keys typed, unknown ones kept, key order as given."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    _keys: list[str] | None = PrivateAttr(default=None)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        part = handler(data)
        if isinstance(data, dict) and isinstance(part, _Part):
            part._keys = list(data)
        return part

    @model_serializer(mode="wrap")
    def _in_key_order(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        if not self._keys or not isinstance(dumped, dict):
            return dumped
        ordered = {key: dumped[key] for key in self._keys if key in dumped}
        ordered.update((key, value) for key, value in dumped.items() if key not in ordered)
        return ordered

    def __getitem__(self, key: str) -> Any:
        """The value of JSON key `key` (`task["lambda"]` is `task.lambda_`), for code written against the
        JSON object; attributes are the way to read a record. KeyError for a key the record lacks."""
        name = self._json_names().get(key, key)
        if name in type(self).model_fields:
            if name not in self.model_fields_set:
                raise KeyError(key)
            return getattr(self, name)
        extra = self.__pydantic_extra__ or {}
        if key not in extra:
            raise KeyError(key)
        return extra[key]

    @classmethod
    def _json_names(cls) -> dict[str, str]:
        return {field.alias: name for name, field in cls.model_fields.items() if field.alias}

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this part: the keys it was given (or set), in their order, unknown ones kept."""
        return self.model_dump(by_alias=True, exclude_unset=True)


class FileEntry(_Part):
    size: int
    sha256: str


class BaseRecord(_Part):
    """The base as the recipe gives it and where it resolved; a compressed artifact also records its tensors'
    dtype and shape and, for a local base, its weights' SHA-256."""

    source: str
    location: str
    revision: str | None = None
    tensors: dict[str, list[Any]] | None = None  # {key: [safetensors dtype, shape]}
    sha256: str | None = None


class PrivatePart(_Part):
    """A task's own tensors in a compressed artifact (`private/<task>.safetensors`)."""

    file: str
    tensors: int
    entries: int
    bytes_: int = Field(alias="bytes")


class TaskRecord(_Part):
    """One fine-tuned model: where it came from, its mask setting and size, its own part of an artifact."""

    name: str
    source: str | None = None
    location: str | None = None
    revision: str | None = None
    private: PrivatePart | None = None
    from_base: list[str] | None = None
    merged_dtypes: dict[str, str] | None = None
    files: list[str] | None = None  # the task's own config/tokenizer files (`tasks/<task>/`)
    lambda_: Number | None = Field(default=None, alias="lambda")
    density: Number | None = None
    mask_kept: int | None = None


class Stats(_Part):
    topk_thresholds: list[Number | None] | None = None
    ties_sign_total: int | None = None
    mask_kept: list[int] | None = None
    agreement_histogram: list[int] | None = None
    agreement_histogram_active: list[int] | None = None
    consensus_kept: int | None = None


class NonfiniteCount(_Part):
    model: str
    source: str
    tensor: str
    count: int


class VectorFiles(_Part):
    stem: str
    dtype: str


class ValueFiles(_Part):
    dir: str
    dtype: str


class MaskFiles(_Part):
    dir: str
    packing: str


class Storage(_Part):
    """Storage in bits (`hubmerge.artifacts.storage_summary`); keys an older artifact lacks are None."""

    parameters: int
    tasks: int
    vector_dtype: str = "float32"
    vector_bits_per_entry: int | None = None
    private_entries: int | None = None
    private_bits: int | None = None
    shared_entries: int | None = None
    artifact_bits: int
    artifact_bits_per_task: Number | None = None
    paper_bits: int | None = None
    finetuned_fp32_bits: int
    finetuned_stored_bits: int | None = None
    base_bits_per_entry: Number | None = None


class SearchRecord(_Part):
    split: str
    chosen: dict[str, Any]
    finetuned: dict[str, Number] = Field(default_factory=dict)
    candidates: list[dict[str, Any]] = Field(default_factory=list)


class EvalDataset(_Part):
    dataset: str
    config: str | None = None
    split: str


class EvalRow(_Part):
    accuracy: dict[str, Number]
    normalized: dict[str, Number]
    mean_accuracy: Number
    mean_normalized: Number


class Evaluation(_Part):
    head: str
    metric: str
    split: str
    datasets: dict[str, EvalDataset]
    rows: dict[str, EvalRow]


class AdapterModule(_Part):
    rank: int
    energy: Number  # Σ_{i≤r} s_i² / Σ s_i² of the module's merged update


class AdapterRecord(_Part):
    """`output_format: peft`: the merged adapter written instead of a merged model."""

    peft_type: str
    rank: int | None = None
    modules: dict[str, AdapterModule] = Field(default_factory=dict)
    model_class: str | None = None  # the transformers class the base was saved from


class RunRecord(_Part):
    """The run record of an output (`hubmerge.json`).

    `result` is `merged` (a merged model), `compressed` (an artifact of τ_MTL and masks) or `task` (a task's
    model rebuilt from an artifact, which records `task` and `artifact` instead of `tasks`). Keys a record
    lacks read as their defaults and are not written back.
    """

    format: str
    format_version: int | None = None
    hubmerge_version: str | None = None
    created: str | None = None
    method: str
    result: Literal["merged", "compressed", "task"]
    task: str | None = None  # result `task`: which task of the artifact
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    artifact: dict[str, Any] | None = None  # result `task`: the artifact's created, version and parameters
    base: BaseRecord
    base_card: dict[str, Any] = Field(default_factory=dict)
    tasks: list[TaskRecord] = Field(default_factory=list)
    parameters_counted: int | None = None
    counted_tensors: int | None = None
    copied_tensors: list[str] | None = None
    counting_rule: str | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    has_config: bool | None = None
    library: str | None = None
    stats: Stats = Field(default_factory=Stats)
    device: str | None = None
    processes: int | None = None
    seconds: Number | None = None
    bytes_read: int | None = None
    nonfinite: list[NonfiniteCount] | None = None
    vector: VectorFiles | None = None
    values: ValueFiles | None = None
    masks: MaskFiles | None = None
    storage: Storage | None = None
    search: SearchRecord | None = None
    evaluation: Evaluation | None = None
    adapter: AdapterRecord | None = None
    files: dict[str, FileEntry] | None = None

    @property
    def compressed(self) -> bool:
        return self.result == "compressed"

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]

    def to_json(self) -> str:
        """The text of `hubmerge.json` for this record (what `hubmerge.integrity.write_manifest` writes)."""
        return json.dumps(self.to_dict(), indent=2) + "\n"
