"""Fetch one URL into a file: streamed to `<file>.part`, resumed with an HTTP Range request
after a broken connection, hashed while it streams, shown as a rich progress bar.

Written here rather than taken from a library: torchvision's `download_url` and pooch neither
resume a partial file nor report through rich, and the datasets here are gigabytes (COCO
train2014 is 13.5 GB), where restarting from zero after a dropped connection is the failure
this module exists to avoid. The transfer itself is the standard library's urllib (which
also follows redirects and reads `file://` mirrors); checksums are hashlib's (torchvision's
`check_integrity` knows only md5, and the COCO and trainaug checksums are sha256).
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .errors import NdbenchError

# One socket timeout for connecting and for each read (urllib has one for both): short, so
# that a machine without network gives up in seconds, not minutes. A read that stalls this
# long mid-file is treated as a broken connection and resumed.
TIMEOUT_S = 6.0
# A broken connection is resumed at most this many times in one run, and only when the last
# try brought bytes, so a dead host never keeps the command in a retry loop.
MAX_RESUMES = 10
CHUNK = 1 << 20
USER_AGENT = "ndbench-download"


@dataclass(frozen=True)
class Fetched:
    """A complete download, still under its part name: path, size and hex digest (of the
    algorithm asked for, or None)."""

    path: Path
    size: int
    digest: str | None


def part_path(path: Path) -> Path:
    """Where `path` is written while it downloads."""
    return path.with_name(path.name + ".part")


def progress_bar(console: Console | None) -> Progress:
    """A transfer bar: name, bar, bytes done / total, rate and time left."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def file_digest(path: Path, algorithm: str, console: Console | None = None, label: str | None = None) -> str:
    """Hex digest of a file (with a progress bar when `label` is given)."""
    hasher = hashlib.new(algorithm)
    if label is None:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, lambda: hasher).hexdigest()
    with progress_bar(console) as progress:
        task = progress.add_task(label, total=path.stat().st_size)
        _hash_into(path, hasher, progress, task)
    return hasher.hexdigest()


def fetch(
    url: str, dest: Path, *, algorithm: str | None, expected_size: int | None, console: Console | None, label: str
) -> Fetched:
    """Download `url` to `<dest>.part`, resuming a partial file left by an earlier run (or a
    connection that broke in this one) when the server honours Range, restarting it cleanly
    when it does not. Leaves `dest` untouched: the caller checks the digest, then renames."""
    part = part_path(dest)
    part.parent.mkdir(parents=True, exist_ok=True)
    resumes = 0
    progress = progress_bar(console)
    task = None  # the bar starts once the host answers: an unreachable host prints only the error
    try:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            _check_free_space(part.parent, expected_size, offset)
            try:
                response = _open(url, offset, resumes)
            except _RangeRefused:
                # HTTP 416: the part is as long as the file or longer; start it again (without
                # a Range header this cannot recur).
                part.unlink()
                continue
            with response:
                if task is None:
                    progress.start()
                    task = progress.add_task(label, total=expected_size)
                hasher, start, total = _start(response, part, offset, algorithm, progress, task)
                progress.update(task, total=total if total is not None else expected_size, completed=start)
                received, broke = _stream(response, part, start, hasher, progress, task)
            size = start + received
            if broke is None and (total is None or size == total):
                return Fetched(part, size, hasher.hexdigest() if hasher is not None else None)
            why = broke or f"the server sent {size} of {total} bytes"
            resumes += 1
            if received == 0 or resumes > MAX_RESUMES:
                raise NdbenchError(
                    f"download of {url} broke off at {size} bytes ({why})",
                    "run the same command again: it resumes where it stopped",
                )
            progress.console.print(f"{label}: connection broke at {size} bytes ({why}); resuming", markup=False,
                                   soft_wrap=True)
    finally:
        if task is not None:
            progress.stop()


def _open(url: str, offset: int, resumes: int):
    """The response to a GET of `url` from byte `offset`; network failures become one line."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            raise _RangeRefused from exc
        raise NdbenchError(
            f"{url} answered HTTP {exc.code} {exc.reason}",
            "the file is not where it was; pass --mirror URL serving <mirror>/<dataset>/<file name>, "
            "or download it by hand into the layout of README 'Datasets'",
        ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        stage = "lost the connection to" if resumes else "cannot reach"
        raise NdbenchError(
            f"{stage} {url} ({reason})",
            "check the network, pass --mirror URL (or set NDBENCH_MIRROR) serving "
            "<mirror>/<dataset>/<file name>, or download the files by hand into the layout of "
            "README 'Datasets'",
        ) from exc


class _RangeRefused(Exception):
    """The server refused to resume (HTTP 416)."""


def _start(response, part: Path, offset: int, algorithm: str | None, progress: Progress, task):
    """Whether the response continues the part file or starts it afresh: (hasher fed with
    the bytes kept, bytes kept, total size when the response says, else None)."""
    status = getattr(response, "status", None)  # None for file:// URLs
    length = response.headers.get("Content-Length")
    remaining = int(length) if length and length.isdigit() else None
    hasher = hashlib.new(algorithm) if algorithm else None
    if offset > 0 and status == 206 and _range_start(response) == offset:
        if hasher is not None:
            progress.update(task, total=None)
            _hash_into(part, hasher, progress, task)
        start = offset
    else:
        # Nothing to resume, or the server ignored Range (200): start the part file clean.
        part.write_bytes(b"")
        start = 0
    return hasher, start, (start + remaining if remaining is not None else None)


def _range_start(response) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    unit, _, spec = content_range.partition(" ")
    first = spec.partition("-")[0]
    return int(first) if unit == "bytes" and first.isdigit() else None


def _stream(response, part: Path, start: int, hasher, progress: Progress, task) -> tuple[int, str | None]:
    """Append the body to the part file; (bytes received, why it broke off or None)."""
    received = 0
    with part.open("ab") as handle:
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, short reads
                handle.flush()
                return received, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if not chunk:
                return received, None
            handle.write(chunk)
            if hasher is not None:
                hasher.update(chunk)
            received += len(chunk)
            progress.update(task, completed=start + received)


def _check_free_space(folder: Path, expected_size: int | None, have: int) -> None:
    if expected_size is None:
        return
    free = shutil.disk_usage(folder).free
    needed = expected_size - have
    if needed > free:
        raise NdbenchError(
            f"{folder} has {free / 1e9:.1f} GB free, the download needs {needed / 1e9:.1f} GB more",
            "free some space or pass --root on a larger disk",
        )


def _hash_into(path: Path, hasher, progress: Progress, task) -> None:
    done = 0
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            hasher.update(chunk)
            done += len(chunk)
            progress.update(task, completed=done)
