"""Text-suite builder (`benchmarks/text_suite/tasks.py`): the §3 split pipeline and the §2 parsers.

Runs without the Debian and PyPI data packages (CI may lack them): the pipeline is fed synthetic pairs and
each parser a few inline lines written in its source's real file format. The expected split of a text is
computed by hand (``printf 'demo\\0alpha' | sha1sum``), not with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest

from benchmarks.text_suite import tasks as ts

# --------------------------------------------------------------------------------------------------------
# clean(N)
# --------------------------------------------------------------------------------------------------------


def test_clean_collapses_whitespace_and_strips() -> None:
    assert ts.clean("  a\tb \n\n c  ", 300) == "a b c"


def test_clean_cuts_at_limit_and_drops_the_last_word() -> None:
    assert ts.clean("alpha beta gamma", 13) == "alpha beta"  # "gamma" cut in the middle
    assert ts.clean("alpha beta gamma", 10) == "alpha"  # "beta" ends at the limit and is still dropped
    assert ts.clean("alpha beta gamma", 16) == "alpha beta gamma"  # not longer than the limit
    assert ts.clean("abcdefgh", 4) == "abcd"  # a single word has no space to cut at


# --------------------------------------------------------------------------------------------------------
# §3 pipeline
# --------------------------------------------------------------------------------------------------------


def test_unique_pairs_drops_conflicts_duplicates_and_empty_texts() -> None:
    pairs = [("a", "x"), ("a", "x"), ("b", "x"), ("b", "y"), ("c", "y"), ("", "x"), ("b", "x")]
    assert ts.unique_pairs(pairs) == {"a": "x", "c": "y"}


def test_drop_small_classes_keeps_exactly_the_minimum() -> None:
    texts = {f"big{i}": "big" for i in range(100)} | {f"small{i}": "small" for i in range(99)}
    assert set(ts.drop_small_classes(texts).values()) == {"big"}


def test_conflicts_are_judged_before_the_task_keeps_its_classes() -> None:
    """A text filed under a kept and an unkept label is ambiguous, so it is dropped, not kept."""
    texts = ts.unique_pairs([("t", "kept"), ("t", "other"), ("u", "kept"), ("v", "other")])
    assert ts.keep_labels(texts, {"kept"}) == {"u": "kept"}
    assert ts.keep_labels(texts, None) == texts


@pytest.mark.parametrize(
    ("text", "digest", "split"),
    [
        ("gamma", "291382fafab1fcfe4691d9dc71d001cc07efdeb4", "train"),  # u = 0.160
        ("alpha", "be3c04c763ba085ea7a9130373780fe39c7d95a8", "val"),  # u = 0.743
        ("beta", "da63d4baf754dc2ee14268dab3689af1ef797002", "test"),  # u = 0.853
        ("café", "3e7b77b379270c41424b44c4c3978f0ccfa2a04a", "train"),  # UTF-8 bytes, u = 0.244
        ("naïve", "f0ea0a682534fab53bb427174d1fad3f7524cf24", "test"),  # u = 0.941
    ],
)
def test_split_assignment_follows_the_sha1_rule(text: str, digest: str, split: str) -> None:
    assert ts.text_hash("demo", text) == digest
    assert ts.split_of(digest) == split


def test_split_thresholds() -> None:
    assert ts.split_of("b3333332" + "0" * 32) == "train"  # just below 0.7 * 2^32
    assert ts.split_of("b3333334" + "0" * 32) == "val"
    assert ts.split_of("cccccccc" + "0" * 32) == "val"  # just below 0.8
    assert ts.split_of("cccccccd" + "0" * 32) == "test"


def _synthetic_pairs() -> list[tuple[str, str]]:
    """Three classes that survive (one far above the caps, two small) and one that is too small."""
    sizes = {"big": 2000, "mid": 150, "edge": 100, "tiny": 99}
    return [(f"{label} text {i}", label) for label, size in sizes.items() for i in range(size)]


def test_assign_splits_caps_per_class_and_orders_by_hash() -> None:
    texts = ts.drop_small_classes(ts.unique_pairs(_synthetic_pairs()))
    splits = ts.assign_splits("demo", texts, n_classes=3)
    for split, rows in splits.items():
        cap = math.ceil(ts.SPLIT_CAPS[split] / 3)
        assert [row[0] for row in rows] == sorted(row[0] for row in rows)
        for label in ("big", "mid", "edge"):
            candidates = sorted(
                ts.text_hash("demo", text)
                for text, text_label in texts.items()
                if text_label == label and ts.split_of(ts.text_hash("demo", text)) == split
            )
            kept = [digest for digest, _, row_label in rows if row_label == label]
            assert sorted(kept) == candidates[:cap]  # the smallest hashes, up to the cap
    assert len([row for row in splits["train"] if row[2] == "big"]) == 1000  # ceil(3000 / 3)
    assert all(ts.split_of(digest) == split for split, rows in splits.items() for digest, _, _ in rows)


def test_build_task_writes_jsonl_and_meta(tmp_path: Path) -> None:
    pairs = [*_synthetic_pairs(), ("big text 0", "mid")]  # a conflict: dropped from both classes
    meta = ts.build_task("demo", pairs, tmp_path, versions={"pkg": "1.0"})
    task_dir = tmp_path / "demo"

    assert meta["labels"] == ["big", "edge", "mid"]  # code-point order; "tiny" (99 texts) dropped
    assert meta["label_texts"] == ["big", "edge", "mid"]
    assert meta["available"] == {"big": 1999, "edge": 100, "mid": 150}
    assert meta["available_total"] == 2249
    assert meta["versions"] == {"pkg": "1.0"}
    assert json.loads((task_dir / "meta.json").read_text()) == meta

    all_texts: list[str] = []
    for split in ts.SPLITS:
        data = (task_dir / f"{split}.jsonl").read_bytes()
        assert meta["sha256"][split] == hashlib.sha256(data).hexdigest()
        rows = [json.loads(line) for line in data.decode().splitlines()]
        assert len(rows) == meta["counts"][split]
        assert all(set(row) == {"text", "label"} and row["label"] in (0, 1, 2) for row in rows)
        hashes = [ts.text_hash("demo", row["text"]) for row in rows]
        assert hashes == sorted(hashes)
        all_texts += [row["text"] for row in rows]
    assert "big text 0" not in all_texts
    assert len(all_texts) == len(set(all_texts))

    again = ts.build_task("demo", list(reversed(pairs)), tmp_path / "again", versions={"pkg": "1.0"})
    assert again["sha256"] == meta["sha256"]  # input order does not matter; rebuilds are byte-identical


def test_build_task_label_order_is_by_code_point(tmp_path: Path) -> None:
    pairs = [(f"{label} {i}", label) for label in ("b", "B", "a.z", "a-b") for i in range(100)]
    meta = ts.build_task("order", pairs, tmp_path)
    assert meta["labels"] == ["B", "a-b", "a.z", "b"]
    assert meta["label_texts"] == ["B", "a b", "z", "b"]
    first = json.loads((tmp_path / "order" / "train.jsonl").read_text().splitlines()[0])
    assert meta["labels"][first["label"]] == first["text"].split()[0]


def test_build_task_keep_selects_classes_after_conflicts(tmp_path: Path) -> None:
    pairs = [(f"x {i}", "x") for i in range(120)] + [(f"y {i}", "y") for i in range(120)] + [("x 0", "y")]
    meta = ts.build_task("keep", pairs, tmp_path, keep={"x"})
    assert meta["labels"] == ["x"]
    assert meta["available"] == {"x": 119}


def test_label_text_rule_and_cmu_exception() -> None:
    assert ts.label_text("wn_noun_supersense", "noun.artifact") == "artifact"
    assert ts.label_text("kjv_division", "gospels-acts") == "gospels acts"
    assert ts.label_text("name_origin", "arabic-persian-hebrew") == "arabic persian hebrew"
    assert ts.label_text("vader_sentiment", "strong-negative") == "strong negative"
    assert ts.label_text("foldoc_topic", "operating system") == "operating system"
    texts = [ts.label_text("cmu_syllables", label) for label in ts.CMU_SYLLABLE_LABELS]
    assert texts == [
        "one syllable",
        "two syllables",
        "three syllables",
        "four syllables",
        "five or more syllables",
    ]


def test_compare_checksums_severity() -> None:
    meta = {"sha256": {"train": "a", "val": "b", "test": "c"}, "versions": {"pkg": "1"}}
    same = {"sha256": {"train": "a", "val": "b", "test": "c"}, "versions": {"pkg": "1"}}
    assert ts.compare_checksums(meta, same) == ("ok", None)
    assert ts.compare_checksums(meta, None)[0] == "warning"
    changed = {"sha256": {"train": "a", "val": "x", "test": "c"}, "versions": {"pkg": "1"}}
    severity, message = ts.compare_checksums(meta, changed)
    assert severity == "error" and message is not None and "val" in message
    upgraded = {**changed, "versions": {"pkg": "0.9"}}
    assert ts.compare_checksums(meta, upgraded)[0] == "warning"


def test_checksums_file_covers_every_task() -> None:
    recorded = json.loads(ts.CHECKSUMS_PATH.read_text())
    assert set(recorded) == set(ts.TASKS)
    for task, entry in recorded.items():
        assert set(entry["sha256"]) == set(ts.SPLITS)
        source = ts.TASKS[task]
        assert set(entry["versions"]) == {*source.debian, *source.pypi}


# --------------------------------------------------------------------------------------------------------
# Parsers, on inline samples of the real file formats
# --------------------------------------------------------------------------------------------------------

WORDNET_SAMPLE = "  \n".join(  # data.noun lines end with two spaces
    [
        "  1 This software and database is being provided to you, the LICENSEE, by",
        "  2 Princeton University under the following license.",
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred",
        '00002000 06 n 02 widget 0 gadget 0 001 @ 00001930 n 0000 | a small mechanical device; "he fixed it"; "a widget"',
        "00002001 16 n 01 urge 0 000 | an instinctive motive",
        "00002002 28 n 01 dusk 0 000 | the time of day immediately following sunset;",
        "00002003 26 n 01 hush 0 000 | quiet state",
        "00002004 26 n 01 calm 0 000 | a quiet state",
        "",
    ]
)


def test_parse_wordnet_nouns() -> None:
    pairs = list(ts.parse_wordnet_nouns(WORDNET_SAMPLE.splitlines(keepends=True)))
    assert pairs == [
        ("that which is perceived or known or inferred", "noun.Tops"),
        ("a small mechanical device", "noun.artifact"),  # examples after '; "' removed
        ("an instinctive motive", "noun.motive"),
        ("the time of day immediately following sunset", "noun.time"),  # trailing ';' removed
        ("a quiet state", "noun.state"),  # 3 words are enough; "quiet state" (2) is dropped
    ]
    kept = ts.keep_labels(ts.unique_pairs(pairs), ts.TASKS["wn_noun_supersense"].keep)
    assert set(kept.values()) == {"noun.artifact", "noun.time", "noun.state"}  # Tops and motive dropped


def test_wordnet_tables() -> None:
    assert len(ts.WORDNET_LEXNAMES) == 45
    assert ts.WORDNET_LEXNAMES[4] == "noun.act" and ts.WORDNET_LEXNAMES[28] == "noun.time"
    assert ts.WORDNET_LEXNAMES[29] == "verb.body" and ts.WORDNET_LEXNAMES[44] == "adj.ppl"
    assert len(ts.WORDNET_NOUN_CLASSES) == 24


GCIDE_SAMPLE = """\
Quillfish \\Quill"fish`\\, n. (Zool.)
   A spiny fish of the genus {Diodon}, found in warm seas; --
   called also {porcupine fish}. --Agassiz.
   [1913 Webster]

