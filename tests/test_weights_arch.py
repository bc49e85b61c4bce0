"""Which architecture a weights file holds (methods.weights_arch): the check `ndbench oracle`
and every backbone's weights loading share, and the one line `ndbench run --weights` gives
for weights of another architecture than a method's backbone."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from small_splits import fresh_out, save_random_vit

import methods.embedded_archs  # noqa: F401 - registers the embedded archs with timm
from benchmark.cli import main
from datasets_builders.errors import NdbenchError
from methods.backbones import create_backbone, tiny_vit_kwargs
from methods.weights_arch import WeightsArch, check_backbone_weights, state_shapes, weight_shapes, weights_arch

CNN, VIT = "ndbench_resnet_embedded", "ndbench_vit_embedded"
CLASSES = tuple(f"digit-{d}" for d in range(10))


def shapes_of(arch: str, **kwargs) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of `arch`'s weights (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        return state_shapes(timm.create_model(arch, pretrained=False, **{"num_classes": 0, **kwargs}).state_dict())


def test_weights_arch_fits_its_own_arch_and_names_the_shipped_one_it_holds(tmp_path):
    path = tmp_path / "w.safetensors"  # nothing recorded beside it: the shapes tell
    assert weights_arch(VIT, path, shapes_of(VIT)).fits
    # A classifier head and a position embedding of another grid are the same architecture's.
    assert weights_arch(VIT, path, shapes_of(VIT, num_classes=11, img_size=128)).fits
    assert weights_arch(VIT, path, shapes_of(CNN)) == WeightsArch(False, CNN)
    assert weights_arch(CNN, path, shapes_of(VIT)).held == VIT
    assert weights_arch("vit_tiny_patch16_224", path, shapes_of(VIT)).held == VIT
    assert weights_arch(VIT, path, {**shapes_of(VIT), "extra.weight": (3,)}) == WeightsArch(False, None)


def test_what_pretrain_recorded_beside_a_file_names_what_it_holds(tmp_path):
    path = tmp_path / "w.safetensors"
    partial = {key: shape for key, shape in shapes_of(CNN).items() if key != "conv1.weight"}
    assert weights_arch(VIT, path, partial).held is None
    (tmp_path / "w.json").write_text(json.dumps({"arch": CNN}))
    assert weights_arch(VIT, path, partial).held == CNN
    (tmp_path / "w.json").write_text(json.dumps({"arch": VIT}))  # never the asked arch itself
    assert weights_arch(VIT, path, shapes_of(CNN)).held == CNN
    (tmp_path / "w.json").write_text(json.dumps({"arch": "someone_elses_net"}))
    with torch.device("meta"):
        vit = timm.create_model(VIT, pretrained=False, num_classes=0)
    with pytest.raises(NdbenchError) as info:  # no --set backbone for a name timm does not know
        check_backbone_weights(vit, VIT, path, partial)
    assert info.value.problem == f"weights file {path} holds someone_elses_net weights, not those of the backbone {VIT}"
    assert "--set" not in info.value.fix


def test_weight_shapes_read_a_safetensors_header_or_a_torch_state_dict_as_loading_names_them(tmp_path):
    tensors = {"module.a.weight": torch.zeros(2, 3), "b": torch.zeros(4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    torch.save({"epoch": 1, "state_dict": tensors}, tmp_path / "w.pth")
    expected = {"a.weight": (2, 3), "b": (4,)}
    assert weight_shapes(tmp_path / "w.safetensors") == weight_shapes(tmp_path / "w.pth") == expected
    with pytest.raises(NdbenchError, match="does not exist"):
        weight_shapes(tmp_path / "gone.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_loading_another_archs_weights_names_what_they_hold(tmp_path, suffix):
    path = save_random_vit(tmp_path / "cnn.safetensors", CLASSES, arch=CNN)
    if suffix == ".pt":
        torch.save(load_file(str(path)), tmp_path / "cnn.pt")
        path = tmp_path / "cnn.pt"
    with pytest.raises(NdbenchError) as info:
        create_backbone(VIT, weights=path, num_classes=0)
    assert info.value.problem == f"weights file {path} holds {CNN} weights, not those of the backbone {VIT}"
    assert info.value.fix == (f"pass --weights embedded for {VIT}'s own weights, or a weights file of {VIT}; or "
                              f"--set backbone={CNN} to run on these, if the method works on a backbone other "
                              "than a ViT")


def test_weights_of_no_known_arch_say_most_of_the_backbone_is_not_in_them(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3), "bn1.num_batches_tracked": torch.tensor(0)}, path)
    with pytest.raises(NdbenchError) as info:
        create_backbone("vit_tiny_patch16_224", weights=path, **tiny_vit_kwargs())
    message = str(info.value)
    assert "holds the weights of another architecture than the backbone vit_tiny_patch16_224: " in message
    assert "30 of its 30 tensors are missing or of another shape (first 'cls_token')" in message
    assert "num_batches_tracked" not in message
    assert "pass --weights hub for timm's weights of vit_tiny_patch16_224" in message


def knn_refuses(path, option: str = "--weights", backbone_option: str = "--set backbone") -> str:
    """The line `ndbench run` gives when knn (ViT backbone) is given the CNN weights at `path`
    with `option`."""
    set_form = option.startswith("--set ")
    embedded = f"{option}=embedded" if set_form else f"{option} embedded"
    return (f"ndbench: error: weights file {path} holds {CNN} weights, not those of knn's backbone {VIT} "
            f"(pass {embedded} for {VIT}'s own weights, or a weights file of {VIT}; or "
            f"{backbone_option}={CNN} to run on these, if knn works on a backbone other than a ViT)")


def test_run_with_weights_of_another_arch_is_one_line_before_any_job(splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    cnn = save_random_vit(tmp_path / "cnn.safetensors", CLASSES, arch=CNN)
    run = ["run", "--method", "knn", "--classes", "0", "--weights", str(cnn), "--out", str(out), "--device", "cpu"]
    assert main(run) == 2
    assert capsys.readouterr().err.strip().splitlines() == [knn_refuses(cnn)]
    assert not list(out.glob("runs/**/*.json"))
    # knn takes a CNN: the hint runs it on the file as it is.
    assert main([*run, "--set", f"backbone={CNN}"]) == 0, capsys.readouterr().err


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """An empty $NDBENCH_CACHE: a run that got as far as its splits would generate scenes in it."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def refused_before_any_work(run: list[str], cache, out, capsys) -> list[str]:
    """The error lines of `run`, which must be refused (exit 2) before scenes, splits or
    results are made."""
    assert main(run) == 2
    assert not list(cache.glob("embedded-*")) and not out.exists()
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_weights_of_another_arch_are_refused_before_the_scenes_and_splits(empty_cache, tmp_path, capsys, extra):
    out, cnn = tmp_path / "results", tmp_path / "cnn.pt"
    # A torch file: read whole, still before any work.
    torch.save(load_file(str(save_random_vit(tmp_path / "cnn.safetensors", CLASSES, arch=CNN))), cnn)
    run = ["run", "--method", "knn", "--weights", str(cnn), "--out", str(out), "--device", "cpu", *extra]
    assert refused_before_any_work(run, empty_cache, out, capsys) == [knn_refuses(cnn)]


