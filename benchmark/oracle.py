"""The oracle ceilings of the embedded benchmark: what a perfect distiller of the teacher could
score. Both read the teacher's own patch-token class predictions (its pre-training classifier
head applied to each patch token) on each test scene:

- "boxes": with the scene's ground-truth boxes, an object's class probabilities are their mean
  over the patches its box covers, and the image's novelty score is 1 - the largest probability
  mass any of its objects puts on the normal classes (uni-class normal class c: 1 - max over
  objects of P(c)). This asks what the split's labels ask: is a normal object present?
- "patch-mean": the score rule of the distillers (mean over all patches of a per-patch error,
  paper sec. 3.3) fed with a perfect per-patch error, 1 - the patch's mass on the normal
  classes; no boxes. Its AUROC is the ceiling of that rule with these patch tokens.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from sklearn.metrics import roc_auc_score
from timm.models.vision_transformer import VisionTransformer

from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, build_command
from datasets_builders.loading import load_split
from datasets_builders.splits import ALL_VS_ONE_NAME, SETTINGS, UNI_CLASS_NAME, Manifest
from methods.backbones import create_backbone
from methods.pretrain import DEFAULT_ARCH, resolve_weights
from methods.pretrain_eval import (
    OBJECT_PATCH,
    digit_probabilities,
    load_classifier,
    load_scenes,
    patch_tokens,
    scene_overlap,
    weight_classes,
)
from methods.shipped_weights import SHIPPED_ARCHS
from methods.weight_sources import EMBEDDED_WEIGHTS, HUB, NO_WEIGHTS
from methods.weights_arch import is_vit, weight_shapes, weights_arch

DATASET = "embedded"
RULES = ("boxes", "patch-mean")
# The split names `build-splits embedded` writes per setting: the oracle's tables have a column
# per class, the normal one (uni-class) or the novel one (all-vs-one).
SPLIT_NAMES = {"uni-class": UNI_CLASS_NAME, "multi-class": ALL_VS_ONE_NAME}


@dataclass(frozen=True)
class SceneProbabilities:
    """A test scene's digit probabilities: (objects, 10) per ground-truth object, the mean of
    its patches' (those its box covers by OBJECT_PATCH, else the one it covers most), and
    (patches, 10) per patch token."""

    objects: np.ndarray
    patches: np.ndarray


@torch.no_grad()
def scene_digit_probabilities(model: VisionTransformer, classes: tuple[str, ...], root: Path,
                              device: torch.device) -> dict[str, SceneProbabilities]:
    """The digit probabilities of every test scene, by image id."""
    scenes = load_scenes(root, "val")
    tokens = patch_tokens(model, np.stack([s.pixels for s in scenes]), device)
    probs = digit_probabilities(model.head(tokens.to(device)).cpu(), classes)  # (S, N, 10)
    out = {}
    for scene, p in zip(scenes, probs, strict=True):
        overlap = scene_overlap(model, scene)
        on = overlap >= OBJECT_PATCH
        on[torch.arange(len(on)), overlap.argmax(1)] = True
        weights = on.float() / on.sum(1, keepdim=True)
        out[str(scene.image_id)] = SceneProbabilities((weights @ p).numpy(), p.numpy())
    return out


def oracle_scores(manifest: Manifest, scenes: dict[str, SceneProbabilities],
                  rule: str = "boxes") -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 novel) and oracle novelty scores of a split's test images under `rule`."""
    if rule not in RULES:
        raise NdbenchError(f"unknown oracle rule {rule!r}", f"use one of {', '.join(RULES)}")
    normal = list(manifest.normal_classes)
    labels = np.array([label for _, label in manifest.test])
    if rule == "boxes":
        scores = [1.0 - scenes[image_id].objects[:, normal].sum(1).max() for image_id, _ in manifest.test]
    else:
        scores = [1.0 - scenes[image_id].patches[:, normal].sum(1).mean() for image_id, _ in manifest.test]
    return labels, np.array(scores)


def check_oracle_inputs(arch: str, weights: str | Path) -> None:
    """Raise NdbenchError unless `arch` is a timm ViT (checked before any pre-training starts)
    and `weights` is "embedded" or a safetensors file of `arch` with a classifier head (as
    `ndbench pretrain` writes them)."""
    if not isinstance(create_backbone(arch, weights=NO_WEIGHTS, num_classes=0), VisionTransformer):
        raise NdbenchError(f"the oracle reads patch tokens; --arch {arch} is not a ViT",
                           f"pass a ViT with --arch, e.g. the default {DEFAULT_ARCH}")
    if weights == EMBEDDED_WEIGHTS:
        return
    hint = f"give {EMBEDDED_WEIGHTS!r} or a .safetensors file written by `ndbench pretrain`"
    if weights in (HUB, NO_WEIGHTS):
        raise NdbenchError(f"--weights {weights}: the oracle needs the pre-training classifier head", hint)
    if not Path(weights).is_file():
        raise NdbenchError(f"--weights {weights}: no such file", hint)
    try:
        weight_classes(Path(weights))
        shapes = weight_shapes(Path(weights))
    except (OSError, SafetensorError, NdbenchError) as exc:
        why = exc.problem if isinstance(exc, NdbenchError) else exc
        raise NdbenchError(f"--weights {weights}: not a readable safetensors file ({why})", hint) from exc
    check_weights_arch(arch, Path(weights), shapes)


