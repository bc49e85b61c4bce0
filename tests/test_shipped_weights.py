"""The weights the package ships for the embedded backbones: the manifest must match the code
(so they cannot go stale), the files their sha256; they are used when they fit, refused when
corrupt, and otherwise ndbench pre-trains into the cache and says so."""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from datasets_builders.atomic import atomic_write_files
from datasets_builders.embedded import GENERATOR_VERSION, EmbeddedConfig, generator_fingerprint
from datasets_builders.errors import NdbenchError, WriteFailure
from methods import shipped_weights
from methods.pretrain import RECIPE_VERSION, PretrainResult, default_recipe, default_weights_path, resolve_weights
from methods.pretrain_eval import heldout_scene_instance_accuracy, load_classifier
from methods.shipped_weights import (
    MANIFEST,
    SHIP_COMMAND,
    SHIPPED_ARCHS,
    WEIGHTS_DIR,
    check_embedded_arch,
    embedded_weights,
    mismatch,
    read_manifest,
    sha256_file,
    shipped_file,
)

VIT = "ndbench_vit_embedded"
# Floors under the shipped weights' test-instance accuracy (measured: CNN 96.7 %, ViT 98.1 %
# with 3 renders per instance; the ViT's aim, as an ImageNet-21k ViT knows VOC's objects, is 97 %).
MIN_INSTANCE_ACCURACY = {"ndbench_resnet_embedded": 0.95, VIT: 0.97}
STALE = f"the shipped weights are stale: run `{SHIP_COMMAND}` and commit methods/weights/"


def _plain(value):
    return json.loads(json.dumps(value))


def test_the_manifest_matches_the_code():
    """Changing the generator, the recipe or the default data config without new weights fails here."""
    manifest = read_manifest()
    assert manifest is not None, STALE
    assert manifest["command"] == SHIP_COMMAND
    assert manifest["generator_version"] == GENERATOR_VERSION, STALE
    # What the generator draws, not only its version number: an unversioned change fails here too.
    assert manifest["generator_fingerprint"] == generator_fingerprint(EmbeddedConfig()), STALE
    assert manifest["recipe_version"] == RECIPE_VERSION, STALE
    assert manifest["data"] == _plain(asdict(EmbeddedConfig())), STALE
    assert sorted(manifest["weights"]) == sorted(SHIPPED_ARCHS)
    for arch in SHIPPED_ARCHS:
        entry = manifest["weights"][arch]
        assert entry["recipe"] == _plain(asdict(default_recipe(arch))), STALE
        assert mismatch(manifest, arch, EmbeddedConfig(), default_recipe(arch)) is None
        path = WEIGHTS_DIR / entry["file"]
        assert sha256_file(path) == entry["sha256"] and path.stat().st_size == entry["bytes"]
        assert path.stat().st_size < 8_000_000  # a few MB each
        assert entry["scene_test_instance_accuracy"] >= MIN_INSTANCE_ACCURACY[arch]
        assert abs(entry["scene_test_instance_accuracy"] - entry["fp32_scene_test_instance_accuracy"]) < 0.005
    probe = manifest["weights"][VIT]["patch_probe"]
    assert set(probe) >= {"class_accuracy", "object_vs_background_balanced_accuracy"}


def test_the_package_ships_the_weights_folder():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["methods"]
    assert {"weights/*.safetensors", f"weights/{MANIFEST}"} <= set(patterns)
    assert WEIGHTS_DIR == Path(shipped_weights.__file__).parent / "weights"


@pytest.mark.parametrize("arch", SHIPPED_ARCHS)
def test_shipped_weights_recognise_digit_instances_no_pretraining_saw(arch):
    data = EmbeddedConfig()
    path = shipped_file(arch, data, default_recipe(arch))
    assert path is not None, STALE
    model, classes = load_classifier(arch, path, torch.device("cpu"))
    assert classes[:10] == tuple(f"digit-{d}" for d in range(10))
    accuracy = heldout_scene_instance_accuracy(model, classes, data, torch.device("cpu"), copies=1)
    assert accuracy >= MIN_INSTANCE_ACCURACY[arch]


