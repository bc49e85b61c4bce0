"""`ndbench build-splits coco-format`: a user's COCO-format dataset -> index + manifests."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from datasets_builders.coco_format import (
    CocoFormatSource,
    build_coco_format_index,
    protocol_classes_with_min_train,
    write_recipe,
)
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex
from datasets_builders.splits import Manifest

from .build import BuildRequest, make_manifests


@dataclass
class CocoFormatBuild:
    """What a coco-format build wrote, and the classes left without a split (and why)."""

    index: DatasetIndex
    manifests: list[Manifest]
    missing: list[int]  # absent from the train or the test images
    rare: list[int]  # fewer training images than --min-train-images


def build_coco_format_splits(
    source: CocoFormatSource, request: BuildRequest, min_train_images: int = 0
) -> CocoFormatBuild:
    """Index a COCO-format train/test pair and write its manifests under
    `<request.out>/<source.name>/`: the paper's protocol over every class present in train
    and test with at least `min_train_images` training images, or what `request` asks for."""
    if min_train_images < 0:
        raise NdbenchError(f"--min-train-images {min_train_images} is negative", "give 0 or more")
    index = build_coco_format_index(source)
    kept, rare = protocol_classes_with_min_train(index, min_train_images)
    missing = sorted(set(index.class_ids()) - set(kept) - set(rare))
    chosen = request
    if request.classes is not None or request.normal is not None:
        missing, rare = [], []  # the user chose the splits; nothing was left out
    else:
        if not kept:
            raise NdbenchError(
                f"{source.name}: no class occurs in both the train and the test images"
                + (f" with at least {min_train_images} training images" if rare else ""),
                "check that the two files share categories" + (" or lower --min-train-images" if rare else ""),
            )
        chosen = dataclasses.replace(request, classes=tuple(kept))
    manifests = make_manifests(index, chosen)
    folder = Path(request.out) / index.dataset
    index.write(folder)
    write_recipe(folder, source, min_train_images)
    for manifest in manifests:
        manifest.write(request.out)
    return CocoFormatBuild(index, manifests, missing, rare)
