"""The typer classes of the `hubmerge` command line: every failure of a command becomes one `error:` line on
stderr and exit code 2 (the traceback too with -v), and usage lines name arguments the usual way."""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from hubmerge.errors import HubmergeError

# Set by `hubmerge run --num-processes` for its processes: where each writes the error it stopped on.
ERRORS_DIRECTORY = "HUBMERGE_ERRORS"

# typer vendors click and exports only this subclass of click's UsageError (bad values, unknown options,
# missing arguments); its base catches them all.
_UsageError: type[Exception] = typer.BadParameter.__mro__[1]


def _verbose(ctx: typer.Context) -> bool:
    return isinstance(ctx.obj, dict) and bool(ctx.obj.get("verbose"))


def _usage_message(err: Exception) -> str:
    where = getattr(err, "ctx", None)
    hint = f" (see `{where.command_path} -h`)" if where is not None else ""
    return f"{err.format_message()}{hint}"  # type: ignore[attr-defined]


class Group(TyperGroup):
    """Turns every failure of a command into one `error:` line on stderr (the traceback too with -v)."""

    def make_context(self, info_name: str | None, args: list[str], **extra: Any) -> typer.Context:
        try:
            return super().make_context(info_name, args, **extra)
        except _UsageError as err:  # an unknown option before the command
            if type(err).__name__ == "NoArgsIsHelpError":  # typer prints the help for it
                raise
            self._fail(None, err, _usage_message(err), 2)

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HubmergeError as err:
            self._fail(ctx, err, str(err), 2)
        except _UsageError as err:
            self._fail(ctx, err, _usage_message(err), 2)
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except OSError as err:
            if err.errno == errno.EPIPE:  # `hubmerge ... | head`: typer exits quietly
                raise
            what = err.strerror or str(err)
            where = [str(f) for f in (err.filename, err.filename2) if f is not None]
            self._fail(ctx, err, f"{' -> '.join(where)}: {what}" if where else what, 2)
        except Exception as err:
            message = (
                f"internal error, {type(err).__name__}: {err} (please report it; -v prints the traceback)"
            )
            self._fail(ctx, err, message, 1)

    @staticmethod
    def _fail(ctx: typer.Context | None, err: BaseException, message: str, code: int) -> NoReturn:
        if ctx is not None and _verbose(ctx):
            # the cause (a translated library error is chained, `from err`) shows only here; a cause hidden
            # with `from None` is shown too
            err.__suppress_context__ = False
            traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
        errors = os.environ.get(ERRORS_DIRECTORY)
        if errors and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a process of `--num-processes`: the launcher prints one line for the run (the others stop
            # because this one did, and would only report their broken connections)
            report = {"code": code, "message": message}
            (Path(errors) / f"{os.environ.get('RANK', '0')}.json").write_text(json.dumps(report))
        else:
            from hubmerge.display import error_line

            error_line(message)
        raise typer.Exit(code) from None


class Command(TyperCommand):
    def collect_usage_pieces(self, ctx: typer.Context) -> list[str]:
        # typer writes required arguments as {RECIPE}; the convention (and git, hf) is a bare RECIPE
        return [
            piece[1:-1] if piece.startswith("{") and piece.endswith("}") else piece
            for piece in super().collect_usage_pieces(ctx)
        ]
