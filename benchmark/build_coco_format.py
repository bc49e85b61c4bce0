"""`ndbench build-splits coco-format`: a user's COCO-format dataset -> index + manifests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from datasets_builders.coco_format import (
    CocoFormatSource,
    build_coco_format_index,
    protocol_classes_with_min_train,
    recipe_file,
)
from datasets_builders.errors import NdbenchError

from .build import (
    BuildRequest,
    Built,
    check_choice,
    check_replaced_index,
    make_manifests,
    stale_manifests,
    write_build,
)


@dataclass
class CocoFormatBuild(Built):
    """What a coco-format build wrote, and the classes and splits left out (and why)."""

    missing: list[int] = field(default_factory=list)  # absent from the train or the test images
    rare: list[int] = field(default_factory=list)  # fewer training images than --min-train-images


def build_coco_format_splits(
    source: CocoFormatSource, request: BuildRequest, min_train_images: int = 0, console=None
) -> CocoFormatBuild:
    """Index a COCO-format train/test pair and write its manifests under
    `<request.out>/<source.name>/`: the paper's protocol over every class present in train
    and test with at least `min_train_images` training images, or what `request` asks for.
    Reading a large annotation file is announced on `console` (a rich Console)."""
    check_choice(request)
    if min_train_images < 0:
        raise NdbenchError(f"--min-train-images {min_train_images} is negative", "give 0 or more")
    index = build_coco_format_index(source, console=console)
    kept, rare = protocol_classes_with_min_train(index, min_train_images)
    missing = sorted(set(index.class_ids()) - set(kept) - set(rare))
    if request.classes is not None or request.normal is not None:
        missing, rare = [], []  # the user chose the splits; nothing was left out
    elif not kept:
        raise NdbenchError(
            f"{source.name}: no class occurs in both the train and the test images"
            + (f" with at least {min_train_images} training images" if rare else ""),
            "check that the two files share categories" + (" or lower --min-train-images" if rare else ""),
        )
    manifests, skipped = make_manifests(index, request, protocol=kept)
    recipe = recipe_file(Path(request.out) / index.dataset, source, min_train_images)
    stale = stale_manifests(request, index, manifests)
    check_replaced_index(request, index, manifests, stale, recipe)
    write_build(request.out, index, manifests, recipe, stale=stale)
    return CocoFormatBuild(index, manifests, skipped, stale, missing, rare)
