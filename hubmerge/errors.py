"""The exceptions that the CLI turns into a one-line error message (exit code 2).

`HubmergeError` is the base: every problem with the user's input or environment, reported as one line naming
the culprit. Its subclasses say which kind of thing is at fault and carry it as an attribute, for code that
calls hubmerge as a library:

- `RecipeError`: a recipe (or a file standing in for one: a mergekit config, a lock file), `.field`.
- `SourceError`: a model source that cannot be located or read, `.source` (as written) and `.path`.
- `HubAccessError`: the Hub refused or could not be reached, `.repo_id`.
- `HubSourceError`: both of the above, for a Hub source the Hub refuses (not found, gated, not authorised).
- `ArtifactFormatError`: an output of hubmerge (its `hubmerge.json` or a file it lists) that is missing,
  garbled or not hubmerge's, `.path`.
- `OutputError`: an output path that cannot or may not be written, `.path`.

Where a library exception is translated, it is the `__cause__` (the CLI shows it with -v only).
"""

from __future__ import annotations

from pathlib import Path


class HubmergeError(Exception):
    """A problem with the user's input or environment, reported as one line naming the culprit."""

    def __reduce__(self) -> tuple[object, ...]:
        # the subclasses' keyword arguments are not in `args`: pickle (multiprocessing) the attributes instead
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type[HubmergeError], args: tuple[object, ...], state: dict[str, object]) -> HubmergeError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class RecipeError(HubmergeError):
    """A recipe that cannot be used; `field` is the (first) offending field as dotted path, e.g.
    `models.1.name` or `parameters.k`, or None where the problem is the file as a whole; `path` is the file,
    where it is known."""

    def __init__(self, message: str, *, field: str | None = None, path: str | Path | None = None):
        super().__init__(message)
        self.field = field
        self.path = None if path is None else Path(path)


class SourceError(HubmergeError):
    """A model source that cannot be located or read, with what a list of several such sources shows of it.

    `source` (also `spec`) is the source as the recipe writes it, where known; `path` the local file or
    directory at fault, where there is one. The message is the one-line error for this source alone; `reason`
    is what follows the source in a list (`./a (no such file or directory)`), and `hints`, the advice shared
    by sources with this problem, are said once after the list.
    """

    def __init__(
        self,
        message: str,
        spec: str | None = None,
        reason: str | None = None,
        *,
        missing: bool = False,
        hints: tuple[str, ...] = (),
        path: str | Path | None = None,
    ):
        HubmergeError.__init__(self, message)  # not super(): HubSourceError's next base is HubAccessError
        self.spec, self.reason, self.missing, self.hints = spec, reason or message, missing, hints
        self.path = None if path is None else Path(path)

    @property
    def source(self) -> str | None:
        return self.spec


class HubAccessError(HubmergeError):
    """The Hub refused a request (not found, not authorised, read-only token) or could not be reached;
    `repo_id` is the repository asked for."""

    def __init__(self, message: str, *, repo_id: str | None):
        HubmergeError.__init__(self, message)
        self.repo_id = repo_id


class HubSourceError(SourceError, HubAccessError):
    """A Hub source that the Hub refuses: a `SourceError` of the recipe's source and a `HubAccessError` of
    its repository."""

    def __init__(
        self,
        message: str,
        spec: str,
        reason: str,
        *,
        repo_id: str,
        missing: bool = False,
        hints: tuple[str, ...] = (),
    ):
        SourceError.__init__(self, message, spec, reason, missing=missing, hints=hints)
        self.repo_id = repo_id


class ArtifactFormatError(HubmergeError):
    """An output of hubmerge that is missing, garbled or not hubmerge's; `path` is the file (or directory) at
    fault, e.g. its `hubmerge.json` or a mask file that it lists."""

    def __init__(self, message: str, *, path: str | Path):
        super().__init__(message)
        self.path = Path(path)


class OutputError(HubmergeError):
    """An output path that cannot or may not be written (it holds other files, is read-only, is in use by
    another run, ...); `path` is the output as given."""

    def __init__(self, message: str, *, path: str | Path):
        super().__init__(message)
        self.path = Path(path)
