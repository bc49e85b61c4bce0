"""Safe extraction of downloaded tar and zip archives.

The standard library does the reading: tarfile with its "data" filter (PEP 706), which
refuses absolute paths, members climbing out with `..`, links pointing outside and device
files; zipfile, whose reads check each member's CRC-32. torchvision's `extract_archive` calls
`extractall` without that filter, so it is not used. Zip member names are checked here before
anything is written, for the same promise: nothing lands outside the destination.

An archive is unpacked into a staging folder beside its destination, then its files are
moved into place, so an interrupted extraction leaves no half-extracted tree under the final
names (the staging folder is wiped on the next try).
"""

from __future__ import annotations

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
        return _move_into_place(staging, dest)
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
        raise NdbenchError(
            f"{archive.name} holds an unsafe member ({exc}); nothing was extracted",
            "the archive is not the published one; delete it and download again, or use another mirror",
        ) from exc
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise NdbenchError(
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
        raise NdbenchError(
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
        raise NdbenchError(
            f"{archive.name} holds a member {name!r} outside its folder; nothing was extracted",
            "the archive is not the published one; delete it and download again, or use another mirror",
        )
    if stat.S_ISLNK(member.external_attr >> 16):
        raise NdbenchError(
            f"{archive.name} holds a symbolic link {name!r}; nothing was extracted",
            "the archive is not the published one; delete it and download again, or use another mirror",
        )


def _files(folder: Path) -> Iterator[Path]:
    for base, _, names in os.walk(folder):
        for name in names:
            yield Path(base) / name


def _move_into_place(staging: Path, dest: Path) -> int:
    """Move every extracted file from `staging` to the same place under `dest` (merging
    folders: the VOC2007 trainval and test tarballs fill one tree)."""
    moved = 0
    for source in _files(staging):
        target = dest / source.relative_to(staging)
        if target.is_dir():
            raise NdbenchError(
                f"cannot place {target}: a folder of that name is in the way", f"move {target} aside and run again"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        moved += 1
    return moved
