"""How well an embedded backbone stands in for ImageNet-21k: its accuracy on digit instances
that no pre-training image showed, and how well its patch tokens tell the scenes' objects
(their class, and object from background) to a linear probe."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from datasets_builders.embedded import N_CLASSES, EmbeddedConfig, ensure_embedded, render_instances

from .backbones import create_backbone
from .pretrain import box_patch_overlap, input_size, predict, to_input

OBJECT_PATCH = 0.5  # a patch belongs to an object when its box covers this much (box_patch_overlap)


def weight_classes(path: Path) -> tuple[str, ...]:
    """The classifier outputs of a pre-trained weights file: recorded in its metadata by
    `pretrain`; files from before that hold the ten digits."""
    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get("classes")
    return tuple(json.loads(recorded)) if recorded else tuple(f"digit-{d}" for d in range(N_CLASSES))


def load_classifier(arch: str, path: Path, device: torch.device) -> tuple[nn.Module, tuple[str, ...]]:
    """The backbone with its pre-training classifier head, in eval mode, and the head's classes."""
    classes = weight_classes(path)
    model = create_backbone(arch, weights=path, num_classes=len(classes))
    return model.to(device).eval(), classes


def digit_columns(classes: tuple[str, ...]) -> np.ndarray:
    """(len(classes),) the digit each output stands for ("digit-3" and "font-digit-3": 3), -1
    for the others."""
    def digit(name: str) -> int:
        kind, _, value = name.rpartition("-")
        return int(value) if kind in ("digit", "font-digit") else -1

    return np.array([digit(name) for name in classes])


def digit_probabilities(logits: torch.Tensor, classes: tuple[str, ...]) -> torch.Tensor:
    """(..., 10) softmax mass of each digit over all outputs (font and handwritten summed)."""
    probs = logits.float().softmax(-1)
    columns = torch.from_numpy(digit_columns(classes))
    onehot = (columns[:, None] == torch.arange(N_CLASSES)[None]).float()
    return probs @ onehot


def heldout_scene_instance_accuracy(model: nn.Module, classes: tuple[str, ...], data: EmbeddedConfig,
                                    device: torch.device, copies: int = 3) -> float:
    """Top-1 digit accuracy on the test scenes' digit instances (never in the pre-training pool),
    each drawn `copies` times object-centric as the pool draws an undeformed digit. A
    prediction of any non-digit class counts as wrong."""
    images, labels = render_instances(data, "test", copies)
    predicted = digit_columns(classes)[predict(model, images, device).argmax(1).numpy()]
    return float((predicted == labels).mean())


@dataclass(frozen=True)
class Scene:
    """One embedded scene: uint8 pixels, its objects' boxes (x, y, w, h) and classes."""

    image_id: int
    pixels: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray


def load_scenes(root: Path, split: str, limit: int | None = None) -> list[Scene]:
    """The scenes of a COCO split ("train" or "val") written by the embedded generator."""
    data = json.loads((Path(root) / "annotations" / f"instances_{split}.json").read_text(encoding="utf-8"))
    objects: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann)
    scenes = []
    for image in data["images"][:limit]:
        anns = objects.get(image["id"], [])
        pixels = np.asarray(Image.open(Path(root) / split / image["file_name"]).convert("RGB"))
        scenes.append(Scene(image["id"], pixels, np.array([a["bbox"] for a in anns], dtype=np.int64).reshape(-1, 4),
                            np.array([a["category_id"] for a in anns], dtype=np.int64)))
    return scenes


@torch.no_grad()
def patch_tokens(model: VisionTransformer, pixels: np.ndarray, device: torch.device,
                 batch_size: int = 128) -> torch.Tensor:
    """(S, N, D) final-normed patch tokens of uint8 images (S, H, W, 3)."""
    size = input_size(model)
    rows = [model.forward_features(to_input(pixels[i : i + batch_size], size).to(device))[:, model.num_prefix_tokens :]
            .float().cpu() for i in range(0, len(pixels), batch_size)]
    return torch.cat(rows)


def scene_overlap(model: VisionTransformer, scene: Scene) -> torch.Tensor:
    """(M, N) `box_patch_overlap` of a scene's objects with the model's patch grid."""
    scale = input_size(model) / scene.pixels.shape[0]
    boxes = torch.from_numpy(np.round(scene.boxes * scale).astype(np.int64))
    return box_patch_overlap(boxes, tuple(model.patch_embed.grid_size), int(model.patch_embed.patch_size[0]))


def _patch_labels(model: VisionTransformer, scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    """Per patch of every scene: the class of the object that covers it (-1: none) and
    whether it touches no object at all."""
    classes, background = [], []
    for scene in scenes:
        overlap = scene_overlap(model, scene)
        best, which = overlap.max(0)
        label = torch.from_numpy(scene.classes)[which]
        classes.append(torch.where(best >= OBJECT_PATCH, label, torch.full_like(label, -1)).numpy())
        background.append((best == 0).numpy())
    return np.concatenate(classes), np.concatenate(background)


def patch_token_probe(model: VisionTransformer, data: EmbeddedConfig, device: torch.device,
                      n_scenes: int = 500, seed: int = 0) -> dict:
    """Linear probes (logistic regression on standardised patch tokens), fitted on the patches
    of the first `n_scenes` train scenes and scored on those of the first `n_scenes` test
    scenes: (a) the class of the object covering a patch, from the patches on an object's
    box (accuracy); (b) object vs background, from the patches on a box and those touching no
    box (balanced accuracy; the training patches balanced by subsampling)."""
    root = ensure_embedded(data)
    parts = {}
    for part, split in (("train", "train"), ("test", "val")):
        scenes = load_scenes(root, split, n_scenes)
        tokens = patch_tokens(model, np.stack([s.pixels for s in scenes]), device)
        parts[part] = (tokens.flatten(0, 1).numpy(), *_patch_labels(model, scenes))
    rng = np.random.default_rng(seed)

    def probe() -> LogisticRegression:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))

    (x_tr, c_tr, bg_tr), (x_te, c_te, bg_te) = parts["train"], parts["test"]
    on_tr, on_te = c_tr >= 0, c_te >= 0
    cls = probe().fit(x_tr[on_tr], c_tr[on_tr])
    class_accuracy = float((cls.predict(x_te[on_te]) == c_te[on_te]).mean())
    off_tr = np.flatnonzero(bg_tr)
    off_tr = rng.choice(off_tr, size=min(len(off_tr), int(on_tr.sum())), replace=False)
    keep = np.concatenate([np.flatnonzero(on_tr), off_tr])
    obj = probe().fit(x_tr[keep], on_tr[keep])
    test = on_te | bg_te
    object_accuracy = float(balanced_accuracy_score(on_te[test], obj.predict(x_te[test])))
    return {"class_accuracy": class_accuracy, "object_vs_background_balanced_accuracy": object_accuracy,
            "train_object_patches": int(on_tr.sum()), "test_object_patches": int(on_te.sum()),
            "test_background_patches": int(bg_te.sum()), "scenes": n_scenes}


def evaluate_backbone(arch: str, path: Path, data: EmbeddedConfig, device: torch.device) -> dict:
    """The figures the shipped-weights manifest records for one backbone: test-instance
    accuracy, and for a ViT the patch-token probes."""
    model, classes = load_classifier(arch, path, device)
    figures: dict = {"classes": list(classes),
                     "scene_test_instance_accuracy": heldout_scene_instance_accuracy(model, classes, data, device)}
    if isinstance(model, VisionTransformer):
        figures["patch_probe"] = patch_token_probe(model, data, device)
    return figures
