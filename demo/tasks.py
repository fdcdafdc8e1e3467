"""Build the three demo text-classification tasks from data that ships with CPython.

Rules follow docs/benchmark-suite.md §3: unique texts with one label, classes of >= 100 texts, SHA-1
based train/val/test assignment (no RNG), per-class caps, files sorted by hash.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import re
import sys
import tokenize
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from sysconfig import get_paths

CAPS = {"train": 1000, "val": 200, "test": 300}
MIN_CLASS_SIZE = 100

# General_Category long names (UAX #44); letters, marks, numbers, punctuation and symbols of 400+ names.
UNICODE_CATEGORIES = {
    "Lu": "uppercase-letter",
    "Ll": "lowercase-letter",
    "Lo": "other-letter",
    "Mn": "nonspacing-mark",
    "Mc": "spacing-mark",
    "Nd": "decimal-number",
    "No": "other-number",
    "Po": "other-punctuation",
    "Sm": "math-symbol",
    "So": "other-symbol",
}
# Algorithmic names ("CJK UNIFIED IDEOGRAPH-4E00", "HANGUL SYLLABLE GAG") carry no meaning beyond a number.
_DERIVED_NAME = re.compile(r"-[0-9A-F]{4,6}$|^HANGUL SYLLABLE ")

# Packages with the most docstrings that still exist in Python 3.12+ (distutils and lib2to3 do not).
PYDOC_PACKAGES = (
    "asyncio",
    "email",
    "http",
    "idlelib",
    "importlib",
    "logging",
    "multiprocessing",
    "tkinter",
    "unittest",
    "xml",
)

# Statement that a full-line comment block annotates → label.
STATEMENT_LABELS = {
    "Assign": "assignment",
    "AugAssign": "assignment",
    "AnnAssign": "assignment",
    "ClassDef": "class-definition",
    "FunctionDef": "function-definition",
    "AsyncFunctionDef": "function-definition",
    "If": "if-statement",
    "Import": "import-statement",
    "ImportFrom": "import-statement",
    "For": "loop",
    "AsyncFor": "loop",
    "While": "loop",
    "Raise": "raise-statement",
    "Return": "return-statement",
    "Try": "try-statement",
}
# Tool directives and type comments are not prose.
_DIRECTIVE = re.compile(r"^(type:|noqa|pragma|fmt:|pylint:|-\*-|!)", re.IGNORECASE)
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}

Pair = tuple[str, str]


def clean(text: str, limit: int) -> str:
    """Collapse whitespace; cut at ``limit`` characters, dropping a trailing partial word."""
    text = " ".join(text.split())
    if len(text) > limit:
        cut = text[:limit]
        text = cut.rsplit(" ", 1)[0] if text[limit] != " " and " " in cut else cut
    return text


def unicode_category_pairs() -> Iterator[Pair]:
    """Character name → General_Category, for named, non-derived code points."""
    for code_point in range(sys.maxunicode + 1):
        char = chr(code_point)
        name = unicodedata.name(char, "")
        category = UNICODE_CATEGORIES.get(unicodedata.category(char))
        if name and category and not _DERIVED_NAME.search(name):
            yield name, category


def _stdlib_sources() -> Iterator[tuple[str, bytes]]:
    """(top-level package, source) for every .py file of the stdlib's packages, tests excluded."""
    root = Path(get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if len(parts) > 1 and not _SKIP_DIRS.intersection(parts):
            yield parts[0], path.read_bytes()


def _docstring_pairs(package: str, tree: ast.Module) -> Iterator[Pair]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                text = clean(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0], 300)
                if len(text.split()) >= 4:
                    yield text, package


def _statement_starts(tree: ast.Module) -> dict[int, ast.stmt]:
    """1-based line → outermost statement starting there; decorators count as their definition's line."""
    starts: dict[int, ast.stmt] = {}
    for node in ast.walk(tree):  # breadth-first, so outer statements win
        if isinstance(node, ast.stmt):
            decorators = getattr(node, "decorator_list", [])
            starts.setdefault(decorators[0].lineno if decorators else node.lineno, node)
    return starts


def _statement_label(node: ast.stmt) -> str | None:
    if isinstance(node, ast.Expr):
        return "function-call" if isinstance(node.value, ast.Call) else None
    return STATEMENT_LABELS.get(type(node).__name__)


def _is_code(text: str) -> bool:
    """Commented-out code parses; prose of four or more words almost never does."""
    try:
        ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    return True


