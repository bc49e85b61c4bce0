"""`--set` in a run of several methods: each option goes to the methods that have it."""

from __future__ import annotations

import pytest
from small_splits import fresh_out, save_random_vit

from benchmark.cli import main
from benchmark.overrides import split_overrides
from benchmark.runner import RunOptions, build_detector, expand_jobs
from datasets_builders.errors import NdbenchError


def test_an_option_goes_to_every_method_that_has_it_and_a_note_names_the_others():
    per_method, notes = split_overrides(["knn", "mkd", "defend"], {"dense_epochs": 1, "epochs": 4})
    assert per_method == {"knn": {}, "mkd": {"epochs": 4}, "defend": {"dense_epochs": 1, "epochs": 4}}
    assert notes == ["--set dense_epochs applies to defend only (knn, mkd have no such option)",
                     "--set epochs applies to mkd, defend only (knn has no such option)"]


def test_a_method_scoped_option_wins_over_the_shared_one_for_that_method_alone():
    per_method, notes = split_overrides(["mkd", "defend"], {"epochs": 1, "defend.epochs": 3,
                                                            "multi_class_weighting": "unique"})
    assert per_method == {"mkd": {"epochs": 1, "multi_class_weighting": "unique"},
                          "defend": {"epochs": 3, "multi_class_weighting": "unique"}}
    assert notes == []


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"colour": 1}, "no method of this run (knn, mkd) has an option 'colour'"),
    ({"mkd.k": 1}, "--set mkd.k: mkd has no option 'k'"),
    ({"dsvdd.epochs": 1}, "'dsvdd' is not a method of this run (knn, mkd)"),
])
def test_an_option_no_method_of_the_run_takes_is_refused(overrides, needle):
    with pytest.raises(NdbenchError) as caught:
        split_overrides(["knn", "mkd"], overrides)
    assert needle in caught.value.problem


def test_jobs_carry_only_their_own_methods_options(splits_root, tmp_path):
    options = RunOptions(out=fresh_out(splits_root, tmp_path), device="cpu", progress=False)
    jobs = expand_jobs(["knn", "mkd", "defend"], settings=["uni-class"], classes=[0], seeds=[0], options=options,
                       overrides={"dense_epochs": 2, "epochs": 1, "defend.epochs": 3})
    configs = {job.method: build_detector(job, options).config for job in jobs}
    assert dict(jobs[0].overrides) == {} and configs["mkd"].epochs == 1
    assert (configs["defend"].epochs, configs["defend"].dense_epochs) == (3, 2)


def test_run_takes_a_method_only_option_beside_methods_without_it(splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    code = main(["run", "--method", "mkd,defend", "--classes", "0", "--set", "dense_epochs=2", "--out", str(out),
                 "--device", "cpu", "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: --set dense_epochs applies to defend only (mkd has no such option)" in captured.err


@pytest.mark.parametrize(("methods", "option", "backbone_option"), [
    ("knn", "--set weights", "--set backbone"),
    ("knn,kdad", "--set knn.weights", "--set knn.backbone"),
])
def test_weights_of_another_arch_from_set_are_refused_naming_that_option(tmp_path, monkeypatch, capsys, methods,
                                                                        option, backbone_option):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    vit, cnn = "ndbench_vit_embedded", "ndbench_resnet_embedded"
    path = save_random_vit(tmp_path / "cnn.safetensors", ("a", "b"), arch=cnn)
    out = tmp_path / "results"
    code = main(["run", "--method", methods, "--set", f"{option.removeprefix('--set ')}={path}", "--out", str(out),
                 "--device", "cpu", "--dry-run"])
    assert code == 2 and not out.exists() and not (tmp_path / "cache").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ndbench: error: weights file {path} holds {cnn} weights, not those of knn's backbone {vit} (pass "
        f"{option}=embedded for {vit}'s own weights, or a weights file of {vit}; or {backbone_option}={cnn} to run "
        "on these, if knn works on a backbone other than a ViT)"]


def test_a_missing_weights_file_of_one_method_names_its_option(tmp_path, capsys):
    code = main(["run", "--method", "knn,kdad", "--set", "knn.weights=/no/such.pt", "--out", str(tmp_path / "r"),
                 "--dry-run"])
    assert code == 2
    assert capsys.readouterr().err.strip() == ("ndbench: error: --set knn.weights=/no/such.pt: no such file (give a "
                                               "local state dict or .safetensors file, or one of hub, none, embedded)")
