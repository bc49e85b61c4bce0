"""ndbench download: fetch a dataset's published files, check them, and lay them out exactly
as `build-splits` reads them by default.

Per file of the dataset's table (`download_table`): skip it when it is already in place,
else download it (`transfer.fetch`: a part file, resumed after a broken connection), check
its published checksum (or its size when only that is published), move it to its final name,
and extract archives safely (`archives.extract`). Each extracted archive leaves a marker in
`<root>/.ndbench-download/`, so a re-run makes no request and reads no archive. While an
archive is moved into place another marker says so: a tree it leaves behind (a process killed
mid-move) is extracted again by the next run, never taken for one laid out by hand.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from rich.console import Console
from rich.filesize import decimal

from . import download_table
from .archives import DamagedArchive, extract
from .atomic import atomic_write_text
from .download_table import RemoteFile
from .errors import NdbenchError
from .sources import default_root
from .transfer import fetch, file_digest

STATE_FOLDER = ".ndbench-download"
ONLY_CHOICES = ("annotations",)
MIRROR_SCHEMES = ("http", "https", "file")
Table = Mapping[tuple[str, int | None], tuple[RemoteFile, ...]]


@dataclass(frozen=True)
class DownloadRequest:
    """What to fetch and where to put it."""

    dataset: str
    root: Path | None = None  # default: $NDBENCH_DATA/<dataset>, else data/<dataset>
    year: int | None = None  # voc: 2012 (default) or 2007; coco: 2014 (default) or 2017
    mirror: str | None = None  # serves each file at <mirror>/<dataset>/<file name>
    only: str | None = None  # "annotations" (coco): no images
    force: bool = False  # fetch and extract again what is in place
    keep_archives: bool = False  # keep archives under <root>/.ndbench-download/ once extracted


@dataclass(frozen=True)
class Plan:
    """A validated request: the dataset, its year, the root and the files to put there."""

    dataset: str
    year: int | None
    root: Path
    files: tuple[RemoteFile, ...]
    mirror: str | None
    default_year: int | None = None  # the year build-splits reads when given no --year

    def url(self, file: RemoteFile) -> str:
        """Where `file` is fetched from: the official URL, or `<mirror>/<dataset>/<name>`."""
        if self.mirror is None:
            return file.url
        return f"{self.mirror.rstrip('/')}/{self.dataset}/{quote(file.name)}"


@dataclass
class DownloadResult:
    """What a download did, file by file: "downloaded", "present" (verified earlier) or
    "found" (laid out by hand, so not verified)."""

    plan: Plan
    outcomes: list[tuple[RemoteFile, str]] = field(default_factory=list)


def downloadable(table: Table | None = None) -> tuple[str, ...]:
    """The datasets the download command knows, in table order."""
    return tuple(dict.fromkeys(dataset for dataset, _ in (table or download_table.TABLE)))


def plan_download(request: DownloadRequest, table: Table | None = None) -> Plan:
    """Validate a request (dataset, year, --only, mirror, root) before anything is fetched."""
    table = table if table is not None else download_table.TABLE
    known = downloadable(table)
    if request.dataset == "embedded":
        raise NdbenchError(
            "the embedded dataset is generated, there is nothing to download",
            "run `ndbench build-splits embedded` (or `ndbench demo`)",
        )
    if request.dataset not in known:
        raise NdbenchError(f"cannot download {request.dataset!r}", f"use one of {', '.join(known)}")
    years = [year for dataset, year in table if dataset == request.dataset]
    if request.year is None:
        year = years[0]
    elif request.year in years:
        year = request.year
    elif years == [None]:
        raise NdbenchError(f"{request.dataset} has no --year", "drop --year")
    else:
        raise NdbenchError(
            f"no {request.dataset} {request.year} download", f"use --year {' or '.join(map(str, years))}"
        )
    files = table[(request.dataset, year)]
    if request.only is not None:
        if request.only not in ONLY_CHOICES:
            raise NdbenchError(f"unknown --only {request.only!r}", f"use {' or '.join(ONLY_CHOICES)}")
        annotations = tuple(f for f in files if f.annotations)
        if not annotations or len(annotations) == len(files):
            raise NdbenchError(
                f"--only annotations does not apply to {request.dataset}: its annotations are not a "
                "separate download",
                "drop --only (it applies to coco)",
            )
        files = annotations
    mirror = _check_mirror(request.mirror)
    root = Path(request.root) if request.root is not None else default_root(request.dataset)
    if root.exists() and not root.is_dir():
        raise NdbenchError(f"--root {root} is a file, not a folder", "pass a folder with --root")
    return Plan(request.dataset, year, root, files, mirror, default_year=years[0])


def _check_mirror(mirror: str | None) -> str | None:
    """The mirror URL, stripped (None when unset or blank); NdbenchError when it is not one."""
    if mirror is None or not mirror.strip():
        return None
    try:
        parts = urlsplit(mirror.strip())
        parts.port  # noqa: B018 - parses the port: ValueError when it is not a number
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme not in MIRROR_SCHEMES or (parts.scheme != "file" and not parts.netloc):
        raise NdbenchError(
            f"mirror {mirror!r} is not an http(s):// or file:// URL",
            "pass --mirror like https://host/path or file:///data/archives (files at <mirror>/<dataset>/<file name>)",
        )
    return mirror.strip()


def download_dataset(
    request: DownloadRequest, *, table: Table | None = None, console: Console | None = None
) -> DownloadResult:
    """Fetch, check and lay out every file of a request; files in place are skipped."""
    plan = plan_download(request, table)
    console = console or Console(stderr=True)
    result = DownloadResult(plan)
    where = f" from the mirror {plan.mirror}" if plan.mirror else ""
    year = f" {plan.year}" if plan.year else ""
    _say(console, f"{plan.dataset}{year}: {len(plan.files)} file(s) into {plan.root}{where}")
    state = plan.root / STATE_FOLDER
    new_folders = [folder for folder in (state, *state.parents) if not folder.exists()]
    try:
        state.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NdbenchError(f"cannot write to {plan.root}: {exc.strerror or exc}", "pass a writable --root") from exc
    try:
        for file in plan.files:
            result.outcomes.append((file, _ensure(file, plan, request, console)))
    except BaseException:
        _remove_empty(new_folders)  # a failed first try leaves no empty --root behind
        raise
    return result


def _remove_empty(folders: list[Path]) -> None:
    """Remove each folder (deepest first) that is still empty; keep any that holds a file."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _say(console: Console, text: str) -> None:
    """One status line, never wrapped (URLs stay whole) and never read as rich markup."""
    console.print(text, soft_wrap=True, markup=False, highlight=False)


