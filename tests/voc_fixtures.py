"""Tiny PASCAL VOC trees in the real on-disk formats, for the VOC builder tests.

`write_voc_tree` writes `<base>/VOCdevkit/VOC2012` (and optionally `VOC2007`): annotation XML
as VOC writes it, palette class-index PNG masks with 255 borders in `SegmentationClassAug/`,
ImageSets lists and small JPEGs. The expected index rows are hand-counted in test_voc.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ALPHABETICAL = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip


@dataclass(frozen=True)
class Obj:
    """One annotated object of a VOC XML."""

    name: str
    difficult: int = 0
    parts: tuple[str, ...] = ()  # person layout parts (head, hand, foot), each with a <name>


# VOC2012 train images (trainaug list): classes painted in the mask, objects in the XML.
# 2008_000002's XML lists a dog its mask lacks; 2008_000004's mask holds only 0/255.
TRAIN_2012: dict[str, tuple[tuple[str, ...], tuple[Obj, ...]]] = {
    "2008_000001": (("dog", "person"), (Obj("dog"), Obj("person", parts=("head", "hand")))),
    "2008_000002": (("cat",), (Obj("cat"), Obj("dog", difficult=1))),
    "2008_000003": (("car", "bus"), (Obj("car"), Obj("bus"), Obj("car"))),
    "2008_000004": ((), (Obj("bottle"),)),
    "2008_000005": (("person",), (Obj("person"),)),
    "2008_000006": (("aeroplane",), (Obj("aeroplane"),)),
}
# VOC's own segmentation train list (a subset of trainaug).
TRAIN_TXT_2012 = ("2008_000001", "2008_000002", "2008_000003")
# VOC2012 val images: XML objects, plus the mask SegmentationClassAug also ships for them.
VAL_2012: dict[str, tuple[tuple[str, ...], tuple[Obj, ...]]] = {
    "2008_000010": (("dog",), (Obj("dog"), Obj("dog"))),
    "2008_000011": (("cat",), (Obj("person", difficult=1), Obj("cat"))),
    "2008_000012": ((), (Obj("car", difficult=1),)),
    "2008_000013": (("sheep", "cow"), (Obj("sheep"), Obj("cow"))),
    "2008_000014": (("person",), (Obj("person", parts=("head", "foot")),)),
}
# An image in JPEGImages/Annotations that no list names (real VOC has thousands).
UNLISTED_2012 = "2008_000099"

TRAINVAL_2007: dict[str, tuple[Obj, ...]] = {
    "000005": (Obj("chair"), Obj("chair"), Obj("diningtable", difficult=1)),
    "000007": (Obj("car"),),
    "000009": (Obj("horse"), Obj("person", difficult=1)),
}
TEST_2007: dict[str, tuple[Obj, ...]] = {
    "000001": (Obj("dog"), Obj("person")),
    "000002": (Obj("train"),),
}

MASK_SIZE = (12, 10)  # width, height


def voc_palette() -> list[int]:
    """The 256-colour VOC palette (index i -> RGB by interleaving the bits of i)."""
    palette: list[int] = []
    for i in range(256):
        r = g = b = 0
        c = i
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_mask(path: Path, class_names: tuple[str, ...], *, extra_values: tuple[int, ...] = ()):
    """A palette ("P") class-index PNG: one block per class (value = alphabetical index + 1),
    each framed by 255 "void" pixels, on a 0 background."""
    width, height = MASK_SIZE
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[0, :] = 255  # a void row even when no object is painted
    values = [ALPHABETICAL.index(n) + 1 for n in class_names] + list(extra_values)
    for k, value in enumerate(values):
        x0 = 1 + 3 * (k % 3)
        y0 = 2 + 4 * (k // 3)
        mask[y0 - 1 : y0 + 3, x0 - 1 : x0 + 3] = 255
        mask[y0 : y0 + 2, x0 : x0 + 2] = value
    image = Image.fromarray(mask)
    image.putpalette(voc_palette())
    assert image.mode == "P"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def xml_text(folder: str, image_id: str, objects: tuple[Obj, ...]) -> str:
    """Annotation XML laid out as the VOC devkit writes it."""
    width, height = MASK_SIZE
    lines = [
        "<annotation>",
        f"\t<folder>{folder}</folder>",
        f"\t<filename>{image_id}.jpg</filename>",
        "\t<source>",
        f"\t\t<database>The {folder} Database</database>",
        f"\t\t<annotation>PASCAL {folder}</annotation>",
        "\t\t<image>flickr</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for k, obj in enumerate(objects):
        lines += [
            "\t<object>",
            f"\t\t<name>{obj.name}</name>",
            "\t\t<pose>Unspecified</pose>",
            "\t\t<truncated>0</truncated>",
            f"\t\t<difficult>{obj.difficult}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{1 + k}</xmin>",
            f"\t\t\t<ymin>{1 + k}</ymin>",
            f"\t\t\t<xmax>{width - 1}</xmax>",
            f"\t\t\t<ymax>{height - 1}</ymax>",
            "\t\t</bndbox>",
        ]
        for part in obj.parts:
            lines += [
                "\t\t<part>",
                f"\t\t\t<name>{part}</name>",
                "\t\t\t<bndbox>",
                "\t\t\t\t<xmin>1</xmin>",
                "\t\t\t\t<ymin>1</ymin>",
                "\t\t\t\t<xmax>3</xmax>",
                "\t\t\t\t<ymax>3</ymax>",
                "\t\t\t</bndbox>",
                "\t\t</part>",
            ]
        lines.append("\t</object>")
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def write_jpeg(path: Path, seed: int) -> None:
    """A small RGB JPEG."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(MASK_SIZE[1], MASK_SIZE[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, "JPEG")


