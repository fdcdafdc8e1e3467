"""Where outputs go, so that no run deletes, replaces or leaves behind anything it did not write.

- `check_output_path` refuses, before any work, an output that is the current directory or one of its
  ancestors, that is, contains or lies inside an input, or that holds anything but a hubmerge output (which
  alone `--overwrite` replaces); it also checks that the parent can be written.
- `output_lock` makes one run at a time own an output path (an flock on `.NAME.lock` beside it), so a
  second run to the same output fails at once, naming the first one's pid.
- `atomic_directory` stages the output in a hidden sibling named with the owner's pid, removes the staging
  siblings that killed runs left (their owner process is gone), and renames the result into place last,
  refusing to replace what appeared meanwhile without `--overwrite`.
- `read_manifest` (the JSON object) and `read_record` (a `hubmerge.record.RunRecord`) are the one reader of an
  output's `hubmerge.json`: a missing, garbled or foreign one is an `ArtifactFormatError` naming it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from hubmerge.errors import ArtifactFormatError, HubmergeError, OutputError

if TYPE_CHECKING:
    from hubmerge.record import RunRecord

MANIFEST = "hubmerge.json"
# Files of an output that its run record does not hash: the record itself, and the card, which is rewritten for
# each push and evaluation.
UNHASHED = frozenset({MANIFEST, "README.md", "mask_agreement.png"})
MANIFEST_FORMATS = ("hubmerge-compressed", "hubmerge-merged", "hubmerge-task")
# Hidden siblings of an output `NAME`: `.NAME.<kind>-<pid>-<random>`, the pid telling whether a run owns it.
SIBLING_KINDS = ("old", "partial", "search")

log = logging.getLogger("hubmerge")


def read_manifest(directory: Path, what: str = "output") -> dict[str, Any]:
    """The run record of an output directory as its JSON object, checked to be one that hubmerge wrote (and
    to validate as a `RunRecord`).

    Args:
        directory: the output directory.
        what: what the directory should be, in the message when it is not hubmerge's (`output`, `artifact`).

    Raises:
        ArtifactFormatError: naming hubmerge.json (`.path`), when it is missing, unreadable or not hubmerge's.
    """
    return _load_record(directory, what)[0]


def read_record(directory: Path, what: str = "output") -> RunRecord:
    """The run record of an output directory as a `RunRecord` (see `read_manifest`)."""
    return _load_record(directory, what)[1]


def _load_record(directory: Path, what: str) -> tuple[dict[str, Any], RunRecord]:
    from pydantic import ValidationError

    from hubmerge.record import RunRecord

    path = Path(directory) / MANIFEST
    if not path.is_file():
        # an artifact may be a Hub snapshot, which has no folder at all when the repo holds no artifact files
        absent = (
            "no such directory" if what == "output" and not Path(directory).is_dir() else f"no {MANIFEST}"
        )
        raise ArtifactFormatError(f"{directory}: not a hubmerge {what} ({absent})", path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactFormatError(
            f"{path}: unreadable run record ({err}); the output is damaged", path=path
        ) from err
    if not isinstance(data, dict) or data.get("format") not in MANIFEST_FORMATS:
        raise ArtifactFormatError(
            f"{path}: not a hubmerge run record (no format {' or '.join(MANIFEST_FORMATS)})", path=path
        )
    problem = _record_problem(data)
    if problem:
        raise ArtifactFormatError(f"{path}: damaged run record ({problem})", path=path)
    try:
        record = RunRecord.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ArtifactFormatError(f"{path}: damaged run record ({where}: {first['msg']})", path=path) from err
    return data, record


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is malformed in the fields every reader of a run record relies on, if anything."""
    if record.get("result") not in ("merged", "compressed", "task"):
        return "result is not merged, compressed or task"
    if not isinstance(record.get("method"), str):
        return "method is missing"
    base = record.get("base")
    if not isinstance(base, dict) or not all(isinstance(base.get(k), str) for k in ("source", "location")):
        return "base needs a source and a location"
    tasks = record.get("tasks")
    if record["result"] != "task" and (
        not isinstance(tasks, list)
        or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tasks)
    ):
        return "tasks must be a list of {name: ...}"
    files = record.get("files")
    if files is None:
        return None
    if not isinstance(files, dict):
        return "files must map file names to their size and sha256"
    for name, entry in files.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            return f"files: {name!r} is not a path inside the output"
        if (
            not isinstance(entry, dict)
            or type(entry.get("size")) is not int
            or not (isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64)
        ):
            return f"files: {name!r} needs an integer size and a sha256"
    return None


