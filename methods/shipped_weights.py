"""The embedded backbones' weights that ship inside the package, and where "embedded"
weights come from: the shipped file when it was made for the current data config, generator
and recipe (its sha256 checked), else ndbench's cache, pre-trained on first use.

`ndbench pretrain --ship` makes the shipped files (`methods/weights/`) and their manifest,
which records the command, the data config, the generator and recipe versions, each file's
sha256 and the held-out figures measured on it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from datasets_builders.atomic import atomic_write_files
from datasets_builders.embedded import GENERATOR_VERSION, EmbeddedConfig, generator_fingerprint
from datasets_builders.errors import NdbenchError

from .pretrain import (
    DEFAULT_ARCH,
    DEFAULT_CNN,
    RECIPE_VERSION,
    PretrainRecipe,
    PretrainResult,
    default_recipe,
    default_weights_path,
    pretrain,
)
from .weight_sources import EMBEDDED_WEIGHTS, HUB

WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST = "manifest.json"
SHIP_COMMAND = "ndbench pretrain --ship"
SHIPPED_ARCHS = (DEFAULT_CNN, DEFAULT_ARCH)  # the CNN first: it is the ViT's dense teacher


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plain(value) -> object:
    """A value as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def read_manifest(folder: Path | None = None) -> dict | None:
    """The shipped weights' manifest (in `folder`, default WEIGHTS_DIR), or None when there is none."""
    path = Path(folder or WEIGHTS_DIR) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise NdbenchError(f"shipped weights manifest {path} is not valid JSON",
                           f"reinstall ndbench, or run `{SHIP_COMMAND}` to make it again") from exc


def mismatch(manifest: dict | None, arch: str, data: EmbeddedConfig, recipe: PretrainRecipe) -> str | None:
    """Why the shipped weights of `arch` do not fit `data` and `recipe` (None when they do)."""
    if manifest is None:
        return "the package ships no weights manifest"
    entry = manifest.get("weights", {}).get(arch)
    if entry is None:
        return f"the package ships no weights for {arch}"
    if manifest.get("generator_version") != GENERATOR_VERSION:
        theirs = manifest.get("generator_version")
        return f"they were made with embedded generator {theirs}, this is {GENERATOR_VERSION}"
    if manifest.get("recipe_version") != RECIPE_VERSION:
        return f"they were made with recipe version {manifest.get('recipe_version')}, this is {RECIPE_VERSION}"
    for what, theirs, ours in (("data config", manifest.get("data"), _plain(asdict(data))),
                               ("recipe", entry.get("recipe"), _plain(asdict(recipe)))):
        if theirs != ours:
            keys = sorted(k for k in set(theirs or {}) | set(ours) if (theirs or {}).get(k) != ours.get(k))
            return f"they were made for another {what} ({', '.join(keys)} differ)"
    return None


def shipped_file(arch: str, data: EmbeddedConfig, recipe: PretrainRecipe,
                 folder: Path | None = None) -> Path | None:
    """The shipped weights file of `arch` (in `folder`, default WEIGHTS_DIR) when it was made
    for `data` and `recipe`, after checking its sha256; None when it was made for something else."""
    folder = Path(folder or WEIGHTS_DIR)
    manifest = read_manifest(folder)
    if mismatch(manifest, arch, data, recipe) is not None:
        return None
    entry = manifest["weights"][arch]
    path = Path(folder) / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise NdbenchError(
            f"shipped weights {path} are missing or do not match the sha256 in {Path(folder) / MANIFEST}",
            f"reinstall ndbench, or run `{SHIP_COMMAND}` to make them again",
        )
    return path


def embedded_weights(
    arch: str,
    *,
    data: EmbeddedConfig | None = None,
    recipe: PretrainRecipe | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
    folder: Path | None = None,
) -> Path:
    """The embedded weights of `arch`: the shipped file when it fits `data` and `recipe`
    (defaults: the current ones), else the cache's, pre-trained first when missing (saying so
    in one line on stderr)."""
    data = data or EmbeddedConfig()
    recipe = recipe or default_recipe(arch)
    found = shipped_file(arch, data, recipe, folder)
    if found is not None:
        return found
    cached = default_weights_path(arch, data, recipe)
    if not (cached.is_file() and cached.with_suffix(".json").is_file()):
        why = mismatch(read_manifest(folder), arch, data, recipe)
        Console(stderr=True, highlight=False).print(
            f"{arch}: not using the shipped weights ({why}); pre-training into {cached.parent}", soft_wrap=True)
    return pretrain(arch, data=data, recipe=recipe, device=device, console=console).weights


