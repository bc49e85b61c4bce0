"""Atomic file writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import WriteFailure

# Errors that mean "no room": the fix is to free space, not to pick another folder.
NO_ROOM = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
# A temporary file of an atomic write untouched this long was left by a killed process (a write
# takes seconds, even of a large model file); a newer one may belong to a live run.
ABANDONED_TMP_AFTER_S = 60 * 60


def write_error(path: Path, exc: OSError) -> WriteFailure:
    """The one-line error for an OSError raised while writing `path`."""
    reason = exc.strerror or str(exc)
    if exc.errno in NO_ROOM:
        fix = "free disk space or raise the file-size limit, or choose another --out; then run the same command again"
    elif exc.errno in (errno.EEXIST, errno.ENOTDIR):  # a file where the path needs a folder
        reason = f"{reason}: a file stands where a folder belongs"
        fix = "move that file away, or choose another --out"
    else:
        fix = "choose a writable output folder with --out"
    return WriteFailure(f"cannot write {path}: {reason}", fix)


def replaced_file(path: Path) -> Path:
    """The file a write to `path` puts in place: `path` with symlinks resolved, so a link is
    written through and stays a link. An existing target that is not a regular file (a
    folder, FIFO, device or socket) is refused with a WriteFailure: the temporary file would
    replace it instead of writing into it."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = target.stat().st_mode
    except OSError:  # nothing there yet (or unreachable: the write itself says why)
        return target
    if not stat.S_ISREG(mode):
        raise WriteFailure(f"cannot write {path}: it is {_kind(mode)}, not a regular file",
                           "write to a regular file or to a path that does not exist yet")
    return target


def _kind(mode: int) -> str:
    """What a non-regular file is, in words: "a folder", "a FIFO", ..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "a special file"


@functools.cache
def new_file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask (read once: setting the
    umask is the only way to read it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """A binary file handle whose content appears at `path` only when the block ends
    without an exception (temporary file in the same folder, then `os.replace`). A symlink
    at `path` is written through; a target that is not a regular file is refused."""
    path = Path(path)
    target = replaced_file(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path.parent, exc) from exc
    try:
        os.fchmod(fd, new_file_mode())  # mkstemp makes 0600: results must be as readable as any file
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and `os.replace`."""
    with atomic_open(path) as handle:
        handle.write(data)


def encode_text(text: str) -> bytes:
    """`text` as UTF-8; a file name the system handed over undecoded (a Latin-1 "caf\\xe9.png"
    is "caf\\udce9.png" in Python) goes back as the name's own bytes, as the file system has it."""
    return text.encode("utf-8", "surrogateescape")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, as `encode_text` encodes it."""
    atomic_write_bytes(path, encode_text(text))


def atomic_write_files(files: dict[Path, str | bytes], remove: Iterable[Path] = ()) -> None:
    """Write several files (text as `encode_text` encodes it) and delete the files `remove` lists, as one step:
    each file is staged beside its target before any target is replaced or deleted, and a
    failure or interrupt while replacing or deleting puts back what the targets held, so a
    write either lands whole or leaves every file as it was (only a hard kill between two
    replaces can leave some replaced). SIGINT and SIGTERM wait while the targets are replaced,
    deleted or put back. Symlinks are written through; a target that is not a regular file is
    refused before anything is written."""
    staged: list[tuple[Path, Path]] = []
    targets = {replaced_file(Path(path)): text for path, text in files.items()}
    doomed = [Path(path) for path in remove if Path(path).is_file() and replaced_file(Path(path)) not in targets]
    path = Path()
    try:
        for path, text in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((Path(tmp), path))
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as handle:
                handle.write(encode_text(text) if isinstance(text, str) else text)
                handle.flush()
                os.fsync(handle.fileno())
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    replace_together(staged, remove=doomed)


def replace_together(staged: list[tuple[Path, Path]], remove: Iterable[Path] = ()) -> None:
    """Put staged files in place as one step: each `(temporary, target)` pair's temporary
    file, written beside its target, replaces the target, and the files `remove` lists are
    deleted. A failure or interrupt while replacing or deleting puts back what the targets
    held, and SIGINT and SIGTERM wait until the targets are replaced or put back, so they end
    all new or all as they were (only a hard kill between two replaces can leave some
    replaced). The temporary files are gone when this returns."""
    doomed = [Path(path) for path in remove]
    backups: dict[Path, Path | None] = {}
    replaced: list[Path] = []
    path = Path()
    try:
        with signals_deferred():
            try:
                for path in [target for _, target in staged] + doomed:
                    backups[path] = _backup(path)
                for tmp, path in staged:
                    os.replace(tmp, path)
                    replaced.append(path)  # no signal lands between the two: they wait
                for path in doomed:
                    path.unlink()
                    replaced.append(path)
            except BaseException:
                _put_back(replaced, backups)
                raise
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)


def _put_back(replaced: list[Path], backups: dict[Path, Path | None]) -> None:
    """Undo replaces, last first: each target gets its backup back, or is removed when it had
    none."""
    for target in reversed(replaced):
        with contextlib.suppress(OSError):
            backup = backups.get(target)
            if backup is None:
                target.unlink()
            else:
                os.replace(backup, target)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs: the first one that arrives meanwhile
    goes to its handler when the block ends. Python runs signal handlers in the main thread
    only, so elsewhere there is nothing to hold."""
    signums = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or None in map(signal.getsignal, signums):
        yield  # (None: a handler set outside Python, which could not be put back)
        return
    held: list[tuple[int, object]] = []

    def hold(signum: int, frame) -> None:
        held.append((signum, frame))

    previous = {signum: signal.signal(signum, hold) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signum, frame = held[0]
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _backup(path: Path) -> Path | None:
    """A hard link to the file at `path` under a temporary name (None when there is no file)."""
    if not path.exists():
        return None
    backup = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.bak.tmp")
    try:
        os.link(path, backup)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, backup)
    return backup


def remove_abandoned_temporaries(folder: Path, older_than_s: float = ABANDONED_TMP_AFTER_S) -> int:
    """Remove the temporary files (`.NAME.*.tmp`) that killed atomic writes left anywhere
    under `folder` once untouched for `older_than_s` seconds; return how many went."""
    removed = 0
    now = time.time()
    for tmp in Path(folder).rglob(".*.tmp"):
        try:
            if tmp.is_file() and not tmp.is_symlink() and now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove: left as it is
            continue
    return removed