Rhomb \\Rhomb\\, n. [F. rhombe.]
   1. (Geom.), An equilateral parallelogram having oblique
      angles. [Obs.]
   2. (Math.) A solid figure bounded by six faces
      of equal size and shape.
      [Webster 1913 Suppl.]

Spar \\Spar\\, n.
   (Naut.) A long rounded timber used as a mast or boom
   {Spar deck} (Naut.), the upper deck of a vessel.
      [PJC]

Zymase \\Zy"mase\\, n. (Chem.) A soluble ferment
   1. of yeast.

Tiny \\Tiny\\, n. (Bot.) Too short.
   [1913 Webster]
"""


def test_parse_gcide() -> None:
    assert list(ts.parse_gcide(GCIDE_SAMPLE)) == [
        # braces and the citation "--Agassiz." removed; ends before the source tag
        ("A spiny fish of the genus Diodon, found in warm seas; -- called also porcupine fish.", "zoology"),
        # "(Geom.)," with a comma; "[Obs.]" removed; ends before the next numbered sense
        ("An equilateral parallelogram having oblique angles.", "mathematics"),
        ("A solid figure bounded by six faces of equal size and shape.", "mathematics"),
        # ends before a newline + indentation + "{"
        ("A long rounded timber used as a mast or boom", "nautical"),
        # a marker inside an earlier sense starts its own text
        ("the upper deck of a vessel.", "nautical"),
        # "1. of yeast." starts a numbered sense; the run stops before it
        # and "A soluble ferment" has only 3 words, as has "Too short."
    ]


def test_gcide_marker_spellings() -> None:
    text = '(Zool.) A bird of the crow family.\n\n(Zo"ol.) A fish of the carp family.\n\n(Law) Not a field here.\n'
    assert [label for _, label in ts.parse_gcide(text)] == ["zoology", "zoology"]


FOLDOC_SAMPLE = """\
ALGOL X

   <language> An experimental {programming language}
   with {block structure}.

   (1995-01-01)

