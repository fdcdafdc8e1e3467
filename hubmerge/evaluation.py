"""Evaluate merged weights on each task's data with its own head; the numbers behind search and model cards.

Every candidate is an *overlay*: values for the merged tensors, loaded into a model built from the base (or,
for `sequence_classification`, from the task's fine-tuned model, so each task keeps its own head). The
zero-shot row overlays θ0, the fine-tuned row θ_t, a merge its result: all go through the same code.
`causal_lm` (decoder models, built from the base) scores log-likelihoods: see hubmerge.causal_lm_eval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from hubmerge.causal_lm_eval import (
    TokenSequence,
    choice_sequences,
    log_likelihoods,
    perplexity,
    predict_choices,
    text_sequences,
)
from hubmerge.errors import HubmergeError, RecipeError, SourceError
from hubmerge.hub import OPEN_CLIP_CONFIG
from hubmerge.recipe import EvalTask, Evaluation

Overlay = dict[str, torch.Tensor]
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
LABEL_MAX_LENGTH = 16  # label names are a few words


@dataclass(frozen=True)
class Examples:
    """One split of one task: model inputs (texts or images), integer labels and the class names.

    For `causal_lm`, `choices` holds each example's choices and a label is a choice index (no class names);
    perplexity has neither labels nor choices.
    """

    inputs: list[Any]
    labels: torch.Tensor
    label_names: list[str]
    choices: list[list[str]] | None = None


def load_examples(task: str, spec: EvalTask, split: str, head: str) -> Examples:
    """Read `split` of a task's dataset (Hub id or local files) and check its columns and labels."""
    import datasets

    datasets.disable_progress_bars()  # one bar per split of a small local file is noise, not progress
    name = spec.splits.get(split, split)
    where = f"evaluation.tasks.{task}"
    try:
        if spec.data_files:
            if name not in spec.data_files:
                raise RecipeError(
                    f"{where}.data_files: no file for split {name!r} (have {sorted(spec.data_files)})",
                    field=f"{where}.data_files",
                )
            path = Path(spec.data_files[name])
            fmt = DATA_FORMATS.get(path.suffix)
            if fmt is None:
                raise RecipeError(
                    f"{where}.data_files: {path}: use .json, .jsonl, .csv or .parquet",
                    field=f"{where}.data_files",
                )
            if not path.is_file():
                raise RecipeError(
                    f"{where}.data_files: {path} not found", field=f"{where}.data_files", path=path
                )
            data = datasets.load_dataset(fmt, data_files={name: str(path)}, split=name)
        else:
            data = datasets.load_dataset(spec.dataset, spec.config, split=name)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as err:
        raise RecipeError(
            f"{where}: cannot load split {name!r}: {str(err).splitlines()[0]}", field=where
        ) from err
    input_column = spec.image_column if head == "clip_zero_shot" else spec.text_column
    scores_text = head == "causal_lm" and spec.choices_column is None  # perplexity: no labels
    columns = [("input", input_column)] + ([] if scores_text else [("label", spec.label_column)])
    if spec.choices_column is not None:
        columns.append(("choices", spec.choices_column))
    for kind, column in columns:
        if column not in data.column_names:
            raise RecipeError(
                f"{where}: split {name!r} has no {kind} column {column!r} (columns: {', '.join(data.column_names)})",
                field=where,
            )
    if spec.max_examples is not None:
        data = data.select(range(min(spec.max_examples, len(data))))
    if len(data) == 0:
        raise RecipeError(f"{where}: split {name!r} is empty", field=where)
    if scores_text:
        return Examples(list(data[input_column]), torch.empty(0, dtype=torch.int64), [])
    if head == "causal_lm":
        labels = torch.tensor(data[spec.label_column], dtype=torch.int64)
        choices = _choices(data[spec.choices_column], labels, where, name)
        return Examples(list(data[input_column]), labels, [], choices)
    label_names = spec.label_names or _class_names(data, spec.label_column)
    if label_names is None:
        raise RecipeError(
            f"{where}: give `label_names` (the label column {spec.label_column!r} has no names)",
            field=f"{where}.label_names",
        )
    labels = torch.tensor(data[spec.label_column], dtype=torch.int64)
    bad = labels[(labels < 0) | (labels >= len(label_names))]
    if bad.numel():
        raise RecipeError(
            f"{where}: label {int(bad[0])} in split {name!r} is out of range for {len(label_names)} classes",
            field=where,
        )
    return Examples(list(data[input_column]), labels, label_names)