def _marker(plan: Plan, file: RemoteFile) -> Path:
    return plan.root / STATE_FOLDER / f"{file.name}.done.json"


def _unfinished_marker(plan: Plan, file: RemoteFile) -> Path:
    """Present from the start of an extraction until its done-marker is written."""
    return plan.root / STATE_FOLDER / f"{file.name}.extracting"


def _marker_body(file: RemoteFile, url: str, files: int) -> dict:
    return {"name": file.name, "url": url, "size": file.size, "md5": file.md5, "sha256": file.sha256,
            "extracted_into": file.target or ".", "files": files}  # fmt: skip


def _marker_matches(path: Path, file: RemoteFile) -> bool:
    """A marker left by extracting this very file (same published checksum and size)."""
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and all(
        body.get(key) == getattr(file, key) for key in ("name", "size", "md5", "sha256")
    )


def _ensure(file: RemoteFile, plan: Plan, request: DownloadRequest, console: Console) -> str:
    """Put one file in place; returns "downloaded", "present" or "found"."""
    url = plan.url(file)
    in_place = all((plan.root / path).exists() for path in file.provides)
    if file.archive:
        marker, unfinished = _marker(plan, file), _unfinished_marker(plan, file)
        if not request.force and _marker_matches(marker, file) and in_place:
            _say(console, f"{file.name}: already downloaded and extracted, skipped")
            return "present"
        if unfinished.exists():
            _say(console, f"{file.name}: an earlier extraction into {plan.root / file.target} did not finish; "
                          "extracting it again")
        elif not request.force and file.provides and in_place and not marker.exists():
            _say(console, f"{file.name}: {', '.join(file.provides)} already there (not checked; --force "
                          "downloads it again), skipped")
            return "found"
        archive = plan.root / STATE_FOLDER / file.name
        _obtain(file, url, archive, console, reuse=not request.force)
        count = _extract(file, plan, archive, url, console)
        _say(console, f"{file.name}: extracted {count} files into {plan.root / file.target}")
        if not request.keep_archives:
            archive.unlink()
        return "downloaded"
    dest = plan.root / file.target
    if not request.force and dest.is_file():
        if _problem(file, dest, console) is None:
            _say(console, f"{file.name}: already in place and {_verified(file)}, skipped")
            return "present"
        _say(console, f"{file.name}: {dest} fails its check, downloading it again")
    _obtain(file, url, dest, console, reuse=False)  # checked above already
    return "downloaded"