def output_files(directory: Path) -> list[str]:
    """The files of an output that its run record hashes (relative POSIX paths, sorted)."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_file() and path.relative_to(directory).as_posix() not in UNHASHED
    )


def foreign_entries(directory: Path, record: dict[str, Any]) -> list[str]:
    """Files and folders in an output directory that its run record does not list: what hubmerge did not
    write there. None are known for an output written before records listed their files."""
    listed = record.get("files")
    if not isinstance(listed, dict):
        return []
    folders = {parent.as_posix() for name in listed for parent in PurePosixPath(name).parents}
    foreign = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_dir() and not path.is_symlink():
            if name not in folders:
                foreign.append(f"{name}/")
        elif name not in listed and name not in UNHASHED:
            foreign.append(name)
    return foreign


def _foreign_in_output(directory: Path) -> list[str] | None:
    """What `foreign_entries` finds in a hubmerge output directory; None where it holds none. An output is
    replaceable only where this is empty."""
    try:
        return foreign_entries(directory, read_manifest(directory))
    except HubmergeError:
        return None


def is_hubmerge_output(directory: Path) -> bool:
    try:
        read_manifest(directory)
    except HubmergeError:
        return False
    return True


@dataclass(frozen=True)
class OutputState:
    """What a run will do to its output path, for the plan of a dry run."""

    path: Path
    replaces: bool  # an existing hubmerge output is replaced (--overwrite)
    exists: bool

    def describe(self) -> str:
        if self.replaces:
            return f"{self.path} (exists: a hubmerge output, replaced when the run completes)"
        if self.exists:
            return f"{self.path} (exists, empty)"
        return f"{self.path} (new)"


def _within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output_path(
    target: Path, overwrite: bool, inputs: Iterable[tuple[str, Path]] = (), inside: Path | None = None
) -> OutputState:
    """Refuse an output path that would destroy or mix with what hubmerge did not write, before any work.

    Args:
        target: the output directory as given.
        overwrite: whether an existing hubmerge output there may be replaced (only if it holds nothing
            else than what its run record lists).
        inputs: (what, path) of every local input (models, artifacts, caches): the output may be none of
            them, contain none of them and lie inside none of them.
        inside: the one hubmerge output the output may lie in (an artifact's exported task folders); any
            other output around it is refused, since replacing that one would delete this one.

    Returns:
        Whether the output exists and will be replaced.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"output path {target} is a file, not a directory", path=target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, resolved):
        what = "the current directory" if resolved == cwd else f"an ancestor of the current directory ({cwd})"
        raise OutputError(
            f"output {target} is {what}; write the output to a new directory, e.g. out/merge", path=target
        )
    for what, path in inputs:
        source = Path(path).resolve()
        if _within(source, resolved):
            how = "is" if source == resolved else "contains"
            raise OutputError(
                f"output {target} {how} {what} ({source}); choose another output directory", path=target
            )
        if _within(resolved, source):
            raise OutputError(
                f"output {target} lies inside {what} ({source}); choose another output directory", path=target
            )
    allowed = Path(inside).resolve() if inside is not None else None
    for ancestor in resolved.parents:
        if ancestor != allowed and is_hubmerge_output(ancestor):
            raise OutputError(
                f"output {target} lies inside the hubmerge output {ancestor}; choose a directory outside it",
                path=target,
            )
    exists = target.is_dir()
    replaces = False
    if exists and any(target.iterdir()):
        foreign = _foreign_in_output(target)
        if foreign is None:
            raise OutputError(
                f"output directory {target} is not empty and holds no hubmerge output (no valid {MANIFEST}); "
                "--overwrite replaces only a previous hubmerge output: choose another directory",
                path=target,
            )
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" (+{len(foreign) - 3} more)" if len(foreign) > 3 else "")
            raise OutputError(
                f"output directory {target} holds a hubmerge output and files hubmerge did not write there "
                f"({shown}); --overwrite would delete them: move them out or choose another directory",
                path=target,
            )
        if not overwrite:
            raise OutputError(
                f"output directory {target} holds a previous hubmerge output (pass --overwrite to replace it)",
                path=target,
            )
        replaces = True
    _check_writable(target, resolved.parent)
    return OutputState(target, replaces, exists)


def _check_writable(target: Path, parent: Path) -> None:
    """The nearest existing ancestor of the output's parent must be a writable directory."""
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"output path {target}: {existing} is not a directory", path=target)
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OutputError(f"output path {target}: {existing} is on a read-only file system", path=target)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output path {target}: no permission to write in {existing}", path=target)