def check_embedded_arch(arch: str) -> None:
    """Refuse "embedded" weights for a backbone that would need an hours-long pre-training on
    the embedded pool first: any but the embedded dataset's own, unless `ndbench pretrain
    --arch` already made them (the cache file runs find)."""
    if arch in SHIPPED_ARCHS or default_weights_path(arch, EmbeddedConfig(), default_recipe(arch)).is_file():
        return
    raise NdbenchError(
        f"--weights {EMBEDDED_WEIGHTS}: {arch} has no embedded weights (they are made for "
        f"{' and '.join(SHIPPED_ARCHS)}; pre-training {arch} on the digit pool takes hours)",
        f"pass --weights {HUB}, a weights file, or pre-train it first with `ndbench pretrain --arch {arch}`",
    )


def write_half(source: Path, target: Path) -> None:
    """Copy a safetensors weights file to `target` (atomically) with its floating-point tensors
    in float16 and its metadata kept: half the bytes; models load them back into float32."""
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    half = {key: value.half() if value.is_floating_point() else value for key, value in tensors.items()}
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        save_file(half, str(tmp), metadata=metadata)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def ship(*, device: torch.device | None = None, console: Console | None = None, folder: Path | None = None,
         data: EmbeddedConfig | None = None, force: bool = False) -> dict:
    """Pre-train every shipped architecture with its default recipe on `data` (default: the
    current default config), measure it, and write the files and the manifest to `folder`.
    Weights already in the cache for that architecture, data and recipe are reused unless `force`.
    The files are staged until every stage has run, then replace the shipped ones as one step:
    an interrupt or failure in between leaves the earlier files and manifest, still in step."""
    data = data or EmbeddedConfig()
    device = device or torch.device("cpu")
    folder = Path(folder or WEIGHTS_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict] = {}
    teacher: Path | None = None
    with tempfile.TemporaryDirectory(dir=folder, prefix=".ship-") as staging:
        files: dict[Path, str | bytes] = {}
        for arch in SHIPPED_ARCHS:
            recipe = default_recipe(arch)
            result = pretrain(arch, data=data, recipe=recipe, device=device, console=console, force=force,
                              teacher_weights=teacher if recipe.dense_teacher else None)
            half = Path(staging) / f"{arch}.safetensors"
            write_half(result.weights, half)
            teacher = result.weights if arch == DEFAULT_CNN else teacher
            entries[arch] = _entry(arch, recipe, result, half, data, device)
            files[folder / half.name] = half.read_bytes()
        manifest = {
            "command": SHIP_COMMAND,
            "generator_version": GENERATOR_VERSION,
            # Checked by the test suite, not at load time (it renders a sample: seconds).
            "generator_fingerprint": generator_fingerprint(data),
            "recipe_version": RECIPE_VERSION,
            "data": _plain(asdict(data)),
            "weights": entries,
            "made_with": {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        }
        files[folder / MANIFEST] = json.dumps(manifest, indent=1) + "\n"
        atomic_write_files(files)
    return manifest


def _entry(arch: str, recipe: PretrainRecipe, result: PretrainResult, half: Path, data: EmbeddedConfig,
           device: torch.device) -> dict:
    """The manifest entry of one shipped file: its checksum, recipe and measured figures."""
    from .pretrain_eval import evaluate_backbone, heldout_scene_instance_accuracy, load_classifier, weight_classes

    full_precision, _ = load_classifier(arch, result.weights, device)
    return {
        "file": half.name,
        "sha256": sha256_file(half),
        "bytes": half.stat().st_size,
        "recipe": _plain(asdict(recipe)),
        "train_seconds": round(result.train_seconds, 1),
        "pool_heldout_accuracy": result.heldout_accuracy,
        **evaluate_backbone(arch, half, data, device),
        "fp32_scene_test_instance_accuracy": heldout_scene_instance_accuracy(
            full_precision, weight_classes(result.weights), data, device),
    }