frob

   1. <hardware, jargon> A {knob} on a
   control panel of a device.

   2. <networking> To tweak a protocol setting on a router.

    <language> Four spaces: not a definition start.

Quux Ltd.

   <company>

   A small software company in Somewhere, founded 1980.

   (1999-01-01)

bar

   <jargon> A word used in examples, after foo.

short

   <storage> Too short.
"""


def test_parse_foldoc() -> None:
    assert list(ts.parse_foldoc(FOLDOC_SAMPLE)) == [
        ("An experimental programming language with block structure.", "language"),
        ("A knob on a control panel of a device.", "hardware"),  # first category of "<hardware, jargon>"
        ("To tweak a protocol setting on a router.", "networking"),
        # a tag alone on its line: the definition is the next paragraph
        ("A small software company in Somewhere, founded 1980.", "company"),
        ("A word used in examples, after foo.", "jargon"),  # yielded; the task keeps only its 10 classes
    ]
    assert "jargon" not in ts.FOLDOC_CATEGORIES and len(ts.FOLDOC_CATEGORIES) == 10


BIBLE_SAMPLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void.

Song of Solomon 1

  1 The song of songs, which is Solomon's.

1 John 5

 21 Little children, keep yourselves from idols. Amen.
"""


def test_parse_bible() -> None:
    assert list(ts.parse_bible(BIBLE_SAMPLE)) == [
        ("In the beginning God created the heaven and the earth.", "law"),
        ("And the earth was without form, and void.", "law"),
        ("The song of songs, which is Solomon's.", "wisdom-poetry"),
        ("Little children, keep yourselves from idols. Amen.", "general-epistles-revelation"),
    ]
    with pytest.raises(KeyError):
        list(ts.parse_bible("Tobit 1\n\n  1 Not in the Protestant canon.\n"))