def check_weights_arch(arch: str, path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise NdbenchError, before any work, unless the weights file at `path` (its tensors'
    `shapes`) holds `arch`'s weights, naming what it holds instead when that is known."""
    found = weights_arch(arch, path, shapes)
    if found.fits:
        return
    own = (f"--weights embedded for {arch}'s own" if arch in SHIPPED_ARCHS
           else f"the file `ndbench pretrain --arch {arch}` writes")
    if found.held is None:
        raise NdbenchError(f"--weights {path} does not hold the {arch} weights --arch asks for",
                           f"pass {own}, or the --arch those weights were trained as")
    if is_vit(found.held):
        fix = f"pass --arch {found.held} to read them as what they are, or {own}"
    else:
        fix = f"the oracle reads a ViT's patch tokens and {found.held} is not a ViT: pass {own}"
    raise NdbenchError(f"--weights {path} holds {found.held} weights, not the {arch} weights --arch asks for", fix)


def split_names(folder: Path, setting: str) -> list[str]:
    """The names of `setting`'s split manifests in `folder` that the oracle reads (`SPLIT_NAMES`);
    any other JSON file there (a copy, a `--normal` set) is skipped with one warning line."""
    names = []
    for path in sorted((folder / setting).glob("*.json")):
        if SPLIT_NAMES[setting].fullmatch(path.stem):
            names.append(path.stem)
        else:
            print(f"ndbench: warning: {path} is not a split the oracle reads (uni-class/<class id>, "
                  "multi-class/except-<class id>); skipped", file=sys.stderr)
    return names


def scenes_root(index: DatasetIndex, folder: Path, splits_root: Path) -> Path:
    """The folder of the embedded scenes `index` (read from `folder`) was built from; one
    NdbenchError naming it, and the command that makes it again, when it is gone."""
    root = Path(index.root)
    if not (root / "annotations" / "instances_val.json").is_file():
        relative = "" if root.is_absolute() else " (a relative path, read from the current folder)"
        state = "incomplete" if root.exists() else "missing"
        raise NdbenchError(f"the embedded scenes folder {root}{relative} named in {folder / 'index.json'} is {state}",
                           _regenerate_fix(root, splits_root))
    return root


def _regenerate_fix(root: Path, splits_root: Path) -> str:
    """The hint that generates the embedded scenes and their index again (build-splits keeps a
    scenes folder that is there, so a damaged one is deleted first)."""
    command = f"`{build_command(Path(splits_root) / DATASET)}`"
    return f"delete {root}, then run {command}" if root.exists() else f"generate them again with {command}"


def check_splits_root(splits_root: Path) -> None:
    """Refuse a --splits that is the results root (`<out>`, which other commands take) or the
    embedded folder itself, naming the splits root it holds; building splits there, as the
    missing index's own hint says, would leave them where no run reads them."""
    if (splits_root / DATASET / "index.json").is_file():
        return
    for meant in (splits_root / "splits", splits_root.parent):
        if (meant / DATASET / "index.json").is_file():
            raise NdbenchError(f"no embedded index under --splits {splits_root}, but {meant / DATASET} holds one",
                               f"pass --splits {meant} (the folder that holds embedded/)")


def oracle_aurocs(splits_root: Path, weights: str | Path = "embedded", *, arch: str = DEFAULT_ARCH,
                  device: torch.device | None = None, settings: tuple[str, ...] = SETTINGS) -> list[dict]:
    """Oracle AUROCs of every embedded split under `splits_root` (as `ndbench build-splits
    embedded` writes them) with `arch`'s `weights` ("embedded" or a file): one row per split
    and rule."""
    check_oracle_inputs(arch, weights)
    device = device or torch.device("cpu")
    check_splits_root(Path(splits_root))
    folder = Path(splits_root) / DATASET
    index = DatasetIndex.read(folder)
    names = {s: split_names(folder, s) for s in settings}
    if not any(names.values()):
        raise NdbenchError(f"no embedded split manifests under {folder}",
                           f"run `{build_command(folder)}`")
    root = scenes_root(index, folder, splits_root)
    model, classes = load_classifier(arch, Path(resolve_weights(arch, weights)), device)
    try:
        scenes = scene_digit_probabilities(model, classes, root, device)
    except OSError as exc:  # the check above covers the annotations, not each scene image
        raise NdbenchError(f"cannot read the embedded scenes under {root}: {exc}",
                           _regenerate_fix(root, splits_root)) from exc
    rows = []
    for setting, splits in names.items():
        for name in splits:
            _, manifest = load_split(splits_root, f"{DATASET}/{setting}/{name}")
            for rule in RULES:
                labels, scores = oracle_scores(manifest, scenes, rule)
                rows.append({"setting": setting, "rule": rule, "split": name,
                             "auroc": float(roc_auc_score(labels, scores))})
    return rows
