"""Checks of command-line values that run before any work, each naming the option at fault."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datasets_builders.errors import NdbenchError, not_a_file
from datasets_builders.splits import parse_class_list
from methods.weight_sources import EMBEDDED_WEIGHTS, HUB, NO_WEIGHTS

MAX_SEED = 2**32 - 1  # numpy's seed range
# What Linux names the target of /proc/<pid>/fd/N when the descriptor is no file on disk.
STREAM_NAMES = ("pipe:[", "socket:[", "anon_inode:")

if TYPE_CHECKING:
    from methods.weights_arch import Shapes


def parse_ids(text: str | None, option: str) -> list[int] | None:
    """`--classes 0,3` style lists (None when the option is not given)."""
    return None if text is None else parse_class_list(text, option)


def check_seed(seed: int, option: str = "--seed") -> int:
    """A seed numpy, torch and python all accept."""
    if not 0 <= seed <= MAX_SEED:
        raise NdbenchError(f"{option} {seed} is out of range", f"use seeds from 0 to {MAX_SEED}")
    return seed


def parse_seeds(text: str) -> list[int]:
    """`--seeds 0,1,2`."""
    if not text.strip():
        raise NdbenchError("--seeds is empty", "give one seed or more, e.g. --seeds 0,1,2; the default is 0")
    return [check_seed(seed, "--seeds") for seed in parse_class_list(text, "--seeds", "seeds")]


def parse_methods(text: str) -> list[str]:
    """`--method knn,defend`: known method names, repeats dropped."""
    from methods.registry import get_class

    names = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if not names:
        raise NdbenchError("--method is empty", "name at least one method, e.g. --method knn (see `ndbench methods`)")
    for name in names:
        get_class(name)
    return names


def check_weights(weights: str | None, option: str = "--weights") -> None:
    """`--weights` (or the value of `option`, e.g. "--set weights"): hub, none, embedded or an
    existing file."""
    if weights is None or weights in (HUB, NO_WEIGHTS, EMBEDDED_WEIGHTS):
        return
    accepted = f"{HUB} (timm's hub), {NO_WEIGHTS} (random init), {EMBEDDED_WEIGHTS} (the shipped small backbones)"
    if not weights.strip():
        raise NdbenchError(f"{option} is empty", f"give {accepted} or a weights file")
    if not Path(weights).is_file():
        given = f"{option}={weights}" if option.startswith("--set ") else f"{option} {weights}"
        raise NdbenchError(
            f"{given}: {not_a_file(Path(weights)) if Path(weights).exists() else 'no such file'}",
            f"give a local state dict or .safetensors file, or one of {HUB}, {NO_WEIGHTS}, {EMBEDDED_WEIGHTS}",
        )


def check_run_configs(methods: list[str], *, dataset: str, settings: list[str], preset: str | None,
                      overrides: dict[str, Any], weights: str | None) -> list[str]:
    """What each method's config in a run is built from, checked before any work: the
    --preset name, a --set backbone or weights, and a backbone without embedded weights where
    the weights are "embedded", each refused naming the option that chose it; then each
    config's own check (e.g. an img_size its ViT backbone cannot cut into patches), and a
    weights file of another architecture than the method's backbone (`_check_weights_arch`).
    `overrides` are the run's --set options, each given to the methods that have it (`split_overrides`).
    Returns a note for each --set option some methods do not have, and for each method that
    --preset leaves as it was."""
    from methods.registry import get_class

    from .overrides import split_overrides

    if preset is not None and not preset.strip():
        names = "; ".join(f"{method}: {', '.join(get_class(method).preset_names())}" for method in methods)
        raise NdbenchError("--preset is empty", f"drop --preset for each method's defaults, or name one: {names}")
    per_method, notes = split_overrides(methods, overrides)
    read: dict[str, Shapes] = {}  # a weights file several methods take is read once
    for method in methods:
        own, option = per_method[method], _weights_option(method, overrides, weights)
        built = {setting: _run_config(method, dataset, setting, preset, own, weights) for setting in settings}
        for config in built.values():
            _check_run_config(method, config, preset, own, weights, option)
            get_class(method).check_config(config)
            _check_weights_arch(method, config, option, read)
        if preset and all(config == _run_config(method, dataset, setting, None, own, weights)
                          for setting, config in built.items()):
            why = ("its paper recipe is its defaults" if get_class(method).resolve_preset(preset) is None
                   else "every option it sets already has that value")
            notes.append(f"--preset {preset} changes nothing for {method}: {why}")
    return notes


def _run_config(method: str, dataset: str, setting: str, preset: str | None, overrides: dict[str, Any],
                weights: str | None) -> Any:
    """The config a run's job of `method` on `dataset` and `setting` is built with."""
    from .runner import Job, RunOptions, build_detector, freeze_overrides

    job = Job(method, dataset, setting, "", 0, freeze_overrides(overrides), preset or "")
    return build_detector(job, RunOptions(weights=weights)).config