def test_kjv_books() -> None:
    books = [book for division in ts.KJV_DIVISIONS.values() for book in division]
    assert len(books) == len(set(books)) == 66
    assert books[0] == "Genesis" and books[-1] == "Revelation"
    assert len(ts.KJV_DIVISIONS) == 8


FORTUNE_SAMPLE = (
    "Ein Sprichwort mit\tTabulator und\nzwei Zeilen.\n"
    "%\n"
    "Zu kurz.\n"
    "%\n"
    "% \n"
    "Kaputt: \ufffd\ufffd ist nicht mehr lesbar.\n"
    "%\n"
    "Letzter Spruch ohne abschliessendes Prozentzeichen."
)


def test_parse_fortunes() -> None:
    assert list(ts.parse_fortunes(FORTUNE_SAMPLE)) == [
        "Ein Sprichwort mit Tabulator und zwei Zeilen.",
        # "Zu kurz." has fewer than 20 characters; the next item ("% " is no separator) has U+FFFD
        "Letzter Spruch ohne abschliessendes Prozentzeichen.",
    ]


def test_fortune_sources_selection(tmp_path: Path) -> None:
    root = tmp_path
    for name in ts.FORTUNES_ENGLISH:
        (root / name).write_text("x")
    (root / "brasil").write_text("x")
    for directory in ts.FORTUNES_DIRECTORIES:
        (root / directory).mkdir()
    (root / "de" / "zitate").write_text("x")
    (root / "de" / "anekdoten").write_text("x")
    (root / "de" / "anekdoten.dat").write_text("x")
    os.symlink("anekdoten", root / "de" / "anekdoten.u8")
    os.symlink("zitate", root / "de" / "zitate-link")  # a link to a file already read
    (root / "es" / "off").mkdir()  # not a regular file
    (root / "es" / "off" / "hidden").write_text("x")
    os.symlink("../de/zitate", root / "es" / "zz-link")  # already read under de/
    (root / "it" / "leggi").write_text("x")

    sources = ts.fortune_sources(root)
    assert sources[:27] == [(root / name, "english") for name in ts.FORTUNES_ENGLISH]
    assert sources[27:] == [
        (root / "brasil", "portuguese"),
        (root / "de" / "anekdoten", "german"),
        (root / "de" / "zitate", "german"),
        (root / "it" / "leggi", "italian"),
    ]


CMUDICT_SAMPLE = """\
'bout B AW1 T
aardvark AA1 R D V AA2 R K
aardvark(2) AA1 R D V AA0 R K
abba AE1 B AH0 # name, swedish
ab AE1 B
hmm HH M
a.m. EY2 EH1 M
education EH2 JH AH0 K EY1 SH AH0 N
abbreviation AH0 B R IY2 V IY0 EY1 SH AH0 N
abbreviation AH0 B R IY2 V IY0 EY1 SH AH0 N Z
universality Y UW2 N AH0 V ER0 S AE1 L AH0 T IY0
individuality IH2 N D IH0 V IH0 JH UW0 AE1 L IH0 T IY0
"""