def test_a_run_of_several_methods_names_the_method_whose_backbone_refuses(empty_cache, tmp_path, capsys):
    out = tmp_path / "results"
    cnn = save_random_vit(tmp_path / "cnn.safetensors", CLASSES, arch=CNN)
    vit = save_random_vit(tmp_path / "vit.safetensors", CLASSES)
    run = ["run", "--out", str(out), "--device", "cpu", "--dry-run"]
    # kdad's backbone is the CNN: the file fits it, not knn's ViT.
    assert refused_before_any_work([*run, "--method", "kdad,knn", "--weights", str(cnn)], empty_cache, out,
                                   capsys) == [knn_refuses(cnn)]
    assert refused_before_any_work([*run, "--method", "knn,kdad", "--weights", str(vit)], empty_cache, out,
                                   capsys) == [
        f"ndbench: error: weights file {vit} holds {VIT} weights, not those of kdad's backbone {CNN} (pass "
        f"--weights embedded for {CNN}'s own weights, or a weights file of {CNN}; or --set backbone={VIT} to run "
        "on these, if kdad works on a ViT)"]


def test_the_check_before_the_work_takes_what_loading_takes(tmp_path):
    from benchmark.validate import check_run_configs

    # A ViT's position grid follows its img_size; the method's own img_size is another.
    torch.manual_seed(0)
    state = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=128).state_dict()
    vit = tmp_path / "vit128.safetensors"
    save_file(state, str(vit))
    for img_size in (32, 64, 128):
        assert check_run_configs(["knn"], dataset="embedded", settings=["uni-class", "multi-class"], preset=None,
                                 overrides={"img_size": img_size}, weights=str(vit)) == []
        create_backbone(VIT, weights=vit, num_classes=0, img_size=img_size)
