"""Every shipped recipe validates and starts with the command that runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubmerge.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted([*ROOT.glob("recipes/*.yaml"), *ROOT.glob("demo/recipes/*.yaml")])


def test_recipes_are_shipped() -> None:
    assert len(RECIPES) >= 8


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_recipe_validates_and_names_its_command(path: Path) -> None:
    load_recipe(path)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line == f"# hubmerge run {path.relative_to(ROOT).as_posix()}"
