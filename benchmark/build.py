"""`ndbench build-splits DATASET`: dataset index + every requested split manifest, written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from datasets_builders.atomic import atomic_write_files
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, build_command, natural_key
from datasets_builders.sources import RECIPE_FILE, BuiltinSource, build_index, check_dataset
from datasets_builders.splits import (
    ALL_VS_ONE_NAME,
    SETTINGS,
    UNI_CLASS_NAME,
    DegenerateSplit,
    Manifest,
    all_vs_one_split,
    multi_class_split,
    protocol_classes,
    protocol_splits,
    uni_class_split,
)


@dataclass(frozen=True)
class BuildRequest:
    """What to build: a dataset, where its sources are, which settings/classes."""

    dataset: str
    root: Path | None = None
    out: Path = Path("results/splits")
    setting: str = "all"  # uni-class | multi-class | all
    normal: tuple[int, ...] | None = None  # a custom multi-class normal set
    classes: tuple[int, ...] | None = None  # restrict the uni-class / all-vs-one classes
    year: int | None = None
    class_order: str = "paper"


def requested_settings(setting: str) -> tuple[str, ...]:
    """`all` -> both settings; otherwise the one named (validated)."""
    if setting == "all":
        return SETTINGS
    if setting not in SETTINGS:
        raise NdbenchError(f"unknown setting {setting!r}", "use uni-class, multi-class or all")
    return (setting,)


# The datasets each option applies to, and its value when not given.
YEAR_DATASETS = {"voc": (2007, 2012), "coco": (2014, 2017)}
CLASS_ORDER_DATASETS = ("voc",)
CLASS_ORDERS = ("paper", "alphabetical")


def check_choice(request: BuildRequest) -> None:
    """--setting, --normal and --classes together (any dataset, coco-format's too), before any reading."""
    requested_settings(request.setting)
    if request.normal is not None and request.setting == "uni-class":
        raise NdbenchError("--normal defines a multi-class split", "drop --setting uni-class")
    if request.normal is not None and request.classes is not None:
        raise NdbenchError("--normal and --classes both choose splits", "give one of them")


def check_request(request: BuildRequest) -> None:
    """Options that cannot work together or do not apply to the dataset, before any reading."""
    check_dataset(request.dataset)
    check_choice(request)
    if request.year is not None:
        years = YEAR_DATASETS.get(request.dataset)
        if years is None:
            raise NdbenchError(f"--year does not apply to {request.dataset}",
                               f"drop it (it applies to {', '.join(YEAR_DATASETS)})")
        if request.year not in years:
            raise NdbenchError(f"--year {request.year} is not a {request.dataset} release ndbench reads",
                               f"use --year {' or '.join(map(str, years))}")
    if request.class_order not in CLASS_ORDERS:
        raise NdbenchError(f"unknown class order {request.class_order!r}",
                           f"use --class-order {' or '.join(CLASS_ORDERS)}")
    if request.class_order != CLASS_ORDERS[0] and request.dataset not in CLASS_ORDER_DATASETS:
        raise NdbenchError(f"--class-order does not apply to {request.dataset}", "drop it (it applies to voc)")


@dataclass
class Built:
    """What a build wrote, the protocol's splits it could not form (with the reason) and the
    manifests of an earlier build it removed."""

    index: DatasetIndex
    manifests: list[Manifest]
    skipped: list[DegenerateSplit] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)


def make_manifests(
    index: DatasetIndex, request: BuildRequest, protocol: list[int] | None = None
) -> tuple[list[Manifest], list[DegenerateSplit]]:
    """The manifests a request asks for, all validated before anything is written. Splits the
    user chose (`--classes`, `--normal`) must all form; of the protocol's (over `protocol`,
    default the paper's classes) those that cannot form are left out and returned apart, and
    at least one must form."""
    settings = requested_settings(request.setting)
    if request.normal is not None:
        if request.setting == "uni-class":
            raise NdbenchError("--normal defines a multi-class split", "drop --setting uni-class")
        return [multi_class_split(index, request.normal)], []
    if request.classes is None:
        manifests, skipped = protocol_splits(index, settings, protocol)
        if not manifests:
            reason = skipped[0].problem if skipped else "no class occurs in both the train and the test images"
            raise NdbenchError(f"{index.dataset}: no split can be formed: {reason}",
                               skipped[0].fix if skipped else "check that the train and test annotations share classes")
        return manifests, skipped
    return chosen_splits(index, settings, request.classes), []


# The split of class c in each setting: uni-class (c normal) and all-vs-one (c novel).
CHOSEN_SPLITS = {"uni-class": uni_class_split, "multi-class": all_vs_one_split}