def test_parse_cmudict() -> None:
    assert list(ts.parse_cmudict(CMUDICT_SAMPLE.splitlines())) == [
        ("aardvark", "2"),  # "aardvark(2)" is an alternate pronunciation
        ("abba", "2"),  # trailing "# ..." comment dropped
        ("education", "4"),
        ("abbreviation", "5+"),  # the repeat with a different pronunciation is ignored
        ("universality", "5+"),
        ("individuality", "5+"),
    ]


def _nam_line(marker: str, name: str, marks: dict[int, str]) -> str:
    """A nam_dict.txt line: gender code in columns 0-2, name in 3-28, one character per country from 30."""
    countries = "".join(marks.get(column, " ") for column in range(55))
    return f"{marker:<3}{name:<26} {countries} $"


def test_nam_line_helper_matches_the_file_layout() -> None:
    real = "M  Aad                                  4                                             $\r\n"
    assert _nam_line("M", "Aad", {10: "4"}) == real.rstrip("\r\n")
    assert list(ts.parse_nam_dict([real])) == [("Aad", "german-dutch")]  # the file has CRLF line ends


def test_parse_nam_dict() -> None:
    lines = [
        "# comment line                                                                        $",
        "short line",
        _nam_line("M", "Aad", {10: "4"}),  # the Netherlands -> german-dutch
        _nam_line("F", "Giulia", {3: "9", 4: "2"}),  # Italy + Malta: one region
        _nam_line("F", "Maria", {3: "9", 5: "8"}),  # italian and iberian: no single region
        _nam_line("M", "Hiro", {51: "5"}),  # Japan -> east-asian
        _nam_line("M", "Ravi", {50: "6"}),  # India/Sri Lanka -> indian
        _nam_line("?", "Chris", {0: "7", 54: "1"}),  # other countries (unused) do not count
        _nam_line("M", "Nobody", {54: "3"}),  # listed only under other countries
        _nam_line("=", "Abe Abraham", {0: "1"}),  # an equivalence line: not a single name
        _nam_line("M", "Ådne", {17: "1"}),  # not [A-Za-z]
        _nam_line("M", "J", {0: "1"}),  # too short
        _nam_line("F", "Anne", {8: "+", 16: "-"}),  # any non-blank mark counts: french + nordic
    ]
    assert list(ts.parse_nam_dict(lines)) == [
        ("Aad", "german-dutch"),
        ("Giulia", "italian"),
        ("Hiro", "east-asian"),
        ("Ravi", "indian"),
        ("Chris", "english"),
    ]


def test_name_regions_cover_the_54_country_columns_once() -> None:
    columns = [column for _, region_columns in ts.NAME_REGIONS for column in region_columns]
    assert sorted(columns) == list(range(54))
    assert len(ts.NAME_REGIONS) == 14


VADER_SAMPLE = (
    "$:\t-1.5\t0.80623\t[-1, -1, -1, -1, -3, -1, -3, -1, -2, -1]\n"
    "abandon\t-1.9\t0.53852\t[-1, -2, -2, -2, -2, -3, -2, -2, -1, -2]\n"
    "awful\t-2.0\t0.6\t[-2, -2, -2, -2, -2, -2, -2, -2, -2, -2]\n"
    "meh\t0.0\t0.5\t[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]\n"
    "good-hearted\t2.0\t0.5\t[2, 2, 2, 2, 2, 2, 2, 2, 2, 2]\n"
    "can't\t-0.1\t0.3\t[0, 0, 0, 0, 0, 0, 0, 0, 0, -1]\n"
    "okay\t1.9\t0.4\t[2, 2, 2, 2, 2, 2, 2, 2, 1, 2]\n"
    "b4\t0.1\t0.3\t[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]\n"
    "x\t0.5\t0.3\t[1, 0, 0, 0, 1, 0, 0, 1, 1, 1]\n"
)


def test_parse_vader() -> None:
    assert list(ts.parse_vader(VADER_SAMPLE.splitlines(keepends=True))) == [
        ("abandon", "weak-negative"),
        ("awful", "strong-negative"),  # v <= -2
        ("meh", "weak-positive"),  # 0 <= v < 2
        ("good-hearted", "strong-positive"),  # v >= 2
        ("can't", "weak-negative"),
        ("okay", "weak-positive"),
    ]