_held_locks: dict[Path, int] = {}  # output -> the thread of this process that holds its lock


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing ancestors; the ones created, deepest first."""
    created = []
    while not directory.exists():
        created.append(directory)
        directory = directory.parent
    for path in reversed(created):
        path.mkdir(exist_ok=True)
    return created


@contextlib.contextmanager
def output_lock(target: Path) -> Iterator[None]:
    """Own the output path `target` for the block: a second run fails at once, naming this one's pid.

    An flock on `.NAME.lock` beside the output: the kernel releases it when the process dies, however it
    dies. Re-entrant within the thread that holds it; another thread of this process is refused like another
    process. Once held, the siblings that killed runs left are cleaned (`remove_stale_siblings`). Parent
    folders created for the lock are removed again when the block fails and they are still empty.
    """
    target = Path(target).resolve()
    holder = _held_locks.get(target)
    if holder == threading.get_ident():
        yield
        return
    if holder is not None:
        raise _busy(target, f"{os.getpid()}, another thread")
    created = _make_parents(target.parent)
    path = target.parent / f".{target.name}.lock"
    fd = _acquire(path, target)
    _held_locks[target] = threading.get_ident()
    try:
        remove_stale_siblings(target)
        yield
    except BaseException:
        _release(path, fd, target)
        for directory in created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    _release(path, fd, target)


def _acquire(path: Path, target: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise _busy(target, owner) from err
        # The previous owner may have unlinked the file between our open and flock: lock the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)


def _busy(target: Path, owner: str) -> OutputError:
    return OutputError(
        f"output {target} is being written by another hubmerge run (pid {owner}); "
        "wait for it to finish or choose another --output",
        path=target,
    )


def _release(path: Path, fd: int, target: Path) -> None:
    del _held_locks[target]
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    os.close(fd)


_ours: set[Path] = set()  # siblings this process made: its pid may be that of a killed run in a container


def make_sibling(target: Path, kind: str) -> Path:
    """A new hidden directory `.NAME.<kind>-<pid>-<random>` beside the output `target`, owned by this process:
    the next run to `target` removes it if this process dies before it does."""
    target = Path(target).resolve()
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))
    _ours.add(path)
    return path


def _owner_alive(pid: int, path: Path) -> bool:
    if pid == os.getpid():
        return path in _ours
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _disk_usage(path: Path) -> int:
    # st_blocks, not st_size: staged weight files are created at full size and filled in place (sparse).
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def remove_stale_siblings(target: Path) -> tuple[int, int]:
    """Remove the staging, retired and search siblings of `target` whose owner process is gone.

    Returns:
        (directories removed, bytes of disk they used).
    """
    target = Path(target).resolve()
    removed = freed = 0
    if not target.parent.is_dir():
        return removed, freed
    for kind in SIBLING_KINDS:  # "old" before "partial": a previous output is restored before anything goes
        for path in target.parent.glob(f"{glob.escape(f'.{target.name}.{kind}-')}*"):
            pid = path.name.removeprefix(f".{target.name}.{kind}-").split("-", 1)[0]
            if not pid.isdigit() or _owner_alive(int(pid), path) or not path.is_dir():
                continue
            if kind == "old" and (path / "previous").is_dir() and not target.exists():
                # killed between the two renames of a replace: the previous output is whole, put it back
                os.rename(path / "previous", target)
                log.warning("restored %s, left aside by a replace that was interrupted", target)
            freed += _disk_usage(path)
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    if removed:
        log.warning(
            "removed %d staging director%s of %s left by interrupted runs (%.1f MB)",
            removed,
            "y" if removed == 1 else "ies",
            target,
            freed / 1e6,
        )
    return removed, freed


@contextlib.contextmanager
def atomic_directory(
    target: Path, overwrite: bool, inputs: Iterable[tuple[str, Path]] = (), inside: Path | None = None
) -> Iterator[Path]:
    """Yield a hidden sibling directory that becomes `target` only when the block completes.

    An interrupted or failed run leaves `target` as it was (absent, or the previous output). The path is
    checked (see `check_output_path`) and locked for the block; at the end, a `target` that appeared
    meanwhile is replaced only with `overwrite` and only if it is a hubmerge output; otherwise the complete
    result is kept beside it under a visible name and the error says where.
    """
    check_output_path(target, overwrite, inputs, inside)
    target = Path(target).resolve()
    with output_lock(target):
        staging = make_sibling(target, "partial")
        try:
            yield staging
            os.chmod(staging, 0o755)  # mkdtemp creates 0700; outputs are ordinary directories
            _put_in_place(staging, target, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def _put_in_place(staging: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        # the rule of `check_output_path`, again: the user may have changed the folder during the run
        replaceable = overwrite and target.is_dir() and _foreign_in_output(target) == []
        if not replaceable:
            kept = target.with_name(f"{target.name}.hubmerge-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}")
            os.rename(staging, kept)
            why = "" if not overwrite else " and holds what hubmerge did not write"
            raise OutputError(
                f"output {target} appeared while this run was writing{why}; nothing was replaced, "
                f"the complete result is in {kept}",
                path=target,
            )
        retired = make_sibling(target, "old")
        os.rename(target, retired / "previous")
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    if target.is_dir():
        target.rmdir()  # an empty directory: rename cannot replace it atomically anyway
    try:
        os.rename(staging, target)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        _put_in_place(staging, target, overwrite)  # filled in the instant between the check and the rename