def chosen_splits(index: DatasetIndex, settings: tuple[str, ...], classes: tuple[int, ...]) -> list[Manifest]:
    """The splits of `classes` in `settings` (uni-class ones first), all of which must form;
    the error for one that cannot says what does."""
    manifests: list[Manifest] = []
    for setting in settings:
        for c in classes:
            try:
                manifests.append(CHOSEN_SPLITS[setting](index, c))
            except DegenerateSplit as exc:
                raise DegenerateSplit(exc.problem, _chosen_fix(index, settings, classes, setting, c)
                                      or exc.fix) from exc
    return manifests


def _formed(index: DatasetIndex, setting: str, c: int) -> Manifest | None:
    """Class c's split of `setting`; None when it cannot form."""
    try:
        return CHOSEN_SPLITS[setting](index, c)
    except DegenerateSplit:
        return None


def _chosen_fix(index: DatasetIndex, settings: tuple[str, ...], classes: tuple[int, ...], setting: str,
                c: int) -> str | None:
    """What builds instead of class c's split of `setting`, which cannot form: its split of the
    other setting when that forms, else the classes whose splits of `settings` all form (None
    when none does)."""
    other = next(s for s in SETTINGS if s != setting)
    leave_out = f", or leave {c} out of --classes" if len(classes) > 1 else ""
    formed = _formed(index, other, c)
    if formed is not None:
        if other in settings:
            return f"{formed.split_id} forms: add --setting {other} to build only the {other} splits{leave_out}"
        return f"{formed.split_id} forms: build it with --setting {other}{leave_out}"
    working = [k for k in protocol_classes(index) if all(_formed(index, s, k) for s in settings)]
    if not working:
        return None
    shown = ",".join(map(str, working[:12])) + (f",... ({len(working)} classes)" if len(working) > 12 else "")
    return f"choose --classes among those whose {' and '.join(settings)} splits form: {shown}"


def build_splits(request: BuildRequest, console: Console | None = None) -> Built:
    """Build the index and manifests of a request and write them under `request.out`, with a
    record of what the index was built from (`BuiltinSource`) beside it."""
    check_request(request)
    index = build_index(
        request.dataset,
        request.root,
        year=request.year,
        class_order=request.class_order,
        console=console,
    )
    manifests, skipped = make_manifests(index, request)
    source = BuiltinSource.of_build(index, request.root, year=request.year, class_order=request.class_order)
    stale = stale_manifests(request, index, manifests)
    recipe = source.file(Path(request.out) / index.dataset)
    check_replaced_index(request, index, manifests, stale, recipe)
    write_build(request.out, index, manifests, recipe, stale=stale)
    return Built(index, manifests, skipped, stale)


# The protocol's split names per setting: what a protocol build owns and may remove.
PROTOCOL_NAMES = {"uni-class": UNI_CLASS_NAME, "multi-class": ALL_VS_ONE_NAME}


def stale_manifests(request: BuildRequest, index: DatasetIndex, manifests: list[Manifest]) -> list[Path]:
    """The protocol manifests (uni-class `<k>`, all-vs-one `except-<k>`) of the requested
    settings already under `request.out` that a protocol build (no `--classes`, no `--normal`)
    does not write again: they belong to an earlier build and would be run as current. A
    build of chosen splits owns only those, and a chosen normal set (`normal-a-b`) is kept."""
    if request.classes is not None or request.normal is not None:
        return []
    written = {manifest.path_in(request.out) for manifest in manifests}
    stale: list[Path] = []
    for setting in requested_settings(request.setting):
        for path in sorted((Path(request.out) / index.dataset / setting).glob("*.json")):
            if (path in written or path.is_symlink() or not path.is_file()
                    or not PROTOCOL_NAMES[setting].fullmatch(path.stem)):
                continue
            try:
                manifest = Manifest.read(path)
            except NdbenchError:  # not a manifest ndbench wrote (or edited since): not ours to remove
                continue
            if (manifest.dataset, manifest.setting, manifest.name) == (index.dataset, setting, path.stem):
                stale.append(path)
    return stale


def write_build(out: Path, index: DatasetIndex, manifests: list[Manifest],
                extra: dict[Path, str] | None = None, stale: list[Path] | None = None) -> None:
    """Write an index, its manifests and `extra` files under `out`, and remove the `stale`
    manifests, as one step: a failure while writing (no room, a file where a folder belongs)
    leaves the previous build as it was."""
    files = index.files(Path(out) / index.dataset)
    files.update({manifest.path_in(out): manifest.to_json() for manifest in manifests})
    files.update(extra or {})
    atomic_write_files(files, remove=stale or ())