def write_list(path: Path, ids) -> None:
    """An ImageSets list: one id a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


def _write_image(folder: Path, image_id: str, objects: tuple[Obj, ...], seed: int) -> None:
    (folder / "Annotations").mkdir(parents=True, exist_ok=True)
    (folder / "Annotations" / f"{image_id}.xml").write_text(
        xml_text(folder.name, image_id, objects), encoding="utf-8"
    )
    write_jpeg(folder / "JPEGImages" / f"{image_id}.jpg", seed)


def write_voc2007(devkit: Path) -> Path:
    """`<devkit>/VOC2007` with trainval and test (Main lists); returns that folder."""
    folder = devkit / "VOC2007"
    for seed, (image_id, objects) in enumerate({**TRAINVAL_2007, **TEST_2007}.items()):
        _write_image(folder, image_id, objects, seed)
    main = folder / "ImageSets" / "Main"
    write_list(main / "trainval.txt", TRAINVAL_2007)
    write_list(main / "test.txt", TEST_2007)
    # A per-class list, as VOC ships them (`<id> <flag>`); the builder does not read it.
    (main / "car_trainval.txt").write_text(
        "".join(f"{i} {1 if i == '000007' else -1}\n" for i in TRAINVAL_2007), encoding="utf-8"
    )
    return folder


def write_voc_tree(
    base: Path,
    *,
    trainaug_name: str | None = "trainaug.txt",
    masks: bool = True,
    voc2007: bool = False,
) -> Path:
    """Write `<base>/VOCdevkit/VOC2012` (and `VOC2007` if asked); returns the VOC2012 folder.

    `trainaug_name=None` leaves out the trainaug list (only VOC's own `train.txt`);
    `masks=False` leaves out `SegmentationClassAug/`.
    """
    devkit = Path(base) / "VOCdevkit"
    folder = devkit / "VOC2012"
    images = {**TRAIN_2012, **VAL_2012, UNLISTED_2012: (("horse",), (Obj("horse"),))}
    for seed, (image_id, (mask_classes, objects)) in enumerate(images.items()):
        _write_image(folder, image_id, objects, seed)
        if masks:
            write_mask(folder / "SegmentationClassAug" / f"{image_id}.png", mask_classes)
    seg = folder / "ImageSets" / "Segmentation"
    write_list(seg / "train.txt", TRAIN_TXT_2012)
    write_list(seg / "val.txt", VAL_2012)
    write_list(seg / "trainval.txt", (*TRAIN_TXT_2012, *VAL_2012))
    if trainaug_name is not None:
        write_list(seg / trainaug_name, TRAIN_2012)
    if voc2007:
        write_voc2007(devkit)
    return folder