def _weights_option(method: str, overrides: dict[str, Any], weights: str | None) -> str:
    """The option that gives `method` its weights in a run: --weights (also when no option
    does, for a preset's), else --set METHOD.weights or --set weights."""
    if weights is None:
        for name in (f"{method}.weights", "weights"):
            if name in overrides:
                return f"--set {name}"
    return "--weights"


def _check_weights_arch(method: str, config: Any, option: str, read: dict[str, Shapes]) -> None:
    """A weights file the config names (not hub, none or embedded) holds the architecture of
    the method's backbone, as `methods.backbones.load_weights` checks it, in the same words
    but naming the method and `option`, the one that gave the file. `read`: each file's
    tensors' shapes, by path, as read so far."""
    from methods.weights_arch import check_weights_file, weight_shapes

    arch, weights = getattr(config, "backbone", None), getattr(config, "weights", None)
    named = (HUB, NO_WEIGHTS, EMBEDDED_WEIGHTS)
    if not isinstance(arch, str) or not isinstance(weights, str | Path) or weights in named:
        return
    if str(weights) not in read:
        read[str(weights)] = weight_shapes(Path(weights))
    check_weights_file(arch, Path(weights), owner=method, option=option, shapes=read[str(weights)])


def _check_run_config(method: str, config: Any, preset: str | None, overrides: dict[str, Any],
                      weights: str | None, option: str) -> None:
    """One config's backbone and weights (see `check_run_configs`); `option`: the one that
    gives the method its weights."""
    from methods.backbones import check_model_name
    from methods.shipped_weights import SHIPPED_ARCHS, check_embedded_arch

    arch = getattr(config, "backbone", None)
    if "backbone" in overrides and arch is not None:
        try:
            check_model_name(arch)
        except NdbenchError as exc:
            raise NdbenchError(f"--set backbone={arch}: {exc.problem}", exc.fix) from None
    if weights is None and "weights" in overrides and hasattr(config, "weights"):
        check_weights(config.weights, option)
    if getattr(config, "weights", None) != EMBEDDED_WEIGHTS or arch is None:
        return
    try:
        check_embedded_arch(arch)
    except NdbenchError:
        if weights is not None:  # the user's own --weights embedded: its message names it
            raise
        made_for = f"they are made for {' and '.join(SHIPPED_ARCHS)}"
        pretrain = f"pre-train it with `ndbench pretrain --arch {arch}` (hours)"
        if "weights" in overrides:
            raise NdbenchError(f"--set weights={EMBEDDED_WEIGHTS}: {arch} has no embedded weights ({made_for})",
                               f"use --set weights={HUB} or a weights file, or {pretrain}") from None
        default = f"the weights of the embedded preset ({made_for})"
        if "backbone" in overrides:
            problem = f"{method} --set backbone={arch}: {arch} has no embedded weights, {default}"
            instead = "keep the embedded preset's backbone"
        elif preset:
            problem = f"{method} --preset {preset} sets backbone {arch}, which has no embedded weights, {default}"
            instead = f"drop --preset {preset}"
        else:
            raise
        raise NdbenchError(problem, f"run {method} with --weights {HUB} or --weights FILE, {pretrain}, "
                           f"or {instead}") from None