def check_replaced_index(request: BuildRequest, index: DatasetIndex, manifests: list[Manifest],
                         stale: list[Path], recipe: dict[Path, str]) -> None:
    """Refuse a build that would replace the index under `request.out` with another while
    manifests built from the replaced one stay there (this build neither writes nor removes
    them): they would fail to load at run time. `recipe` is the source record it writes."""
    folder = Path(request.out) / index.dataset
    replaced = _recorded_index_sha256(folder)
    if replaced is None or replaced == index.sha256:
        return
    kept = {manifest.path_in(request.out) for manifest in manifests} | set(stale)
    orphans = [path for path in _manifest_files(folder) if path not in kept and _index_of(path) == replaced]
    if not orphans:
        return
    names = ", ".join(f"{path.parent.name}/{path.stem}" for path in orphans[:5])
    names += ", ..." if len(orphans) > 5 else ""
    record = folder / RECIPE_FILE
    changed = " (its source files changed since)" if record in recipe and _text(record) == recipe[record] else ""
    raise NdbenchError(
        f"this build would replace the {index.dataset} index under {folder}{changed}, and {_manifests_of(orphans)} "
        f"there built from it ({names}) would then fail to load; that index was built with "
        f"`{build_command(folder)}`",
        _replaced_index_fix(request, folder, orphans),
    )


def _replaced_index_fix(request: BuildRequest, folder: Path, orphans: list[Path]) -> str:
    """How to build without leaving the `orphans` (manifests of the index a build replaces)
    unloadable: elsewhere, or, when a protocol build would rebuild or remove them all, that
    build first; else from an empty folder."""
    protocol = all(PROTOCOL_NAMES[path.parent.name].fullmatch(path.stem) for path in orphans)
    every_setting = any(path.parent.name not in requested_settings(request.setting) for path in orphans)
    drop = [option for option, given in (("--classes", request.classes is not None),
                                         ("--normal", request.normal is not None),
                                         ("--setting", every_setting and request.setting != "all")) if given]
    if protocol and drop:
        return (f"build into another --out, or first rebuild all its splits from this source by running this "
                f"command without {' and '.join(drop)}, then run it again as it is")
    return f"build into another --out, or delete {folder} first to replace that build"


def _manifest_files(folder: Path) -> list[Path]:
    """The JSON files of the settings' folders under a dataset folder, in natural order."""
    return [path for setting in SETTINGS
            for path in sorted((folder / setting).glob("*.json"), key=lambda path: natural_key(path.stem))]


def _recorded_index_sha256(folder: Path) -> str | None:
    """The index_sha256 recorded in `folder`'s index.json; None when there is no readable one."""
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    found = meta.get("index_sha256") if isinstance(meta, dict) else None
    return found if isinstance(found, str) else None


def _index_of(path: Path) -> str | None:
    """The index_sha256 of the manifest at `path`; None when it is not a manifest ndbench wrote
    (damaged or edited, or not a regular file: it does not load now either)."""
    if not path.is_file():
        return None
    try:
        return Manifest.read(path).index_sha256
    except (NdbenchError, OSError):
        return None


def _text(path: Path) -> str | None:
    """A text file's contents; None when it cannot be read."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _manifests_of(paths: list[Path]) -> str:
    """`paths` counted in words, as manifests ("1 manifest", "3 manifests")."""
    return f"{len(paths)} manifest{'' if len(paths) == 1 else 's'}"


def summary_table(index: DatasetIndex, manifests: list[Manifest]) -> Table:
    """A rich table: split id, class name(s), #train, #test normal, #test novel."""
    table = Table(title=f"{index.dataset}: {len(manifests)} splits ({index.sha256[:12]})")
    for column in ("split id", "normal", "#train", "#test normal", "#test novel"):
        table.add_column(column, justify="right" if column.startswith("#") else "left", no_wrap=column == "split id")
    for m in manifests:
        counts = m.counts()
        if len(m.normal_classes) == 1:
            normal = index.class_names.get(m.normal_classes[0], "?")
        else:
            left_out = sorted(set(index.class_names) - set(m.normal_classes))
            normal = "all but " + ", ".join(index.class_names[c] for c in left_out[:3])
            normal += "…" if len(left_out) > 3 else ""
        table.add_row(
            m.split_id,
            normal,
            str(counts["train"]),
            str(counts["test_normal"]),
            str(counts["test_novel"]),
        )
    return table
