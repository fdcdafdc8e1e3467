"""The YAML recipe: schema, parsing and validation, before any tensor is read."""

from __future__ import annotations

import difflib
import fnmatch
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hubmerge.errors import RecipeError
from hubmerge.methods import METHODS

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# A local path is anything that looks like one; everything else of the form org/name[@rev] is a Hub id.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[^\s@]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

# Methods with a parameter the validation search chooses (α, k, λ per task).
OutputDtype = Literal["auto", "float32", "bfloat16", "float16"]
VectorDtype = Literal["float32", "bfloat16", "float16"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelEntry(Strict):
    source: Annotated[str, Field(min_length=1)]
    name: str | None = None
    # What the source is: detected from its files (adapter_config.json: a PEFT adapter) unless given here.
    kind: Literal["checkpoint", "adapter"] | None = None


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
    # causal_lm multiple choice: a column of lists of strings, each continuing the text column; the label is
    # the index of the right one. Without it, causal_lm computes the text column's perplexity.
    choices_column: str | None = None
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

    head: Literal["zero_shot_text", "clip_zero_shot", "sequence_classification", "causal_lm"]
    metric: str = "accuracy"
    split: str = "test"  # what is reported; search uses `search.split`
    batch_size: Annotated[int, Field(gt=0)] = 64
    tasks: Annotated[dict[str, EvalTask], Field(min_length=1)]

    @model_validator(mode="after")
    def _check_causal_lm(self) -> Evaluation:
        # causal_lm scores choices (any metric on the predicted indices) or, without them, perplexity only
        problems = []
        with_choices = [t for t, spec in self.tasks.items() if spec.choices_column is not None]
        if self.metric == "perplexity" and self.head != "causal_lm":
            problems.append(f"evaluation.metric: perplexity needs head causal_lm (not {self.head})")
        if self.head != "causal_lm":
            problems += [
                f"evaluation.tasks.{t}.choices_column: only head causal_lm scores choices (not {self.head})"
                for t in with_choices
            ]
        elif self.metric == "perplexity":
            problems += [
                f"evaluation.tasks.{t}.choices_column: metric perplexity scores the text column alone; "
                "drop choices_column, or use metric accuracy for multiple choice"
                for t in with_choices
            ]
        elif len(with_choices) < len(self.tasks):
            plain = ", ".join(t for t in self.tasks if t not in with_choices)
            problems.append(
                f"evaluation.metric: head causal_lm without a choices_column ({plain}) computes perplexity: "
                f"set metric: perplexity, or give every task a choices_column (multiple choice, {self.metric})"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


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
    # Omitted: every model must be a PEFT adapter of one base, which their configs name.
    base: Annotated[str, Field(min_length=1)] | None = None
    models: Annotated[list[str | ModelEntry], Field(min_length=1)]
    method: str
    # validated when omitted too: a method's defaults can conflict with the recipe (consensus k = 2, one task)
    parameters: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    dtype: OutputDtype = "auto"
    # τ_MTL (and magnitude pruning's kept values) of a compressed output; the paper stores float32.
    tau_dtype: VectorDtype | None = None
    output: str | None = None
    # `peft`: a merge of adapters written back as one adapter (LoRA of rank `lora_rank`, or (IA)³).
    output_format: Literal["model", "peft"] = "model"
    lora_rank: Annotated[int, Field(gt=0)] | None = Field(default=None, validate_default=True)
    # Which tensors are merged (fnmatch globs on tensor names); the base's other tensors are copied unchanged,
    # and the fine-tuned models need only have the selected ones (e.g. CLIPVisionModel fine-tunes of a
    # CLIPModel base: include: ["vision_model.*"]).
    include: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None
    exclude: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    evaluation: Evaluation | None = None
    search: Search | None = None
    push: PushTarget | None = None

    # Each check is a field validator, so pydantic reports it beside every other field's problem; the
    # cross-field ones read the fields validated before them (`info.data`, in declaration order), and skip
    # what depends on a field that failed. Several problems of one field are joined by newlines.

    @field_validator("models")
    @classmethod
    def _check_models(cls, models: list[str | ModelEntry]) -> list[str | ModelEntry]:
        names = _task_names(models)
        problems = [
            f"task name {name!r} is not usable as a file name (letters, digits, '.', '_', '-')"
            for name in dict.fromkeys(names)
            if not TASK_NAME.match(name)
        ]
        problems += [
            f"duplicate task name {name!r}: give the models distinct `name`s"
            for name in dict.fromkeys(names)
            if names.count(name) > 1
        ]
        if problems:
            raise ValueError("\n".join(problems))
        return models

    @field_validator("method")
    @classmethod
    def _check_method(cls, method: str, info: ValidationInfo) -> str:
        if method not in METHODS:
            raise ValueError(
                f"unknown method {method!r} ({did_you_mean(method, sorted(METHODS), 'choose one of')})"
            )
        if "models" in info.data:
            METHODS[method].check_task_count(len(info.data["models"]))
        return method

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, parameters: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = info.data.get("method")
        if method is None:  # unknown: reported under `method`
            return parameters
        names = _task_names(info.data["models"]) if "models" in info.data else None
        problems = parameter_problems(method, parameters, names)
        if problems:
            raise ValueError("\n".join(problems))
        return parameters

    @field_validator("tau_dtype")
    @classmethod
    def _check_tau_dtype(cls, tau_dtype: str | None, info: ValidationInfo) -> str | None:
        method = info.data.get("method")
        if tau_dtype is not None and method in METHODS and METHODS[method].result != "compressed":
            raise ValueError(
                f"applies to compressed outputs (tall_masks, magnitude_*); {method} writes a merged model: "
                "use `dtype:` for its weights"
            )
        return tau_dtype

    @field_validator("lora_rank")
    @classmethod
    def _check_lora_rank(cls, lora_rank: int | None, info: ValidationInfo) -> int | None:
        problems = []
        output_format, method = info.data.get("output_format"), info.data.get("method")
        if lora_rank is not None and output_format != "peft":
            problems.append("applies to `output_format: peft` only (a merged LoRA adapter of this rank)")
        if output_format == "peft" and method in METHODS and METHODS[method].result != "merged":
            problems.append(
                f"output_format: peft writes a merged adapter; {method} writes a compressed artifact "
                "(leave output_format out)"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return lora_rank

    @field_validator("evaluation")
    @classmethod
    def _check_evaluation(cls, evaluation: Evaluation | None, info: ValidationInfo) -> Evaluation | None:
        if evaluation is None or "models" not in info.data:
            return evaluation
        names = _task_names(info.data["models"])
        unknown = [t for t in evaluation.tasks if t not in names]
        missing = [n for n in names if n not in evaluation.tasks]
        problems = [
            f"evaluation.tasks: {t!r} is not a task of this recipe ({', '.join(names)})" for t in unknown
        ]
        problems += [f"evaluation.tasks: task {n!r} has no evaluation data" for n in missing]
        if problems:
            raise ValueError("\n".join(problems))
        return evaluation

    @field_validator("search")
    @classmethod
    def _check_search(cls, search: Search | None, info: ValidationInfo) -> Search | None:
        if search is None:
            return search
        problems = []
        if "evaluation" in info.data and info.data["evaluation"] is None:
            problems.append("search: needs an `evaluation:` section to score the candidates")
        method = info.data.get("method")
        searchable = [name for name, spec in METHODS.items() if spec.searchable]
        if method in METHODS and not METHODS[method].searchable:
            problems.append(f"search: {method} has no parameter to search ({', '.join(searchable)} do)")
        if "models" in info.data:
            t = len(info.data["models"])
            problems += [f"search.k: {k} is more than the {t} tasks" for k in search.k if k > t]
        if problems:
            raise ValueError("\n".join(problems))
        return search

    @field_validator("push")
    @classmethod
    def _check_push(cls, push: PushTarget | None, info: ValidationInfo) -> PushTarget | None:
        method = info.data.get("method")
        if push and push.export == "subfolders" and method and METHODS[method].result != "compressed":
            raise ValueError("push.export: subfolders applies to compressed artifacts only (this is a merge)")
        return push

    def selects(self, key: str) -> bool:
        """Whether tensor `key` is merged (rather than copied from the base)."""
        included = self.include is None or any(fnmatch.fnmatchcase(key, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(key, p) for p in self.exclude)

    @property
    def entries(self) -> list[ModelEntry]:
        return [m if isinstance(m, ModelEntry) else ModelEntry(source=m) for m in self.models]

    @property
    def task_names(self) -> list[str]:
        return _task_names(self.models)

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


def _task_names(models: list[str | ModelEntry]) -> list[str]:
    entries = [m if isinstance(m, ModelEntry) else ModelEntry(source=m) for m in models]
    return [e.name or default_task_name(e.source) for e in entries]


def did_you_mean(name: str, valid: list[str], label: str = "valid") -> str:
    """`did you mean 'x'? valid: a, b, c` (the closest name, when one is close), for an unknown name."""
    close = difflib.get_close_matches(name, valid, n=1)
    listing = f"{label}: {', '.join(valid)}"
    return f"did you mean {close[0]!r}? {listing}" if close else listing


def _members(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may have: Annotated, Optional and unions unwrapped."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) if arg is not type(None) for m in _members(arg)]
    return [annotation]


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[list[str], list[str] | None]:
    """Follow a pydantic error location from `root`.

    Returns:
        The location as the user wrote it (pydantic's union-branch labels such as `str`, `ModelEntry` or
        `constrained-float` left out), and the keys the mapping reached accepts (None: not a mapping).
    """
    shown: list[str] = []
    current = [root]
    for part in loc:
        members = [m for annotation in current for m in _members(annotation)]
        branch = [m for m in members if _is_model(m) and m.__name__ == part]
        if branch:
            current = branch
            continue
        if isinstance(part, str) and (
            any(c in part for c in "-[(") or part in ("str", "int", "float", "bool")
        ):
            continue
        shown.append(str(part))
        following = []
        for member in members:
            if _is_model(member):
                following += [f.annotation for n, f in member.model_fields.items() if part in (n, f.alias)]
            elif get_origin(member) in (list, dict):
                following.append(get_args(member)[-1])
        current = following
    models = [m for annotation in current for m in _members(annotation) if _is_model(m)]
    keys = [f.alias or n for n, f in models[0].model_fields.items()] if models else None
    return shown, keys


def _other_branch(loc: tuple[int | str, ...], branch: tuple[int | str, ...]) -> bool:
    """Whether `loc` lies inside another branch of the union that `branch` (ending in a branch label) is one of."""
    n = len(branch)
    return len(loc) > n and loc[: n - 1] == branch[:-1] and loc[n - 1] != branch[-1]


def _problems(err: ValidationError, root: type[BaseModel], unknown: str, note: str = "") -> list[str]:
    """One message per problem pydantic found, each naming its field; unknown keys with suggestions."""
    problems = []
    errors = err.errors()
    for e in errors:
        loc, msg = e["loc"], e["msg"].removeprefix("Value error, ")
        if loc[-1] == "str" and any(_other_branch(o["loc"], loc) for o in errors):
            continue  # `str | Model` given a mapping: the model branch's problems are the ones to show
        if e["type"] == "extra_forbidden":
            shown, keys = _walk(root, loc[:-1])
            hints = [note, did_you_mean(str(loc[-1]), keys)] if keys else [note]
            detail = "; ".join(h for h in hints if h)
            problems.append(
                f"{'.'.join([*shown, str(loc[-1])])}: {unknown}" + (f" ({detail})" if detail else "")
            )
            continue
        path = ".".join(_walk(root, loc)[0])
        for part in msg.split("\n"):
            if note:
                part = f"{part} ({note})"
            named = not path or part.startswith((f"{path}:", f"{path}."))
            problems.append(part if named else f"{path}: {part}")
    return list(dict.fromkeys(problems))


def parameter_problems(method: str, raw: dict[str, Any], task_names: list[str] | None) -> list[str]:
    """Every problem of a method's parameters, each as `parameters.<field>: ...`.

    Args:
        method: a name in METHODS.
        raw: the recipe's `parameters` mapping.
        task_names: the tasks, or None when the models are invalid (checks that need them are skipped).

    Returns:
        The problems; empty when the parameters are valid.
    """
    spec = METHODS[method]
    try:
        spec.params.model_validate(raw)
    except ValidationError as err:
        return [
            f"parameters.{p}" for p in _problems(err, spec.params, "unknown parameter", f"method {method}")
        ]
    if task_names is not None:
        try:
            spec.validate(raw, task_names)
        except ValueError as err:
            return [str(err)]
    return []


# Keys of a mergekit configuration that a hubmerge recipe never has.
MERGEKIT_KEYS = ("merge_method", "base_model", "slices", "modules", "tokenizer_source", "out_dtype")


def parse_recipe(data: Any, origin: str = "<recipe>") -> Recipe:
    """Validate an already-loaded recipe mapping; errors name `origin` and every offending field."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe must be a YAML mapping, got {type(data).__name__}")
    if "merge_method" in data and not {"version", "method"} & data.keys():
        found = ", ".join(k for k in MERGEKIT_KEYS if k in data)
        raise RecipeError(
            f"{origin}: this looks like a mergekit config ({found}); hubmerge recipes look like "
            f"'version: 1 / base: / models: / method:'; convert it with: hubmerge convert-mergekit {origin}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        problems = _problems(err, Recipe, "unknown field")
        summary = problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
        raise RecipeError(f"{origin}: {summary}", field=_field_of(problems[0])) from err


def _field_of(problem: str) -> str | None:
    """The field a message of `_problems` names (`models.1.name: ...` -> `models.1.name`), if any."""
    head, sep, _ = problem.partition(": ")
    return head if sep and head and " " not in head else None


def read_yaml(path: Path) -> Any:
    """A YAML file's content; a syntax error is one line naming the file, line and column."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: malformed YAML: {err.problem or err}", path=path) from err
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: malformed YAML: {str(err).splitlines()[0]}", path=path) from err


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a directory; give the recipe's YAML file", path=path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}", path=path)
    return parse_recipe(read_yaml(path), str(path))
