"""Checks of command-line values that run before any work, each naming the option at fault."""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets_builders.errors import NdbenchError, not_a_file
from datasets_builders.splits import parse_class_list
from methods.weight_sources import EMBEDDED_WEIGHTS, HUB, NO_WEIGHTS

MAX_SEED = 2**32 - 1  # numpy's seed range


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


def check_weights(weights: str | None) -> None:
    """`--weights`: hub, none, embedded or an existing file."""
    if weights is None or weights in (HUB, NO_WEIGHTS, EMBEDDED_WEIGHTS):
        return
    if not Path(weights).is_file():
        raise NdbenchError(
            f"--weights {weights}: {not_a_file(Path(weights)) if Path(weights).exists() else 'no such file'}",
            f"give a local state dict or .safetensors file, or one of {HUB}, {NO_WEIGHTS}, {EMBEDDED_WEIGHTS}",
        )


def check_executor(executor: str, ray_address: str | None, retries: int,
                   ray_cpus_per_job: float | None = None, ray_gpus_per_job: float | None = None) -> None:
    """`--executor`, the Ray-only options and `--retries` together."""
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
    _check_writable_place(path.parent, option)


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
