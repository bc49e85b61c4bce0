"""DEFEND's multi-crop views (Leopart-style, as the released `LeopartTransforms` makes them:
repository SMSD75/Redefining_Normal_ACCV24, `DeFeND/transformations.py:180-319`, cited below
as `RN:<path>:<line>`).

Each training image gives G global and L local random resized crops, cut from the image at its
original resolution, with every crop overlapping every global crop; for each (global, other)
pair the overlap is returned in both crops' pixel coordinates, which is what the dense loss
aligns with `roi_align`. No colour augmentation: the released transform has it commented out
(RN:DeFeND/transformations.py:274) and the paper says "no augmentations ... except cropping"
(sec. 4.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class MultiCropSpec:
    """Sizes, counts and area ranges of the global and local crops."""

    global_size: int = 224  # RN:DeFeND/leo_tuning.py:293: LeopartTransforms([input_size, 96], ...)
    local_size: int = 96
    global_count: int = 2  # ... [2, 4]
    local_count: int = 4
    global_scale: tuple[float, float] = (0.3, 1.0)  # ... min [0.3, 0.1], max [1., 0.3]
    local_scale: tuple[float, float] = (0.1, 0.3)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # torchvision RandomResizedCrop's default ratio
    min_intersection: float = 0.01  # RN:DeFeND/leo_tuning.py:293 (6th argument); x2 between globals

    @property
    def views(self) -> int:
        return self.global_count + self.local_count

    def size(self, view: int) -> int:
        return self.global_size if view < self.global_count else self.local_size


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            generator: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's `RandomResizedCrop.get_params` draws them (ten
    tries of area and log-uniform aspect, then a centre crop), from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(*scale, generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio, generator=generator)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _intersections(box: Tensor, others: Tensor) -> Tensor:
    lt = torch.maximum(box[:2], others[:, :2])
    rb = torch.minimum(box[2:], others[:, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[:, 0] * wh[:, 1]


def sample_crop_boxes(height: int, width: int, spec: MultiCropSpec, generator: torch.Generator,
                      max_tries: int = 100) -> Tensor:
    """Absolute crop boxes [views, 4] (x1, y1, x2, y2; globals first) in an image of the given
    size. Every crop after the first overlaps each earlier global crop by more than
    `min_intersection` of the image area (twice that between the two globals), resampled until
    it does (RN:DeFeND/transformations.py:244-271); after `max_tries` the last draw is kept
    only if it overlaps at all, else the crop is the first global crop's box."""
    boxes = torch.zeros(spec.views, 4)
    for i in range(spec.views):
        is_global = i < spec.global_count
        scale = spec.global_scale if is_global else spec.local_scale
        earlier = boxes[: min(i, spec.global_count)]
        need = int(height * width * spec.min_intersection) * (2 if is_global else 1)
        for _ in range(max_tries):
            top, left, h, w = random_resized_crop_box(height, width, scale, spec.ratio, generator)
            box = torch.tensor([left, top, left + w, top + h], dtype=torch.float32)
            if i == 0 or bool((_intersections(box, earlier) > need).all()):
                break
        else:
            if not bool((_intersections(box, earlier) > 0).all()):
                box = boxes[0].clone()
        boxes[i] = box
    return boxes


def relative_boxes(boxes: Tensor, spec: MultiCropSpec) -> tuple[Tensor, Tensor]:
    """The overlap of every (global g, crop v) pair in each crop's own resized pixels
    (RN:DeFeND/transformations.py:285-319): `gc` [G, V, 4] in g's pixels and `all` [V, G, 4] in
    v's pixels (x1, y1, x2, y2)."""
    g = spec.global_count
    sizes = torch.tensor([float(spec.size(v)) for v in range(spec.views)])
    lt = torch.maximum(boxes[:g, None, :2], boxes[None, :, :2])  # [G, V, 2]
    rb = torch.minimum(boxes[:g, None, 2:], boxes[None, :, 2:])
    wh = boxes[:, 2:] - boxes[:, :2]  # [V, 2]

    def in_crop(points: Tensor, crop: Tensor) -> Tensor:  # points [..., 2] in crop `crop`'s pixels
        return (points - boxes[crop, :2]) / wh[crop] * sizes[crop]

    gc = torch.stack([torch.cat([in_crop(lt[i], i), in_crop(rb[i], i)], dim=-1) for i in range(g)])
    other = torch.stack([torch.cat([in_crop(lt[:, v], v), in_crop(rb[:, v], v)], dim=-1)
                         for v in range(spec.views)])
    return gc, other


class MultiCropViews(Dataset):
    """Multi-crop views of a dataset's training images: item i -> (list of `views` crops
    [3, s, s], gc boxes [G, V, 4], all boxes [V, G, 4]). Crops are cut from the original
    image when the dataset can give it (`image(i)`, a PIL image: real files keep their full
    resolution) and normalised with `mean`/`std`; otherwise from the dataset's own (already
    normalised) tensor. The draw of item i in epoch e depends only on (seed, e, i), so
    DataLoader workers give the same views as the main process."""

    def __init__(self, data: Dataset, spec: MultiCropSpec, mean, std, seed: int):
        self.data = data
        self.spec = spec
        self.mean = list(mean)
        self.std = list(std)
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data)

    def _source(self, item: int) -> tuple[Tensor, bool]:
        image = getattr(self.data, "image", None)
        if callable(image):
            pixels = TF.pil_to_tensor(image(item))
            return TF.to_dtype(pixels, torch.float32, scale=True), True
        return self.data[item][0].float(), False

    def item_seed(self, item: int) -> int:
        """The seed of item `item`'s crops in the current epoch."""
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + item) % 2**63

    def __getitem__(self, item: int) -> tuple[list[Tensor], Tensor, Tensor]:
        pixels, normalise = self._source(item)
        generator = torch.Generator().manual_seed(self.item_seed(item))
        boxes = sample_crop_boxes(pixels.shape[-2], pixels.shape[-1], self.spec, generator)
        crops = []
        for v, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
            size = self.spec.size(v)
            crop = TF.resized_crop(pixels, y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True)
            crops.append(TF.normalize(crop, self.mean, self.std) if normalise else crop)
        gc, other = relative_boxes(boxes, self.spec)
        return crops, gc, other