def _comment_pairs(source: bytes, tree: ast.Module) -> Iterator[Pair]:
    """Block of consecutive full-line comments → kind of the next statement."""
    lines = source.decode("utf-8", "replace").splitlines()
    starts = _statement_starts(tree)
    blocks: list[list[tuple[int, str]]] = []
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type == tokenize.COMMENT and token.line.lstrip().startswith("#"):
            row, text = token.start[0], token.string.lstrip("#").strip()
            if blocks and blocks[-1][-1][0] == row - 1:
                blocks[-1].append((row, text))
            else:
                blocks.append([(row, text)])
    for block in blocks:
        if _DIRECTIVE.match(block[0][1]):
            continue
        text = clean(" ".join(part for _, part in block), 300)
        index = block[-1][0]  # 0-based index of the line after the block
        while index < len(lines) and (not lines[index].strip() or lines[index].lstrip().startswith("#")):
            index += 1
        node = starts.get(index + 1)
        label = _statement_label(node) if node else None
        if label and len(text.split()) >= 4 and not _is_code(text):
            yield text, label


def stdlib_source_pairs() -> tuple[list[Pair], list[Pair]]:
    """(pydoc_module pairs, comment_statement pairs) from one parse of the stdlib."""
    docs: list[Pair] = []
    comments: list[Pair] = []
    for package, source in _stdlib_sources():
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):  # a few files are kept for other Python versions or encodings
            continue
        if package in PYDOC_PACKAGES:
            docs.extend(_docstring_pairs(package, tree))
        comments.extend(_comment_pairs(source, tree))
    return docs, comments


def label_text(label: str) -> str:
    """Text the zero-shot head embeds: the part after the last '.', with '-' and '_' as spaces."""
    return re.sub(r"[-_]", " ", label.rsplit(".", 1)[-1])


def _hash(task: str, text: str) -> str:
    return hashlib.sha1(f"{task}\0{text}".encode()).hexdigest()


def make_splits(task: str, pairs: Iterable[Pair]) -> tuple[dict[str, list[dict]], dict]:
    """Deduplicate, assign splits by hash, cap per class; return split rows and metadata."""
    labels_of: dict[str, set[str]] = defaultdict(set)
    for text, label in pairs:
        if text:
            labels_of[text].add(label)
    unique = {text: next(iter(labels)) for text, labels in labels_of.items() if len(labels) == 1}
    available = Counter(unique.values())
    labels = sorted(label for label, count in available.items() if count >= MIN_CLASS_SIZE)
    index = {label: i for i, label in enumerate(labels)}

    buckets: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for text, label in unique.items():
        if label in index:
            digest = _hash(task, text)
            u = int(digest[:8], 16) / 2**32
            split = "train" if u < 0.7 else "val" if u < 0.8 else "test"
            buckets[split, label].append((digest, text))

    splits: dict[str, list[dict]] = {}
    for split, cap in CAPS.items():
        per_class = math.ceil(cap / len(labels))
        kept = [
            (digest, text, index[label])
            for label in labels
            for digest, text in sorted(buckets[split, label])[:per_class]
        ]
        splits[split] = [{"text": text, "label": label} for _, text, label in sorted(kept)]
    meta = {
        "task": task,
        "labels": labels,
        "label_texts": [label_text(label) for label in labels],
        "available": {label: available[label] for label in labels},
        "counts": {split: len(rows) for split, rows in splits.items()},
    }
    return splits, meta


def _write_if_changed(path: Path, data: bytes) -> None:
    """Keep files (and their mtimes) untouched when a rebuild gives the same bytes."""
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)


def write_task(out_dir: Path, task: str, pairs: Iterable[Pair], source: dict) -> dict:
    """Write ``<split>.jsonl`` and ``meta.json`` for one task; return the metadata."""
    splits, meta = make_splits(task, pairs)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta["sha256"] = {}
    for split, rows in splits.items():
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
        _write_if_changed(out_dir / f"{split}.jsonl", data)
        meta["sha256"][split] = hashlib.sha256(data).hexdigest()
    meta["source"] = source
    _write_if_changed(out_dir / "meta.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    return meta


def build_all(data_dir: Path) -> dict[str, dict]:
    """Build every demo task under ``data_dir/<task>/``; return task → metadata."""
    python = f"CPython {sys.version.split()[0]}"
    docs, comments = stdlib_source_pairs()
    return {
        "unicode_category": write_task(
            data_dir / "unicode_category",
            "unicode_category",
            unicode_category_pairs(),
            {"python": python, "unicodedata": unicodedata.unidata_version},
        ),
        "pydoc_module": write_task(
            data_dir / "pydoc_module", "pydoc_module", docs, {"python": python, "from": "stdlib docstrings"}
        ),
        "comment_statement": write_task(
            data_dir / "comment_statement",
            "comment_statement",
            comments,
            {"python": python, "from": "stdlib full-line comments"},
        ),
    }
