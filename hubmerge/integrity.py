"""Content hashes of an output's files: recorded in hubmerge.json when the output is written, checked before
anything rebuilds, scores or publishes from it, so that a damaged file is an error naming it rather than a
silently different model.

SHA-256, the hash the Hub shows for large files, so a file can also be checked with `sha256sum`. The model card
and its plot are left out: they are rewritten for each push and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from hubmerge.errors import ArtifactFormatError
from hubmerge.output import MANIFEST, foreign_entries, output_files, read_manifest
from hubmerge.record import RunRecord

CHUNK_BYTES = 1 << 23
# hashlib releases the GIL on large updates: files are hashed side by side, up to this many at once
HASH_THREADS = 4


class InOrderHash:
    """The SHA-256 of a file written by position, computed while it is written: bytes written at the end of
    the hashed prefix are hashed from memory at once, bytes written ahead of it are read back from the file
    when the prefix reaches them. Bytes written twice, or a file this process did not write whole (several
    processes), leave no digest: the file is then hashed after the run.
    """

    def __init__(self, size: int, head: bytes):
        self._digest = hashlib.sha256(head)
        self._size = size
        self._hashed = len(head)
        self._ahead: dict[int, int] = {}  # offset -> length of bytes written past the hashed prefix
        self._valid = True

    def wrote(self, fd: int, offset: int, data: memoryview) -> None:
        """Bytes `data` were written at `offset` of the file open (readable) as `fd`."""
        if not self._valid or not len(data):
            return
        if offset < self._hashed or offset in self._ahead:
            self._valid = False
            return
        if offset > self._hashed:
            self._ahead[offset] = len(data)
            return
        self._digest.update(data)
        self._hashed += len(data)
        while self._hashed in self._ahead:
            end = self._hashed + self._ahead.pop(self._hashed)
            while self._hashed < end:
                chunk = os.pread(fd, min(CHUNK_BYTES, end - self._hashed), self._hashed)
                self._digest.update(chunk)
                self._hashed += len(chunk)

    def hexdigest(self) -> str | None:
        return self._digest.hexdigest() if self._valid and self._hashed == self._size else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while got := handle.readinto(buffer):
            digest.update(view[:got])
    return digest.hexdigest()


def hash_files(
    directory: Path, names: Iterable[str], known: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """{name: {size, sha256}} of the given files of `directory`; `known` digests (hashed while the files were
    written) are taken as they are."""
    names, known = list(names), known or {}
    todo = [name for name in names if name not in known]
    workers = max(1, min(HASH_THREADS, os.cpu_count() or 1, len(todo)))
    with ThreadPoolExecutor(workers, thread_name_prefix="hubmerge-hash") as pool:
        digests = dict(zip(todo, pool.map(lambda name: file_sha256(directory / name), todo), strict=True))
    return {
        name: {"size": (directory / name).stat().st_size, "sha256": known.get(name) or digests[name]}
        for name in names
    }


def verify_files(directory: Path, record: dict[str, Any], names: Iterable[str] | None = None) -> list[str]:
    """Check files of an output against the hashes its run record lists.

    Args:
        directory: the output directory.
        record: its run record (`read_manifest`).
        names: the files to check (default: every one listed).

    Returns:
        The files checked; none for an output written before hashes were recorded.

    Raises:
        ArtifactFormatError: naming the first file that is missing or differs from its record.
    """
    listed = record.get("files")
    if listed is None:
        return []
    names = list(listed if names is None else names)
    for name in names:
        if name not in listed:
            raise ArtifactFormatError(
                f"{directory / name}: not listed in {MANIFEST}; the output is incomplete",
                path=directory / name,
            )
        path = directory / name
        if not path.is_file():
            raise ArtifactFormatError(
                f"{path}: missing (listed in {MANIFEST}); the output is incomplete", path=path
            )
        if path.stat().st_size != listed[name]["size"]:
            raise ArtifactFormatError(
                f"{path}: {path.stat().st_size:,} bytes, but {MANIFEST} records {listed[name]['size']:,}; "
                "the file is damaged or was changed after the run",
                path=path,
            )
    digests = hash_files(directory, names)
    for name in names:
        if digests[name]["sha256"] != listed[name]["sha256"]:
            raise ArtifactFormatError(
                f"{directory / name}: content differs from the SHA-256 in {MANIFEST}; "
                "the file is damaged or was changed after the run",
                path=directory / name,
            )
    return names


def verify_output(directory: Path) -> list[str]:
    """Check every file of an output against its run record (`hubmerge inspect --verify`, before a push).

    Returns:
        The files checked.

    Raises:
        ArtifactFormatError: for a missing or damaged file, a file the record does not list, or an output
            without recorded hashes.
    """
    directory = Path(directory)
    record = read_manifest(directory)
    if "files" not in record:
        raise ArtifactFormatError(
            f"{directory}: its {MANIFEST} records no file hashes (written by an older hubmerge)",
            path=directory / MANIFEST,
        )
    foreign = foreign_entries(directory, record)
    if foreign:
        raise ArtifactFormatError(
            f"{directory / foreign[0]}: not part of the output written by hubmerge (not in {MANIFEST})",
            path=directory / foreign[0].rstrip("/"),
        )
    return verify_files(directory, record)


def record_hashes(directory: Path, record: dict[str, Any], known: dict[str, str] | None = None) -> None:
    """Hash every file of `directory` into `record["files"]` and write the record as its hubmerge.json.

    Args:
        directory: the output directory.
        record: its run record.
        known: digests of files hashed while they were written (relative names), not read again.
    """
    record["files"] = hash_files(directory, output_files(directory), known)
    write_manifest(directory, record)


def write_manifest(directory: Path, record: dict[str, Any] | RunRecord) -> None:
    """Replace hubmerge.json whole (a crash leaves the old or the new one, never half of one)."""
    staged = directory / f".{MANIFEST}.tmp"
    staged.write_text(
        record.to_json() if isinstance(record, RunRecord) else json.dumps(record, indent=2) + "\n"
    )
    staged.replace(directory / MANIFEST)


# weights_sha256 of files this process hashed, by (path, size, mtime) of each: a search, its final run and the
# scoring of its output open the same local base several times
_WEIGHTS_DIGESTS: dict[tuple[tuple[str, int, int], ...], str] = {}


def weights_sha256(files: list[Path]) -> str:
    """One SHA-256 over a checkpoint's weight files: each file's name and digest, in name order.

    What a compressed artifact records of a local base, to refuse rebuilding its tasks from another one.
    """
    ordered = sorted(files, key=lambda path: path.name)
    stats = [path.stat() for path in ordered]
    identity = tuple(
        (str(p.resolve()), st.st_size, st.st_mtime_ns) for p, st in zip(ordered, stats, strict=True)
    )
    if identity not in _WEIGHTS_DIGESTS:
        workers = max(1, min(HASH_THREADS, os.cpu_count() or 1, len(files)))
        with ThreadPoolExecutor(workers, thread_name_prefix="hubmerge-hash") as pool:
            digests = list(pool.map(file_sha256, ordered))
        lines = "".join(f"{path.name}\0{digest}\n" for path, digest in zip(ordered, digests, strict=True))
        _WEIGHTS_DIGESTS[identity] = hashlib.sha256(lines.encode()).hexdigest()
    return _WEIGHTS_DIGESTS[identity]
