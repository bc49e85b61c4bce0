"""Tiny stand-ins for the published dataset files, in their real layouts and under their real
names, and a download table pointing at them.

`publish(serve, dataset, year)` writes every file of the real table entry (`download_table`)
as a tiny archive (or plain file) to `<serve>/<dataset>/<name>` — the mirror layout — built
from the builders' test fixtures, and returns the real entries with their checksums and sizes
replaced by those of the tiny files (the same kind of checksum the real entry publishes; none
where it publishes none). Names, targets and `provides` stay the real ones, so a download
through this table lays the data out exactly as the real one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from array_fixtures import write_cifar10, write_mnist
from coco_fixtures import write_coco_tree
from voc_fixtures import TRAIN_2012, write_voc2007, write_voc_tree

from datasets_builders import download_table
from datasets_builders.download_table import RemoteFile

CIFAR10_TRAIN_LABELS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2
CIFAR10_TEST_LABELS = list(range(10))


def tar_folder(archive: Path, base: Path, members: list[Path], mode: str = "w") -> None:
    """A tar of `members` (paths under `base`, stored relative to it)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode) as tar:
        for member in members:
            tar.add(member, arcname=member.relative_to(base).as_posix(), recursive=False)


def zip_folder(archive: Path, base: Path, members: list[Path], extra: dict[str, bytes] | None = None) -> None:
    """A zip of `members` (stored relative to `base`) plus `extra` raw entries."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for member in members:
            bundle.write(member, member.relative_to(base).as_posix())
        for name, data in (extra or {}).items():
            bundle.writestr(name, data)


def _tree(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def _voc2012(src: Path, out: Path) -> None:
    voc = write_voc_tree(src)
    trainaug = voc / "ImageSets" / "Segmentation" / "trainaug.txt"
    trainaug.unlink()  # not in the VOC tarball: it comes as train_aug.txt
    masks = voc / "SegmentationClassAug"
    in_tar = [p for p in _tree(src / "VOCdevkit") if masks not in (p, *p.parents)]
    tar_folder(out / "VOCtrainval_11-May-2012.tar", src, in_tar)
    # The published zip carries macOS metadata next to the masks; it must not be extracted.
    zip_folder(out / "SegmentationClassAug.zip", voc, _tree(masks), {"__MACOSX/SegmentationClassAug/._x.png": b"x"})
    (out / "train_aug.txt").write_text("".join(f"{i}\n" for i in TRAIN_2012), encoding="utf-8")


def _voc2007(src: Path, out: Path) -> None:
    folder = write_voc2007(src / "VOCdevkit")
    tests = set((folder / "ImageSets" / "Main" / "test.txt").read_text().split())
    tree = _tree(src / "VOCdevkit")

    def is_test(p: Path) -> bool:
        return p.stem in tests or p.name == "test.txt"

    tar_folder(out / "VOCtrainval_06-Nov-2007.tar", src, [p for p in tree if p.is_dir() or not is_test(p)])
    tar_folder(out / "VOCtest_06-Nov-2007.tar", src, [p for p in tree if p.is_dir() or is_test(p)])


def _coco(year: str) -> Callable[[Path, Path], None]:
    def write(src: Path, out: Path) -> None:
        root = write_coco_tree(src, year=year)
        zip_folder(out / f"annotations_trainval{year}.zip", root, _tree(root / "annotations"))
        for split in ("train", "val"):
            zip_folder(out / f"{split}{year}.zip", root, _tree(root / f"{split}{year}"))

    return write


def _cifar10(src: Path, out: Path) -> None:
    write_cifar10(src, CIFAR10_TRAIN_LABELS, CIFAR10_TEST_LABELS)
    tar_folder(out / "cifar-10-python.tar.gz", src, _tree(src), mode="w:gz")


def _mnist(src: Path, out: Path) -> None:
    write_mnist(out, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], [3, 4, 5, 6, 7, 8, 9, 0, 1, 2], gz=True)


WRITERS: dict[tuple[str, int | None], Callable[[Path, Path], None]] = {
    ("voc", 2012): _voc2012,
    ("voc", 2007): _voc2007,
    ("coco", 2014): _coco("2014"),
    ("coco", 2017): _coco("2017"),
    ("cifar10", None): _cifar10,
    ("mnist", None): _mnist,
}


def _published(file: RemoteFile, path: Path, url: str) -> RemoteFile:
    """The real entry, with the tiny file's URL, size and checksum of the same kind."""
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest() if file.md5 else None
    sha256 = hashlib.sha256(data).hexdigest() if file.sha256 else None
    return dataclasses.replace(file, url=url, size=len(data) if file.size else None, md5=md5, sha256=sha256)


def publish(serve: Path, dataset: str, year: int | None, official: str) -> tuple[RemoteFile, ...]:
    """Write the tiny files of (dataset, year) to `<serve>/<dataset>/` and return the table
    entry for them, with official URLs `<official><dataset>/<name>`."""
    out = Path(serve) / dataset
    out.mkdir(parents=True, exist_ok=True)
    WRITERS[(dataset, year)](Path(serve).parent / f"src-{dataset}-{year}", out)
    real = download_table.TABLE[(dataset, year)]
    return tuple(_published(f, out / f.name, f"{official}{dataset}/{f.name}") for f in real)


def evil_tar(path: Path) -> None:
    """A tar whose member climbs out of the extraction folder."""
    data = b"owned"
    info = tarfile.TarInfo("../evil.txt")
    info.size = len(data)
    with tarfile.open(path, "w:gz") as tar:
        tar.addfile(info, io.BytesIO(data))
