"""Glyphs for the embedded pre-training pool, in the format of scikit-learn's digits.

`load_digits` (UCI optdigits) made each 8x8 digit from a size-normalised 32x32 bitmap by
counting the set pixels in each 4x4 block. This module works on such 32x32 bitmaps: it renders
letters and digits from the TrueType fonts that ship with matplotlib, turns the 8x8 handwritten
digits back into bitmaps, deforms both (affine, elastic, stroke width), and counts blocks again,
so every glyph reaches the scene renderer in the same 8x8 form as the scenes' digits.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from .errors import NdbenchError

BITMAP = 32  # optdigits: 32x32 bitmaps, 4x4 blocks -> 8x8 counts 0..16
BLOCK = 4
DIGITS = string.digits
LETTERS = string.ascii_uppercase + string.ascii_lowercase
# matplotlib's bundled faces that hold Latin letters and digits (cmmi/cmsy/cmex and the STIX
# size and non-Unicode variants hold symbols; the Display faces hold a handful of glyphs).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)


@dataclass(frozen=True)
class GlyphAugment:
    """Random deformations of a 32x32 glyph bitmap before its blocks are counted: rotation
    (degrees), shear (a tangent) and width scale; an elastic warp (in the spirit of Simard et
    al. 2003: a smooth random displacement field, here bicubic-upsampled uniform noise on an
    `elastic_cells` x `elastic_cells` grid, at most `elastic_alpha` px); stroke width changed
    by one-pixel dilation or erosion."""

    rotation: float = 12.0
    shear: float = 0.3
    aspect: tuple[float, float] = (0.8, 1.15)  # width / height scale
    elastic_alpha: float = 2.5
    elastic_cells: int = 5
    thicken: float = 0.4  # probability of one dilation
    thin: float = 0.15  # probability of one erosion (skipped when it would erase half the glyph)


def font_dir() -> Path:
    """The folder of matplotlib's bundled TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


@cache
def font_bitmap(font_file: str, char: str) -> np.ndarray:
    """`char` in `font_file` as a size-normalised 32x32 boolean bitmap: tight box scaled to
    32 px high (narrower if wider than high), centred, as optdigits normalised its digits."""
    path = font_dir() / font_file
    try:
        font = ImageFont.truetype(str(path), size=96)
    except OSError as exc:
        raise NdbenchError(f"cannot read font {path}: {exc}", "reinstall matplotlib (it ships the font)") from exc
    canvas = Image.new("L", (192, 192), 0)
    ImageDraw.Draw(canvas).text((48, 24), char, fill=255, font=font)
    bitmap = np.asarray(canvas) > 127
    if not bitmap.any():
        raise NdbenchError(f"font {font_file} has no glyph for {char!r}", "drop the font from FONT_FILES")
    return normalise_bitmap(bitmap)


def normalise_bitmap(bitmap: np.ndarray) -> np.ndarray:
    """Crop a boolean bitmap to its set pixels and scale it, aspect kept, to fit 32x32,
    filling the height unless the glyph is wider than high; centred."""
    rows, cols = np.flatnonzero(bitmap.any(axis=1)), np.flatnonzero(bitmap.any(axis=0))
    crop = bitmap[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = crop.shape
    scale = BITMAP / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    image = Image.fromarray(crop.astype(np.uint8) * 255).resize((new_w, new_h), Image.Resampling.LANCZOS)
    out = np.zeros((BITMAP, BITMAP), dtype=bool)
    top, left = (BITMAP - new_h) // 2, (BITMAP - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.asarray(image) > 127
    return out


def digit_bitmap(grid: np.ndarray) -> np.ndarray:
    """A `load_digits` 8x8 grid (values in [0, 1]) back as a 32x32 boolean bitmap."""
    image = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32))
    return np.asarray(image.resize((BITMAP, BITMAP), Image.Resampling.BICUBIC)) > 0.5


def block_counts(bitmap: np.ndarray) -> np.ndarray:
    """The 8x8 grid of a 32x32 bitmap: set pixels per 4x4 block / 16, as `load_digits` / 16."""
    n = BITMAP // BLOCK
    return bitmap.reshape(n, BLOCK, n, BLOCK).mean(axis=(1, 3), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    coarse = Image.fromarray(rng.uniform(-1, 1, (cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def augment_bitmap(bitmap: np.ndarray, augment: GlyphAugment, rng: np.random.Generator) -> np.ndarray:
    """A randomly deformed copy of a 32x32 boolean glyph bitmap, normalised again."""
    angle = np.deg2rad(rng.uniform(-augment.rotation, augment.rotation))
    shear = rng.uniform(-augment.shear, augment.shear)
    aspect = rng.uniform(*augment.aspect)
    cos, sin = np.cos(angle), np.sin(angle)
    # (row, col) of the output -> (row, col) of the input: the inverse of scale, shear, rotate.
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, 0.0], [shear, 1.0]]) @ np.diag([1.0, aspect])
    inverse = np.linalg.inv(forward)
    canvas = np.pad(bitmap.astype(np.float32), BITMAP // 4)  # room for the deformed glyph
    size = canvas.shape[0]
    centre = (size - 1) / 2
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32) - centre
    source = np.einsum("ij,jhw->ihw", inverse, np.stack([rows, cols])) + centre
    if augment.elastic_alpha > 0:
        source += augment.elastic_alpha * np.stack([_smooth_noise(rng, augment.elastic_cells, size)
                                                    for _ in range(2)])
    out = ndimage.map_coordinates(canvas, source, order=1) > 0.5
    if rng.random() < augment.thicken:
        out = ndimage.binary_dilation(out)
    if rng.random() < augment.thin:
        thinner = ndimage.binary_erosion(out)
        if thinner.sum() >= 0.5 * out.sum():
            out = thinner
    if not out.any():  # a degenerate draw: keep the glyph undeformed
        return bitmap
    return normalise_bitmap(out)
