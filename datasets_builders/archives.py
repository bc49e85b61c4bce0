"""Safe extraction of downloaded tar and zip archives.

The standard library does the reading: tarfile with its "data" filter (PEP 706), which
refuses absolute paths, members climbing out with `..`, links pointing outside and device
files; zipfile, whose reads check each member's CRC-32. torchvision's `extract_archive` calls
`extractall` without that filter, so it is not used. Zip member names are checked here before
anything is written, for the same promise: nothing lands outside the destination.

An archive is unpacked into a staging folder beside its destination, then moved into place:
a folder the destination lacks in one rename, one it already holds (the VOC2007 trainval and
test tarballs fill one tree) entry by entry. A failure or interrupt while moving moves back
what was moved, so the destination keeps its earlier state (the staging folder is wiped on
the next try); the caller's markers cover a process killed outright.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import NdbenchError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


class DamagedArchive(NdbenchError):
    """The archive itself is unreadable or unsafe: a new download is the fix, not the disk."""


def extract(archive: Path, dest: Path, *, skip: tuple[str, ...] = (), console: Console | None = None) -> int:
    """Extract `archive` (tar, tar.gz or zip) into `dest`, leaving out members under the
    top-level folders in `skip`; returns the number of files written."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / f".{archive.name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if archive.name.endswith(TAR_SUFFIXES):
            _extract_tar(archive, staging, skip, console)
        elif archive.name.endswith(".zip"):
            _extract_zip(archive, staging, skip, console)
        else:
            raise ValueError(f"no extractor for {archive.name}")
        try:
            return _move_into_place(staging, dest)
        except OSError as exc:
            raise NdbenchError(f"cannot move the files of {archive.name} into {dest} ({exc})",
                               "check the permissions and free space there") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _bar(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )  # fmt: skip


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    parts = PurePosixPath(name).parts
    return bool(parts) and parts[0] in skip


def _extract_tar(archive: Path, staging: Path, skip: tuple[str, ...], console: Console | None) -> None:
    try:
        with tarfile.open(archive) as tar, _bar(console) as progress:
            members = [m for m in tar.getmembers() if not _skipped(m.name, skip)]
            task = progress.add_task(f"extracting {archive.name}", total=len(members))
            for member in members:
                tar.extract(member, staging, filter="data")
                progress.advance(task)
    except tarfile.FilterError as exc:
        raise DamagedArchive(
            f"{archive.name} holds an unsafe member ({exc}); nothing was extracted",
            "the archive is not the published one; delete it and download again, or use another mirror",
        ) from exc
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DamagedArchive(
            f"cannot extract {archive} ({type(exc).__name__}: {exc})",
            "the archive is damaged; delete it and download again",
        ) from exc


def _extract_zip(archive: Path, staging: Path, skip: tuple[str, ...], console: Console | None) -> None:
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [m for m in bundle.infolist() if not _skipped(m.filename, skip)]
            for member in members:
                _check_zip_member(member, archive)
            with _bar(console) as progress:
                task = progress.add_task(f"extracting {archive.name}", total=len(members))
                for member in members:
                    bundle.extract(member, staging)
                    progress.advance(task)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise DamagedArchive(
            f"{archive} is not a readable zip archive ({exc})",
            "the download is damaged or is not the file (a host may serve an HTML page instead); "
            "delete it and download again, or use another mirror",
        ) from exc
    except OSError as exc:
        raise NdbenchError(f"cannot extract {archive} ({exc})", "check the free space and permissions") from exc


def _check_zip_member(member: zipfile.ZipInfo, archive: Path) -> None:
    """Refuse a member that would land outside the destination, or a symbolic link."""
    name = member.filename
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or "\\" in name or (path.parts and ":" in path.parts[0]):
        raise DamagedArchive(
            f"{archive.name} holds a member {name!r} outside its folder; nothing was extracted",
            "the archive is not the published one; delete it and download again, or use another mirror",
        )
    if stat.S_ISLNK(member.external_attr >> 16):
        raise DamagedArchive(
            f"{archive.name} holds a symbolic link {name!r}; nothing was extracted",
            "the archive is not the published one; delete it and download again, or use another mirror",
        )


def _files(folder: Path) -> Iterator[Path]:
    for base, _, names in os.walk(folder):
        for name in names:
            yield Path(base) / name


def _move_into_place(staging: Path, dest: Path) -> int:
    """Move the extracted tree from `staging` into `dest`; returns its number of files. On a
    failure or interrupt the entries moved so far are moved back, newest first (a file that
    replaced one of the same name stays: the caller's marker says the tree is unfinished)."""
    count = sum(1 for _ in _files(staging))
    placed: list[tuple[Path, Path]] = []
    try:
        _merge(staging, dest, placed)
    except BaseException:
        _roll_back(placed)
        raise
    return count


def _merge(source: Path, target: Path, placed: list[tuple[Path, Path]]) -> None:
    """Move each entry of folder `source` to the same name in folder `target`: a folder that
    `target` lacks in one rename, one it holds by merging into it. Each entry that `target`
    did not hold is recorded in `placed` (before it moves, so an interrupt cannot miss it)."""
    for entry in sorted(source.iterdir()):
        there = target / entry.name
        is_folder = entry.is_dir() and not entry.is_symlink()
        if there.is_dir():
            if not is_folder:
                raise NdbenchError(f"cannot place {there}: a folder of that name is in the way",
                                   f"move {there} aside and run again")
            _merge(entry, there, placed)
            continue
        if os.path.lexists(there):
            if is_folder:
                raise NdbenchError(f"cannot place {there}: a file of that name is in the way",
                                   f"move {there} aside and run again")
        else:
            placed.append((entry, there))
        os.replace(entry, there)


def _roll_back(placed: list[tuple[Path, Path]]) -> None:
    """Move each placed entry back to where it came from, newest first."""
    for source, target in reversed(placed):
        with contextlib.suppress(OSError):  # one not moved yet (interrupted before its rename)
            os.replace(target, source)
