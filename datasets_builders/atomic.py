"""Atomic file writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import WriteFailure

# Errors that mean "no room": the fix is to free space, not to pick another folder.
NO_ROOM = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def write_error(path: Path, exc: OSError) -> WriteFailure:
    """The one-line error for an OSError raised while writing `path`."""
    reason = exc.strerror or str(exc)
    if exc.errno in NO_ROOM:
        fix = "free disk space or raise the file-size limit, or choose another --out; then run the same command again"
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_files(files: dict[Path, str | bytes]) -> None:
    """Write several files (text as UTF-8) as one step, in the given order: each is staged beside its
    target before any target is replaced, and a failure or interrupt while replacing puts
    back what the targets held, so a write either lands whole or leaves every file as it was
    (only a hard kill between two replaces can leave some replaced). Symlinks are written
    through; a target that is not a regular file is refused before anything is written."""
    staged: list[tuple[str, Path]] = []
    backups: dict[Path, Path | None] = {}
    replaced: list[Path] = []
    targets = {replaced_file(Path(path)): text for path, text in files.items()}
    path = Path()
    try:
        for path, text in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((tmp, path))
            os.fchmod(fd, new_file_mode())
            with os.fdopen(fd, "wb") as handle:
                handle.write(text.encode("utf-8") if isinstance(text, str) else text)
                handle.flush()
                os.fsync(handle.fileno())
        for _tmp, path in staged:
            backups[path] = _backup(path)
        for tmp, path in staged:
            os.replace(tmp, path)
            replaced.append(path)
    except BaseException as exc:
        for target in reversed(replaced):
            with contextlib.suppress(OSError):
                backup = backups.get(target)
                if backup is None:
                    target.unlink()
                else:
                    os.replace(backup, target)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        for backup in backups.values():
            if backup is not None:
                backup.unlink(missing_ok=True)


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
