"""The YAML recipe: schema, parsing and validation, before any tensor is read."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hubmerge.errors import HubmergeError
from hubmerge.methods import METHODS

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A local path is anything that looks like one; everything else of the form org/name[@rev] is a Hub id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s@]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Methods with a parameter the validation search chooses (α, k, λ per task).
SEARCHABLE = ("task_arithmetic", "ties", "consensus", "tall_masks")
OutputDtype = Literal["auto", "float32", "bfloat16", "float16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(Strict):
    source: Annotated[str, Field(min_length=1)]
    name: str | None = None


class PushTarget(Strict):
    """Where `hubmerge run` publishes its output once it is complete."""

    repo_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")]
    private: bool = False
    revision: str | None = None  # a branch; created when missing
    create_pr: bool = False
    commit_message: str | None = None
    export: Literal["none", "subfolders"] = "none"


class EvalTask(Strict):
    """Where one task's evaluation data is and how to read it."""

    dataset: str | None = None  # a Hub dataset id ...
    config: str | None = None
    data_files: dict[str, str] | None = None  # ... or local files by split name (.jsonl/.json/.csv/.parquet)
    splits: dict[str, str] = Field(default_factory=lambda: {"validation": "validation", "test": "test"})
    text_column: str = "text"
    image_column: str = "image"
    label_column: str = "label"
    label_names: list[str] | None = (
        None  # class names for zero-shot heads (default: the dataset's ClassLabel)
    )
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."])  # clip_zero_shot prompts
    max_length: Annotated[int, Field(gt=0)] = 128
    max_examples: Annotated[int, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> EvalTask:
        if (self.dataset is None) == (self.data_files is None):
            raise ValueError(
                "give either `dataset` (a Hub dataset id) or `data_files` (local files by split)"
            )
        if any("{}" not in t for t in self.templates):
            raise ValueError("every template needs a `{}` for the class name")
        return self


class Evaluation(Strict):
    """How merged weights are scored: one head type, the metric, and each task's data."""

    head: Literal["zero_shot_text", "clip_zero_shot", "sequence_classification"]
    metric: str = "accuracy"
    split: str = "test"  # what is reported; search uses `search.split`
    batch_size: Annotated[int, Field(gt=0)] = 64
    tasks: Annotated[dict[str, EvalTask], Field(min_length=1)]


def _grid(low: float, high: float, step: float) -> list[float]:
    return [round(low + i * step, 10) for i in range(round((high - low) / step) + 1)]


class Search(Strict):
    """Validation search: α for merges, λ per task for TALL masks, k for consensus (the paper's grids)."""

    split: str = "validation"
    scaling: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = Field(
        default_factory=lambda: _grid(0.1, 1.0, 0.1)
    )
    lambdas: Annotated[list[Annotated[float, Field(ge=0)]], Field(min_length=1)] = Field(
        default_factory=lambda: _grid(0.2, 0.6, 0.1), alias="lambda"
    )
    k: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = Field(
        default_factory=lambda: [1, 2, 3]
    )


class Recipe(Strict):
    """A merge recipe, exactly as written in the YAML file (method parameters still raw)."""

    version: Literal[1]
    base: Annotated[str, Field(min_length=1)]
    models: Annotated[list[str | ModelEntry], Field(min_length=1)]
    method: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: OutputDtype = "auto"
    output: str | None = None
    # Which tensors are merged (fnmatch globs on tensor names); the base's other tensors are copied unchanged,
    # and the fine-tuned models need only have the selected ones (e.g. CLIPVisionModel fine-tunes of a
    # CLIPModel base: include: ["vision_model.*"]).
    include: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    evaluation: Evaluation | None = None
    search: Search | None = None
    push: PushTarget | None = None

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of: {', '.join(sorted(METHODS))}")
        names = self.task_names
        for name in names:
            if not TASK_NAME.match(name):
                raise ValueError(
                    f"task name {name!r} is not usable as a file name (letters, digits, '.', '_', '-')"
                )
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"duplicate task name {name!r}: give the models distinct `name`s")
            seen.add(name)
        METHODS[self.method].validate(self.parameters, names)
        if self.evaluation is not None:
            unknown = sorted(set(self.evaluation.tasks) - set(names))
            missing = [n for n in names if n not in self.evaluation.tasks]
            if unknown:
                raise ValueError(
                    f"evaluation.tasks: {unknown[0]!r} is not a task of this recipe ({', '.join(names)})"
                )
            if missing:
                raise ValueError(f"evaluation.tasks: task {missing[0]!r} has no evaluation data")
        if self.search is not None:
            if self.evaluation is None:
                raise ValueError("search: needs an `evaluation:` section to score the candidates")
            if self.method not in SEARCHABLE:
                raise ValueError(
                    f"search: {self.method} has no parameter to search ({', '.join(SEARCHABLE)} do)"
                )
            too_big = [k for k in self.search.k if k > len(names)]
            if too_big:
                raise ValueError(f"search.k: {too_big[0]} is more than the {len(names)} tasks")
        if self.push and self.push.export == "subfolders" and METHODS[self.method].result != "compressed":
            raise ValueError("push.export: subfolders applies to compressed artifacts only (this is a merge)")
        return self

    def selects(self, key: str) -> bool:
        """Whether tensor `key` is merged (rather than copied from the base)."""
        included = self.include is None or any(fnmatch.fnmatchcase(key, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(key, p) for p in self.exclude)

    @property
    def entries(self) -> list[ModelEntry]:
        return [m if isinstance(m, ModelEntry) else ModelEntry(source=m) for m in self.models]

    @property
    def task_names(self) -> list[str]:
        return [e.name or default_task_name(e.source) for e in self.entries]

    @property
    def sources(self) -> list[str]:
        return [e.source for e in self.entries]


def is_hub_id(spec: str) -> bool:
    """Whether a source string names a Hub repository rather than a local path."""
    if spec.startswith((".", "/", "~")) or spec.endswith(WEIGHT_SUFFIXES) or Path(spec).exists():
        return False
    return bool(HUB_ID.match(spec))


def split_revision(spec: str) -> tuple[str, str | None]:
    """`org/name@rev` -> ("org/name", "rev"); no `@` -> revision None."""
    repo_id, _, revision = spec.partition("@")
    return repo_id, revision or None


def default_task_name(source: str) -> str:
    if is_hub_id(source):
        return split_revision(source)[0].split("/")[-1]
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix in WEIGHT_SUFFIXES else path.name


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "str", "ModelEntry")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(dict.fromkeys(parts))


def parse_recipe(data: Any, origin: str = "<recipe>") -> Recipe:
    """Validate an already-loaded recipe mapping; errors name `origin` and the offending field."""
    if not isinstance(data, dict):
        raise HubmergeError(f"{origin}: a recipe must be a YAML mapping, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise HubmergeError(f"{origin}: {_format_validation_error(err)}") from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise HubmergeError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise HubmergeError(f"{where}: malformed YAML: {err.problem or err}") from None
    except yaml.YAMLError as err:
        raise HubmergeError(f"{path}: malformed YAML: {err}") from None
    return parse_recipe(data, str(path))