def _extract(file: RemoteFile, plan: Plan, archive: Path, url: str, console: Console) -> int:
    """Extract a checked archive into place and mark it done; returns the number of files. The
    unfinished-marker is written first and removed only after the done-marker, so a tree left
    by a killed run is never trusted."""
    marker, unfinished = _marker(plan, file), _unfinished_marker(plan, file)
    atomic_write_text(unfinished, json.dumps({"name": file.name, "extracting_into": file.target or "."}) + "\n")
    marker.unlink(missing_ok=True)  # what it vouched for is about to change
    try:
        count = extract(archive, plan.root / file.target, skip=file.skip, console=console)
    except DamagedArchive as exc:
        if file.checksum is not None:
            raise
        archive.unlink(missing_ok=True)  # unverified: never reuse an archive that does not extract
        raise NdbenchError(
            f"{exc.problem}; the download was deleted",
            "run the same command again to download it afresh; if it fails again the host (or mirror) "
            "serves another file: use another --mirror, or fetch it by hand into the layout of README 'Datasets'",
        ) from exc
    atomic_write_text(marker, json.dumps(_marker_body(file, url, count), indent=1) + "\n")
    unfinished.unlink()
    return count


def _obtain(file: RemoteFile, url: str, dest: Path, console: Console, reuse: bool) -> None:
    """`dest` holds the checked file afterwards: with `reuse`, the one an earlier run left if
    it passes its check; else a new download, which replaces `dest` only once it passes (a
    failing download is deleted and ends the command)."""
    if reuse and dest.is_file():
        if _problem(file, dest, console) is None:
            _say(console, f"{file.name}: found a complete download ({_verified(file)})")
            return
        dest.unlink()
    size = decimal(file.size) if file.size else "(size not published)"
    _say(console, f"{file.name}: downloading {size} from {url}")
    algorithm = file.checksum[0] if file.checksum else None
    fetched = fetch(url, dest, algorithm=algorithm, expected_size=file.size, console=console, label=file.name)
    problem = _mismatch(file, fetched.digest, fetched.size)
    if problem is not None:
        fetched.path.unlink(missing_ok=True)
        raise NdbenchError(
            f"{file.name} from {url}: {problem}; the download was deleted",
            "run again to download it afresh; if it fails again the host (or mirror) serves another "
            "file: fetch it by hand into the layout of README 'Datasets'",
        )
    os.replace(fetched.path, dest)
    _say(console, f"{file.name}: {_verified(file)}")


def _problem(file: RemoteFile, path: Path, console: Console) -> str | None:
    """Why a file on disk is not the published one, or None."""
    if file.checksum is None:
        return _mismatch(file, None, path.stat().st_size)
    algorithm, _ = file.checksum
    large = path.stat().st_size > 100_000_000
    digest = file_digest(path, algorithm, console, label=f"checking {file.name}" if large else None)
    return _mismatch(file, digest, path.stat().st_size)


def _mismatch(file: RemoteFile, digest: str | None, size: int) -> str | None:
    """Compare with the published checksum; only with no checksum, with the published size."""
    if file.checksum is not None:
        algorithm, expected = file.checksum
        return None if digest == expected else f"{algorithm} {digest} does not match the published {expected}"
    if file.size is not None and size != file.size:
        return f"{size} bytes, the published size is {file.size}"
    return None


def _verified(file: RemoteFile) -> str:
    if file.checksum is not None:
        return f"{file.checksum[0]} verified"
    if file.size is not None:
        return "size verified (no checksum published)"
    return "not verified (no checksum or size published; a zip's CRC-32s are checked on extraction)"


def build_splits_hint(plan: Plan) -> str:
    """The `build-splits` command that reads what was downloaded."""
    command = f"ndbench build-splits {plan.dataset}"
    if plan.root != default_root(plan.dataset):
        command += f" --root {plan.root}"
    if plan.year != plan.default_year:
        command += f" --year {plan.year}"
    return command
