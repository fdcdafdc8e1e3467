"""Lock files: the commit every Hub source of a recipe resolved to, so a merge can be repeated months later."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import yaml

import hubmerge
from hubmerge.errors import RecipeError, SourceError
from hubmerge.hub import HubSource
from hubmerge.recipe import read_yaml

LOCK_VERSION = 1


def lock_path(recipe_path: str | Path) -> Path:
    """`recipe.yaml` -> `recipe.lock.yaml`, next to the recipe."""
    path = Path(recipe_path)
    return path.with_name(f"{path.stem}.lock.yaml")


@dataclass(frozen=True)
class Lock:
    path: Path
    pins: dict[str, str]  # source as written in the recipe -> commit sha

    def check(self, located: dict[str, HubSource]) -> None:
        """Refuse a source that is missing from the lock or now resolves to another commit."""
        for spec, source in located.items():
            pinned = self.pins.get(spec)
            if pinned is None:
                raise RecipeError(
                    f"{self.path}: has no pin for source {spec!r}; re-run `hubmerge lock` on the recipe",
                    field=f"sources.{spec}",
                    path=self.path,
                )
            if pinned != source.sha:
                raise SourceError(
                    f"{spec}: resolves to commit {source.sha} now, but {self.path} pins {pinned}; "
                    f"pin it in the recipe as {source.repo_id}@{pinned}, or re-lock with `hubmerge lock`",
                    spec,
                    f"moved from the locked commit {pinned}",
                )


def write_lock(recipe_path: str | Path, located: dict[str, HubSource]) -> Path:
    """Write `<recipe>.lock.yaml` pinning every Hub source; local sources are not locked."""
    target = lock_path(recipe_path)
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    header = (
        f"# Written by hubmerge {hubmerge.__version__} on {created}: the commit each Hub source of "
        f"{Path(recipe_path).name} resolved to.\n"
        f"# hubmerge run {Path(recipe_path).name} --locked   (refuses to run if a source has moved)\n"
    )
    body = {"version": LOCK_VERSION, "sources": {spec: s.sha for spec, s in located.items()}}
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(header + yaml.safe_dump(body, sort_keys=False))
    tmp.replace(target)
    return target


def read_lock(recipe_path: str | Path) -> Lock:
    path = lock_path(recipe_path)
    if not path.is_file():
        raise RecipeError(
            f"--locked: {path} not found; create it with `hubmerge lock {recipe_path}`", path=path
        )
    data = read_yaml(path)
    sources = data.get("sources") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("version") != LOCK_VERSION
        or not isinstance(sources, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in sources.items())
    ):
        raise RecipeError(
            f"{path}: not a hubmerge lock file (version {LOCK_VERSION}, `sources: {{id: sha}}`)", path=path
        )
    return Lock(path, dict(sources))