def _fake_shipment(folder: Path, arch: str = VIT, data: EmbeddedConfig | None = None) -> Path:
    """A shipped-weights folder whose manifest fits `data` and the default recipe."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{arch}.safetensors"
    weights.write_bytes(b"not really weights")
    manifest = {
        "command": SHIP_COMMAND, "generator_version": GENERATOR_VERSION, "recipe_version": RECIPE_VERSION,
        "data": _plain(asdict(data or EmbeddedConfig())),
        "weights": {arch: {"file": weights.name, "sha256": sha256_file(weights),
                           "recipe": _plain(asdict(default_recipe(arch)))}},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    return weights


def _no_training(*args, **kwargs):
    raise AssertionError("pre-trained although shipped weights fit")


def test_fitting_shipped_weights_are_used_without_training(tmp_path, monkeypatch):
    weights = _fake_shipment(tmp_path / "weights")
    monkeypatch.setattr(shipped_weights, "pretrain", _no_training)
    assert embedded_weights(VIT, folder=tmp_path / "weights") == weights
    monkeypatch.setattr(shipped_weights, "WEIGHTS_DIR", tmp_path / "weights")
    assert resolve_weights(VIT, "embedded") == weights
    assert resolve_weights(VIT, "hub") == "hub"  # other values pass through


def test_embedded_weights_for_another_backbone_need_its_pretraining_first(tmp_path, monkeypatch):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    for arch in SHIPPED_ARCHS:
        check_embedded_arch(arch)
    other = "vit_tiny_patch16_224"
    with pytest.raises(NdbenchError, match=f"{other} has no embedded weights") as refused:
        check_embedded_arch(other)
    assert f"ndbench pretrain --arch {other}" in refused.value.fix
    cached = default_weights_path(other, EmbeddedConfig(), default_recipe(other))  # what pretrain writes
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    check_embedded_arch(other)


def test_a_corrupt_shipped_file_is_refused_in_one_line(tmp_path):
    weights = _fake_shipment(tmp_path / "weights")
    weights.write_bytes(b"tampered")
    with pytest.raises(NdbenchError) as info:
        embedded_weights(VIT, folder=tmp_path / "weights")
    message = str(info.value)
    assert str(weights) in message and SHIP_COMMAND in message and "\n" not in message
    weights.unlink()
    with pytest.raises(NdbenchError, match="missing"):
        embedded_weights(VIT, folder=tmp_path / "weights")


def test_another_data_config_pretrains_into_the_cache_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    _fake_shipment(tmp_path / "weights")
    other = EmbeddedConfig(n_pretrain_images=200)
    calls = []

    def fake_pretrain(arch, *, data, recipe, device, console):
        calls.append((arch, data, recipe))
        return PretrainResult(tmp_path / "cache" / "trained.safetensors", arch, 0.5, 1.0, False)

    monkeypatch.setattr(shipped_weights, "pretrain", fake_pretrain)
    path = embedded_weights(VIT, data=other, folder=tmp_path / "weights")
    assert path == tmp_path / "cache" / "trained.safetensors"
    assert calls == [(VIT, other, default_recipe(VIT))]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "n_pretrain_images" in lines[0] and "pre-training" in lines[0]


def test_mismatch_names_what_differs():
    data, recipe = EmbeddedConfig(), default_recipe(VIT)
    fitting = {"generator_version": GENERATOR_VERSION, "recipe_version": RECIPE_VERSION,
               "data": _plain(asdict(data)), "weights": {VIT: {"recipe": _plain(asdict(recipe))}}}
    assert mismatch(fitting, VIT, data, recipe) is None
    assert "no weights manifest" in mismatch(None, VIT, data, recipe)
    assert "no weights for ndbench_resnet_embedded" in mismatch(fitting, "ndbench_resnet_embedded", data, recipe)
    assert "generator" in mismatch({**fitting, "generator_version": "0"}, VIT, data, recipe)
    assert "recipe version" in mismatch({**fitting, "recipe_version": "0"}, VIT, data, recipe)
    from dataclasses import replace

    assert "epochs" in mismatch(fitting, VIT, data, replace(recipe, epochs=recipe.epochs + 1))
    assert "seed" in mismatch(fitting, VIT, EmbeddedConfig(seed=1), recipe)


def test_shipped_files_are_float16_with_the_classes_kept(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from methods.pretrain_eval import weight_classes
    from methods.shipped_weights import write_half

    source, target = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    weight = torch.tensor([1.0, 1 / 3, -2.5])
    save_file({"w": weight, "steps": torch.tensor([7])}, str(source), metadata={"classes": json.dumps(["a", "b"])})
    write_half(source, target)
    with safe_open(str(target), framework="pt") as handle:
        assert handle.get_tensor("w").dtype == torch.float16 and handle.get_tensor("steps").dtype == torch.int64
        assert torch.allclose(handle.get_tensor("w").float(), weight, atol=1e-3)
    assert weight_classes(target) == ("a", "b")
    assert target.stat().st_size < source.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.safetensors", "half.safetensors"]  # no temp left


def test_the_fingerprint_sees_a_generator_change_without_a_version_bump(monkeypatch):
    from datasets_builders import embedded

    data = EmbeddedConfig()
    before = generator_fingerprint(data)
    real = embedded._background
    monkeypatch.setattr(embedded, "_background", lambda rng, size, dark: real(rng, size, dark) * 0.99)
    assert generator_fingerprint(data) != before
    monkeypatch.undo()
    assert generator_fingerprint(data) == before


def test_a_dry_run_names_the_shipped_weights_it_will_use():
    from methods.features import planned_weights_identity, weights_identity

    shipped = shipped_file(VIT, EmbeddedConfig(), default_recipe(VIT))
    assert shipped is not None
    assert planned_weights_identity(VIT, "embedded") == weights_identity(VIT, shipped)


def _stub_stages(monkeypatch, trained: Path, interrupt_at: str | None = None, base: float = 0.0) -> list[str]:
    """`ship` without training or measuring: each "pre-training" writes a tiny weights file
    (its values `base` + the call's number) into `trained`; the one of `interrupt_at` is
    interrupted (SIGINT)."""
    import signal

    from safetensors.torch import save_file

    from benchmark.interrupts import Interrupted
    from methods import pretrain_eval

    calls: list[str] = []

    def fake_pretrain(arch, *, data, recipe, device, console, force, teacher_weights):
        if arch == interrupt_at:
            raise Interrupted(signal.SIGINT)
        calls.append(arch)
        path = trained / f"{arch}-{len(calls)}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.full((4,), base + len(calls))}, str(path), metadata={"classes": json.dumps(["a"])})
        return PretrainResult(path, arch, 0.5, 1.0, False)

    monkeypatch.setattr(shipped_weights, "pretrain", fake_pretrain)
    monkeypatch.setattr(shipped_weights, "generator_fingerprint", lambda data: "fingerprint")
    monkeypatch.setattr(pretrain_eval, "load_classifier", lambda arch, path, device: (None, ("a",)))
    monkeypatch.setattr(pretrain_eval, "evaluate_backbone", lambda arch, path, data, device: {"classes": ["a"]})
    monkeypatch.setattr(pretrain_eval, "heldout_scene_instance_accuracy", lambda *args, **kwargs: 0.9)
    return calls


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_ship_writes_the_files_and_their_manifest_in_step(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    calls = _stub_stages(monkeypatch, tmp_path / "trained")
    manifest = shipped_weights.ship(folder=folder, data=EmbeddedConfig())
    assert calls == list(SHIPPED_ARCHS)
    assert sorted(p.name for p in folder.iterdir()) == sorted([MANIFEST, *(f"{a}.safetensors" for a in SHIPPED_ARCHS)])
    assert read_manifest(folder) == manifest
    for arch in SHIPPED_ARCHS:
        assert shipped_file(arch, EmbeddedConfig(), default_recipe(arch), folder) == folder / f"{arch}.safetensors"


def test_ship_interrupted_after_the_cnn_keeps_the_earlier_files_and_manifest(tmp_path, monkeypatch):
    """The CNN's new file used to land at once, the manifest only after the ViT's ~22 minutes:
    an interrupt in between left every embedded run refusing the shipped weights."""
    folder = tmp_path / "weights"
    _stub_stages(monkeypatch, tmp_path / "trained")
    shipped_weights.ship(folder=folder, data=EmbeddedConfig())
    before = _contents(folder)
    _stub_stages(monkeypatch, tmp_path / "retrained", interrupt_at=VIT, base=10.0)  # the CNN's bytes differ
    from benchmark.interrupts import Interrupted

    with pytest.raises(Interrupted):
        shipped_weights.ship(folder=folder, data=EmbeddedConfig())
    assert _contents(folder) == before  # nothing staged is left either
    for arch in SHIPPED_ARCHS:
        assert shipped_file(arch, EmbeddedConfig(), default_recipe(arch), folder) is not None


def test_a_failed_replace_puts_back_the_files_already_replaced(tmp_path, monkeypatch):
    import os

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes(b"old a")
    files = {folder / name: b"new " + name.encode() for name in ("a.safetensors", "b.safetensors", MANIFEST)}
    real = os.replace

    def replace(source, target):
        if Path(target).name == MANIFEST:
            raise OSError(28, "No space left on device")
        real(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteFailure):
        atomic_write_files(files)  # what ship() puts its files in place with
    monkeypatch.setattr(os, "replace", real)
    assert _contents(folder) == {"a.safetensors": b"old a"}