def _choices(values: list[Any], labels: torch.Tensor, where: str, split: str) -> list[list[str]]:
    """Each example's choices: a non-empty list of non-empty strings, with the example's label in range."""
    for row, (options, label) in enumerate(zip(values, labels.tolist(), strict=True)):
        if not (isinstance(options, list) and options and all(isinstance(o, str) and o for o in options)):
            raise RecipeError(
                f"{where}.choices_column: row {row} of split {split!r} needs a non-empty list of non-empty "
                f"strings, got {options!r:.80}",
                field=f"{where}.choices_column",
            )
        if not 0 <= label < len(options):
            raise RecipeError(
                f"{where}: label {label} of row {row} in split {split!r} is out of range for its "
                f"{len(options)} choices",
                field=where,
            )
    return values


def _class_names(data: Any, column: str) -> list[str] | None:
    feature = data.features[column]
    return list(feature.names) if hasattr(feature, "names") else None


def batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens, as sentence-transformers pools its encoders."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class Evaluator:
    """Scores overlays on every task of an `evaluation:` section; models and data are loaded once.

    Args:
        evaluation: the recipe's evaluation section.
        base_dir: the base model's directory (config, tokenizer or processor).
        task_dirs: each task's fine-tuned model directory (used by `sequence_classification`).
        device: where models and batches go.
        show_progress: a transient progress bar per scored split.
    """

    def __init__(
        self,
        evaluation: Evaluation,
        base_dir: Path,
        task_dirs: dict[str, Path],
        device: torch.device,
        show_progress: bool = False,
    ):
        self.evaluation = evaluation
        self.show_progress = show_progress
        self.base_dir = base_dir
        self.task_dirs = task_dirs
        self.device = device
        self._data: dict[tuple[str, str], Examples] = {}
        self._models: dict[str, torch.nn.Module] = {}
        self._heads: dict[str, torch.Tensor] = {}
        self._tokenizers: dict[Any, Any] = {}
        self._sequences: dict[tuple[str, str], list[TokenSequence]] = {}
        self._prepared = False
        self.open_clip = evaluation.head == "clip_zero_shot" and (base_dir / OPEN_CLIP_CONFIG).is_file()

    @property
    def tasks(self) -> list[str]:
        return list(self.evaluation.tasks)

    def examples(self, task: str, split: str) -> Examples:
        if (task, split) not in self._data:
            self._data[task, split] = load_examples(
                task, self.evaluation.tasks[task], split, self.evaluation.head
            )
        return self._data[task, split]

    def prepare(self, splits: list[str]) -> None:
        """Load every task's data for `splits`, the models and the zero-shot heads.

        Runs before any overlay: the heads must come from the base weights. Bad input (a missing column,
        a label out of range, a head that does not fit the model) fails here, before any merge work.
        """
        for task in self.tasks:
            self._model(task)  # first: a head that does not fit the model is the more useful error
            for split in splits:
                data = self.examples(task, split)
                if self.evaluation.head == "causal_lm":
                    self._causal_sequences(task, split)
            if self.evaluation.head not in ("sequence_classification", "causal_lm"):
                self._label_embeddings(task, data.label_names)
        self._prepared = True

    # -- models ---------------------------------------------------------------------------------------------

    def _model(self, task: str) -> torch.nn.Module:
        key = task if self.evaluation.head == "sequence_classification" else "base"
        if key not in self._models:
            self._models[key] = self._build_model(task).to(self.device).eval()
        return self._models[key]

    def _build_model(self, task: str) -> torch.nn.Module:
        from transformers import (
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            CLIPModel,
        )

        head = self.evaluation.head
        if self.open_clip:
            return self._build_open_clip()
        try:
            if head == "sequence_classification":
                return AutoModelForSequenceClassification.from_pretrained(self.task_dirs[task])
            if head == "causal_lm":
                return AutoModelForCausalLM.from_pretrained(self.base_dir)
            model = AutoModel.from_pretrained(self.base_dir)
        except (OSError, ValueError) as err:
            raise SourceError(
                f"evaluation: cannot load the model for head {head}: {str(err).splitlines()[0]}",
                path=self.task_dirs[task] if head == "sequence_classification" else self.base_dir,
            ) from err
        if head == "clip_zero_shot" and not isinstance(model, CLIPModel):
            raise RecipeError(
                f"evaluation.head clip_zero_shot needs a CLIPModel base (text and vision towers); "
                f"{self.base_dir} loads as {type(model).__name__}",
                field="evaluation.head",
            )
        if head == "zero_shot_text" and not hasattr(model, "get_input_embeddings"):
            raise RecipeError(
                f"evaluation.head zero_shot_text needs a text encoder; got {type(model).__name__}",
                field="evaluation.head",
            )
        return model

    def _build_open_clip(self) -> torch.nn.Module:
        """The base through open_clip's own loader; its tokenizer and eval transform are kept beside it."""
        try:
            import open_clip
        except ImportError as err:
            raise HubmergeError(
                f"evaluation: {self.base_dir} is an open_clip checkpoint ({OPEN_CLIP_CONFIG}); "
                "install the clip extra to evaluate it: pip install 'hubmerge[clip]'"
            ) from err
        where = f"local-dir:{self.base_dir}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(where)
            self._tokenizers[self.base_dir] = open_clip.get_tokenizer(where)
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise SourceError(
                f"evaluation: cannot load the open_clip model in {self.base_dir}: {str(err).splitlines()[0]}",
                path=self.base_dir,
            ) from err
        self._tokenizers["image"] = preprocess
        return model

    def _tokenizer(self, task: str) -> Any:
        from transformers import AutoTokenizer

        where = self.task_dirs[task] if self.evaluation.head == "sequence_classification" else self.base_dir
        if where not in self._tokenizers:
            try:
                self._tokenizers[where] = AutoTokenizer.from_pretrained(where)
            except (OSError, ValueError) as err:
                raise SourceError(
                    f"evaluation: no tokenizer in {where}: {str(err).splitlines()[0]}", path=where
                ) from err
        return self._tokenizers[where]

    @torch.no_grad()
    def _apply(self, model: torch.nn.Module, overlay: Overlay) -> None:
        """Copy the overlay into the model's weights in place (no reallocation per candidate)."""
        state = model.state_dict()
        unknown = [k for k in overlay if k not in state]
        if unknown:
            raise RecipeError(
                f"evaluation: tensor {unknown[0]!r} of the merge is not a weight of {type(model).__name__} "
                f"(the head does not fit this model)",
                field="evaluation.head",
            )
        for key, value in overlay.items():
            state[key].copy_(value)

    # -- heads ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _label_embeddings(self, task: str, label_names: list[str]) -> torch.Tensor:
        """Frozen zero-shot head: class-name embeddings by the *base* model, computed before any overlay."""
        if task not in self._heads:
            model, tokenizer = self._model(task), self._tokenizer(task)
            if self.evaluation.head == "clip_zero_shot":
                templates = self.evaluation.tasks[task].templates
                rows = []
                for name in label_names:
                    text = self._text_features(model, tokenizer, [t.format(name) for t in templates])
                    rows.append(
                        torch.nn.functional.normalize(
                            torch.nn.functional.normalize(text, dim=-1).mean(0), dim=0
                        )
                    )
                self._heads[task] = torch.stack(rows)
            else:
                enc = tokenizer(
                    label_names,
                    padding=True,
                    truncation=True,
                    max_length=LABEL_MAX_LENGTH,
                    return_tensors="pt",
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
                self._heads[task] = torch.nn.functional.normalize(pooled, dim=-1)
        return self._heads[task]

    def _predict(self, task: str, model: torch.nn.Module, batch: list[Any]) -> torch.Tensor:
        spec = self.evaluation.tasks[task]
        head = self.evaluation.head
        if head == "clip_zero_shot":
            image = self._image_features(model, [image.convert("RGB") for image in batch])
            return torch.nn.functional.normalize(image, dim=-1) @ self._heads[task].T
        enc = self._tokenizer(task)(
            batch, padding=True, truncation=True, max_length=spec.max_length, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        if head == "sequence_classification":
            return model(**enc).logits
        features = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        return torch.nn.functional.normalize(features, dim=-1) @ self._heads[task].T

    def _text_features(self, model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
        """CLIP text embeddings (projected, not normalized) of transformers' CLIPModel or an open_clip model."""
        if self.open_clip:
            return model.encode_text(tokenizer(texts).to(self.device))
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        return model.text_projection(model.text_model(**enc).pooler_output)

    def _image_features(self, model: torch.nn.Module, images: list[Any]) -> torch.Tensor:
        """CLIP image embeddings (projected, not normalized) of RGB PIL images."""
        if self.open_clip:
            preprocess = self._tokenizers["image"]  # set with the model: open_clip's eval transform
            return model.encode_image(torch.stack([preprocess(image) for image in images]).to(self.device))
        pixels = self._processor()(images=images, return_tensors="pt")["pixel_values"]
        return model.visual_projection(model.vision_model(pixel_values=pixels.to(self.device)).pooler_output)

    def _processor(self) -> Any:
        from transformers import AutoImageProcessor

        if "image" not in self._tokenizers:
            try:
                self._tokenizers["image"] = AutoImageProcessor.from_pretrained(self.base_dir)
            except (OSError, ValueError) as err:
                raise SourceError(
                    f"evaluation: no image processor in {self.base_dir}: {str(err).splitlines()[0]}",
                    path=self.base_dir,
                ) from err
        return self._tokenizers["image"]

    @torch.no_grad()
    def score(self, task: str, overlay: Overlay, split: str) -> float:
        """The metric of `task` on `split` with the overlay's weights (accuracy unless the recipe says otherwise)."""
        if not self._prepared:
            raise RuntimeError("Evaluator.prepare() must run before the first overlay")
        data = self.examples(task, split)
        model = self._model(task)
        self._apply(model, overlay)
        if self.evaluation.head == "causal_lm":
            return self._score_causal_lm(task, model, data, split)
        predictions = self._batched(
            task,
            split,
            self._order(data),
            lambda chunk: self._predict(task, model, [data.inputs[i] for i in chunk]).argmax(-1).cpu(),
        )
        return metric(self.evaluation.metric)(predictions, data.labels)

    def _score_causal_lm(self, task: str, model: torch.nn.Module, data: Examples, split: str) -> float:
        """Perplexity of the texts, or the metric of the best-scoring choices (see hubmerge.causal_lm_eval)."""
        sequences = self._causal_sequences(task, split)
        # by length, so each batch pads to similar lengths
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))
        sums = self._batched(
            task,
            split,
            order,
            lambda chunk: log_likelihoods(model, [sequences[i] for i in chunk], self.device),
        )
        if data.choices is None:
            return perplexity(sums, sequences)
        predictions = predict_choices(sums, [len(options) for options in data.choices])
        return metric(self.evaluation.metric)(predictions, data.labels)

    def _causal_sequences(self, task: str, split: str) -> list[TokenSequence]:
        """A split's token sequences for `causal_lm`, tokenized once (overlays change weights, not tokens)."""
        if (task, split) not in self._sequences:
            data, spec = self.examples(task, split), self.evaluation.tasks[task]
            where, name = f"evaluation.tasks.{task}", spec.splits.get(split, split)
            tokenizer = self._tokenizer(task)
            if data.choices is None:
                sequences = text_sequences(tokenizer, data.inputs, spec.max_length)
                if not any(s.scored for s in sequences):
                    raise RecipeError(
                        f"{where}: no text of split {name!r} has a token to predict (each needs two or more)",
                        field=f"{where}.text_column",
                    )
            else:
                sequences = choice_sequences(tokenizer, data.inputs, data.choices, spec.max_length)
                pairs = [(row, option) for row, options in enumerate(data.choices) for option in options]
                for (row, option), sequence in zip(pairs, sequences, strict=True):
                    if not sequence.scored:
                        raise RecipeError(
                            f"{where}: choice {option!r} of row {row} in split {name!r} has no token to score "
                            f"(nothing after tokenization, or max_length {spec.max_length} is too small)",
                            field=f"{where}.choices_column",
                        )
            self._sequences[task, split] = sequences
        return self._sequences[task, split]

    def _batched(
        self, task: str, split: str, order: list[int], run: Callable[[list[int]], torch.Tensor]
    ) -> torch.Tensor:
        """`run` on batches of the indices in `order`, with a progress bar; its results back in index order."""
        chunks = list(batches(order, self.evaluation.batch_size))
        with Progress(
            TextColumn(f"evaluating {task} ({split})"),
            BarColumn(),
            MofNCompleteColumn(),
            disable=not self.show_progress,
            transient=True,
            console=Console(stderr=True),  # stdout carries only results
        ) as progress:
            bar = progress.add_task("", total=len(chunks))
            outputs = []
            for chunk in chunks:
                outputs.append(run(chunk))
                progress.advance(bar)
        ordered = torch.cat(outputs)
        results = torch.empty_like(ordered)
        results[torch.tensor(order, dtype=torch.int64)] = ordered
        return results

    def _order(self, data: Examples) -> list[int]:
        """Texts by length, so each batch pads to similar lengths (less work on CPU); images as given."""
        if self.evaluation.head == "clip_zero_shot":
            return list(range(len(data.inputs)))
        return sorted(range(len(data.inputs)), key=lambda i: len(data.inputs[i]))


def metric(name: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Accuracy is computed here (works offline); other names go through `evaluate.load`.

    Perplexity is not a function of predictions and labels: the causal_lm head computes it itself.
    """
    if name == "accuracy":
        return lambda predictions, labels: float((predictions == labels).double().mean())
    import evaluate

    try:
        loaded = evaluate.load(name)
    except Exception as err:  # evaluate raises many types (network, missing module, bad name)
        raise RecipeError(
            f"evaluation.metric {name!r}: cannot load it with `evaluate`: {err}", field="evaluation.metric"
        ) from err

    def compute(predictions: torch.Tensor, labels: torch.Tensor) -> float:
        result = loaded.compute(predictions=predictions.tolist(), references=labels.tolist())
        return float(result[name] if name in result else next(iter(result.values())))

    return compute


# Metrics whose smaller values are better; every other one (accuracy, `evaluate`'s scores) is higher-is-better.
LOWER_IS_BETTER = frozenset({"perplexity"})


def higher_is_better(metric: str) -> bool:
    """Whether a larger score of `metric` is better; its normalized score (a ratio) goes the same way."""
    return metric not in LOWER_IS_BETTER


def better(candidate: float, incumbent: float, metric: str) -> bool:
    """Whether `candidate` strictly beats `incumbent` under `metric` (so equal scores keep the incumbent).

    Args:
        candidate: a score (or normalized score) of `metric`.
        incumbent: the best so far.
        metric: the evaluation's metric name.

    Returns:
        True when the candidate is strictly better.
    """
    return candidate > incumbent if higher_is_better(metric) else candidate < incumbent


def display_scale(metric: str) -> float:
    """Factor for showing scores: fractions (accuracy, ...) as percentages, perplexity (unbounded) as is."""
    return 1.0 if metric == "perplexity" else 100.0


def normalized(accuracy: dict[str, float], finetuned: dict[str, float]) -> dict[str, float]:
    """Per task: score / that task's fine-tuned score (the paper's normalized accuracy).

    For perplexity the ratio is lower-is-better too: 1.1 is a perplexity 10 % above the fine-tuned model's.
    """
    return {t: (accuracy[t] / finetuned[t] if finetuned[t] else float("nan")) for t in accuracy}


def mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else float("nan")