def check_executor(executor: str, ray_address: str | None, retries: int,
                   ray_cpus_per_job: float | None = None, ray_gpus_per_job: float | None = None,
                   device: str = "auto") -> None:
    """`--executor`, the Ray-only options, `--retries` and `--device` together."""
    from .executors import EXECUTORS

    if executor not in EXECUTORS:
        raise NdbenchError(f"unknown executor {executor!r}", f"use --executor {' or '.join(EXECUTORS)}")
    ray_only = {"--ray-address": ray_address, "--ray-cpus-per-job": ray_cpus_per_job,
                "--ray-gpus-per-job": ray_gpus_per_job}
    for option, value in ray_only.items():
        if value is not None and executor != "ray":
            raise NdbenchError(f"{option} needs --executor ray", f"add --executor ray or drop {option}")
    if retries < 0:
        raise NdbenchError(f"--retries {retries} is negative", "use --retries 0 (the default) or more")
    # Ray hides every GPU but a task's own, which the task sees as device 0.
    if executor == "ray" and device.startswith("cuda:"):
        raise NdbenchError(f"--device {device} cannot be used with --executor ray: Ray gives each job its own GPU",
                           "use --device cuda (or auto), and --ray-gpus-per-job for how much of a GPU a job takes")


def check_parallel(parallel: str, executor: str) -> int | None:
    """`--parallel` (a positive number, or None for auto) with `--executor`."""
    from .parallel import parse_parallel

    if executor != "local" and parallel != "1":
        raise NdbenchError("--parallel is for --executor local", "drop --parallel (Ray places jobs itself: "
                           "see --ray-cpus-per-job)")
    return parse_parallel(parallel)


def check_maps_method(method: str) -> None:
    """The --method of ndbench maps: a method with anomaly maps."""
    from methods.registry import available, get_class

    if not hasattr(get_class(method), "anomaly_map"):
        with_maps = [m for m in available() if hasattr(get_class(m), "anomaly_map")]
        raise NdbenchError(f"method {method!r} has no anomaly maps", f"use --method {' or '.join(with_maps)}")


def check_output_file(path: Path, option: str) -> None:
    """`option` names a file that can be written: not a folder, under a writable folder (the
    nearest one that exists; the rest is made when the file is written). Checked before the
    work whose result it receives; creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise NdbenchError(f"{option} {path} is a folder", f"give a file path with {option}")
    target = Path(os.path.realpath(path)) if path.is_symlink() else path  # the file a write replaces
    if target.parent.name == "fd" and target.name.startswith(STREAM_NAMES):
        # /dev/stderr, /dev/fd/N on a pipe or socket: a link to a stream of this process
        kind = target.name.split(":", 1)[0]
        raise NdbenchError(f"{option} {path} is a {kind} of this process, not a file",
                           f"give a file path with {option}")
    _check_writable_place(target.parent, option)


def check_output_folder(path: Path, option: str) -> None:
    """`option` names a folder that is, or can be made, writable; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NdbenchError(f"{option} {path} is a file, not a folder", f"give a folder with {option}")
    _check_writable_place(path, option)


def _check_writable_place(folder: Path, option: str) -> None:
    """The nearest existing one of `folder` and its parents is a writable folder."""
    for place in (folder, *folder.parents):
        if place.exists():
            if not place.is_dir():
                raise NdbenchError(f"{option}: {place} is a file, not a folder", f"choose another place with {option}")
            try:  # a real probe: access() says yes to root even where nothing can be created
                with tempfile.TemporaryFile(dir=place):
                    pass
            except OSError as exc:
                raise NdbenchError(f"{option}: cannot write in {place} ({exc.strerror or exc})",
                                   f"choose a writable place with {option}") from None
            return
