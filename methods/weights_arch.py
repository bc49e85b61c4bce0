"""Which architecture a weights file holds, told cheaply before it is loaded: its tensors'
names and shapes (a safetensors file's header; a torch file's state dict as loading reads
it) against a model, and, when they do not fit, what the file holds instead.

`weights_arch` is the one check; the oracle runs it on its weights against its --arch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from timm.models import split_model_name_tag
from torch import Tensor, nn

from datasets_builders.errors import NdbenchError

from .backbones import WEIGHTS_FIX, head_prefixes, is_head, meta_model, read_state_dict, vit_patch_size

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class WeightsArch:
    """What a weights file holds against the architecture asked for."""

    fits: bool  # its tensors are that architecture's (the head and a ViT's position grid aside)
    held: str | None = None  # when it does not fit: the architecture it holds, when known


def weights_arch(arch: str, path: Path, shapes: Shapes, model: nn.Module | None = None) -> WeightsArch:
    """Whether the weights file at `path`, whose tensors have `shapes`, holds `arch`'s weights
    (`model`'s, when given: `arch` built with options such as a smaller width), and when not,
    the architecture it holds: as recorded beside it or in the shipped weights' manifest, else
    the shipped architecture whose tensors it holds; never `arch` itself."""
    model = model if model is not None else meta_model(arch)
    if model is None or holds(shapes, model):  # not buildable on the meta device: loading checks it
        return WeightsArch(True)
    own = split_model_name_tag(arch)[0]
    held = recorded_arch(path)
    if held is None or split_model_name_tag(held)[0] == own:
        from .shipped_weights import SHIPPED_ARCHS

        held = next((name for name in SHIPPED_ARCHS if name != own and holds(shapes, meta_model(name))), None)
    return WeightsArch(False, held)


def holds(shapes: Shapes, model: nn.Module | None) -> bool:
    """Whether tensors of these shapes are `model`'s weights: every tensor of the model but its
    classifier head, of the model's shape (a ViT's position embedding may have another grid),
    and nothing else but a head."""
    if model is None:
        return False
    heads, expected = head_prefixes(model), model.state_dict()
    return not misfits(shapes, model) and all(key in expected or is_head(key, heads) for key in shapes)


def misfits(shapes: Shapes, model: nn.Module) -> list[str]:
    """The tensors of `model` but its head that are not in `shapes` with their shape (a ViT's
    position embedding may have another grid)."""
    heads = head_prefixes(model)
    wrong = []
    for key, value in model.state_dict().items():
        shape, found = tuple(value.shape), shapes.get(key)
        if is_head(key, heads) or found == shape or (key == "pos_embed" and found and found[-1:] == shape[-1:]):
            continue
        wrong.append(key)
    return wrong


def weight_shapes(path: Path) -> Shapes:
    """The shape of each tensor of a weights file by name, as loading names them ("module."
    dropped): a safetensors file's header only; a torch file as `read_state_dict` reads it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return state_shapes(read_state_dict(path))
    if not path.is_file():
        raise NdbenchError(f"weights file {path} does not exist", WEIGHTS_FIX)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key.removeprefix("module."): tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise NdbenchError(f"cannot read weights file {path}: {exc}", WEIGHTS_FIX) from exc


def state_shapes(state: dict[str, object]) -> Shapes:
    """The shape of each tensor of a state dict (other values left out)."""
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, Tensor)}


def recorded_arch(path: Path) -> str | None:
    """The architecture a weights file was made for, as recorded: in the info `ndbench pretrain`
    writes beside it, or in the shipped weights' manifest; None when neither names it."""
    try:
        info = json.loads(Path(path).with_suffix(".json").read_text(encoding="utf-8"))
        if isinstance(info, dict) and isinstance(info.get("arch"), str):
            return info["arch"]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        pass
    from .shipped_weights import WEIGHTS_DIR, read_manifest

    try:
        shipped = read_manifest() or {}
    except NdbenchError:
        return None
    for name, entry in (shipped.get("weights") or {}).items():
        if isinstance(entry, dict) and (WEIGHTS_DIR / str(entry.get("file"))).resolve() == Path(path).resolve():
            return name
    return None


def is_vit(arch: str) -> bool:
    """Whether `arch` names a timm VisionTransformer (False for a name timm does not know)."""
    try:
        return vit_patch_size(arch) is not None
    except NdbenchError:
        return False
