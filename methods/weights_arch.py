"""Which architecture a weights file holds, told cheaply before it is loaded: its tensors'
names and shapes (a safetensors file's header; a torch file's state dict as loading reads
it) against a model, and, when they do not fit, what the file holds instead.

`weights_arch` is the one check: the oracle runs it on its weights against its --arch;
`check_weights_file` before a run's work against each method's backbone, and
`backbones.load_weights` against the backbone it builds, both with the message of
`check_backbone_weights`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import timm
from safetensors import SafetensorError, safe_open
from timm.models import get_pretrained_cfg, split_model_name_tag
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from datasets_builders.errors import NdbenchError

from .backbones import WEIGHTS_FIX, head_prefixes, is_head, meta_model, read_state_dict, vit_patch_size
from .weight_sources import EMBEDDED_WEIGHTS, HUB

Shapes = dict[str, tuple[int, ...]]
WEIGHTS_OPTION = "--weights"  # the option a weights file is given with, unless told another


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


def own_weights(arch: str, option: str = WEIGHTS_OPTION) -> str:
    """The hint that gives the backbone `arch` weights of its own, as `option` takes them
    ("--weights", or the "--set weights" or "--set METHOD.weights" that named the file)."""
    from .shipped_weights import check_embedded_arch

    try:
        check_embedded_arch(split_model_name_tag(arch)[0])
        return f"pass {given(option, EMBEDDED_WEIGHTS)} for {arch}'s own weights, or a weights file of {arch}"
    except NdbenchError:
        pass
    cfg = get_pretrained_cfg(arch, allow_unregistered=True)
    if cfg and (cfg.hf_hub_id or cfg.url or cfg.file or cfg.state_dict):
        return f"pass {given(option, HUB)} for timm's weights of {arch}, or a weights file of {arch}"
    return f"pass {option} with a weights file of {arch}"


def given(option: str, value: str) -> str:
    """`option` with `value` as the command line writes it: "--weights hub", "--set weights=hub"."""
    return f"{option}={value}" if option.startswith("--set ") else f"{option} {value}"


def backbone_option(option: str) -> str:
    """The --set option that picks the backbone the weights option `option` gives weights to:
    "--set knn.backbone" for "--set knn.weights", else "--set backbone"."""
    return option.removesuffix("weights") + "backbone" if option.startswith("--set ") else "--set backbone"


def check_weights_file(arch: str, path: Path, *, owner: str = "", option: str = WEIGHTS_OPTION,
                       shapes: Shapes | None = None) -> None:
    """`check_backbone_weights` before any work, without building the backbone: against `arch`
    built on the meta device with timm's default options. The options methods build it with
    (img_size, drop rates, dynamic_img_size) change no tensor but a ViT's position grid, which
    is not compared, so a file is refused here when, and only when, loading refuses it for its
    architecture. `shapes`: the file's tensors' shapes when already read (else read here)."""
    model = meta_model(arch)
    if model is None:  # not buildable on the meta device: loading checks it
        return
    shapes = weight_shapes(path) if shapes is None else shapes
    check_backbone_weights(model, arch, Path(path), shapes, owner=owner, option=option)


def check_backbone_weights(model: nn.Module, name: str, path: Path, shapes: Shapes, *, owner: str = "",
                           option: str = WEIGHTS_OPTION) -> None:
    """Raise one NdbenchError when the weights file at `path` (its tensors' `shapes`) holds the
    weights of another architecture than the backbone `model` (the timm model `name`): the one
    it holds when that is known, or when most of the backbone's tensors are not in it. A file
    that nearly fits (a damaged or edited one) passes: loading names its first wrong key.
    `owner`: the method whose backbone it is, named when given; `option`: the one that gave
    the file, which the fix names ("--weights", "--set weights", "--set METHOD.weights")."""
    found = weights_arch(name, path, shapes, model)
    if found.fits:
        return
    fix = own_weights(name, option)
    backbone = f"{owner}'s backbone {name}" if owner else f"the backbone {name}"
    if found.held is None:
        wrong = misfits(shapes, model)
        total = sum(not is_head(key, head_prefixes(model)) for key in model.state_dict())
        if 2 * len(wrong) <= total:
            return
        raise NdbenchError(f"weights file {path} holds the weights of another architecture than {backbone}: "
                           f"{len(wrong)} of its {total} tensors are missing or of another shape "
                           f"(first {wrong[0]!r})", fix)
    problem = f"weights file {path} holds {found.held} weights, not those of {backbone}"
    if not timm.is_model(split_model_name_tag(found.held)[0]):  # recorded by a build that registered it
        raise NdbenchError(problem, fix)
    use = f"{given(backbone_option(option), found.held)} to run on these"
    if is_vit(found.held) != isinstance(model, VisionTransformer):  # methods that read ViT tokens take no CNN
        kind = "a ViT" if is_vit(found.held) else "a backbone other than a ViT"
        use += f", if {owner or 'the method'} works on {kind}"
    raise NdbenchError(problem, f"{fix}; or {use}")
