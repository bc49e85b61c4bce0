"""Named presets: every one reachable with `--preset`, "paper" resolving per method, unknown
names refused before any work, records carrying the chain, tables marking other presets."""

from __future__ import annotations

import pytest
from cli_checks import one_line_error
from small_splits import fresh_out
from test_tables import rec

from benchmark import tables
from benchmark.cli import main
from benchmark.runner import Job, RunOptions, build_detector, preset_chain
from benchmark.validate import check_run_configs
from datasets_builders.errors import NdbenchError
from methods.base import PAPER_PRESET
from methods.registry import available, get_class


@pytest.mark.parametrize("method", available())
def test_every_named_preset_is_reachable_from_a_job(method):
    cls = get_class(method)
    assert PAPER_PRESET in cls.preset_names()
    for name in cls.preset_names():
        job = Job(method, "voc", "uni-class", "0", 0, preset=name)
        resolved = cls.resolve_preset(name)
        assert preset_chain(job) == (resolved or "")
        config = build_detector(job, RunOptions()).config
        expected = cls.with_preset(resolved).config
        assert config == expected
        for key, value in cls.presets.get(resolved or "", {}).items():
            assert getattr(config, key) == (tuple(value) if isinstance(value, list) else value)


def test_embedded_jobs_layer_the_user_preset_on_top():
    cls = get_class("knn")
    job = Job("knn", "embedded", "multi-class", "except-0", 0, preset="embedded")
    assert preset_chain(job) == "embedded/multi-class+embedded"
    assert preset_chain(Job("knn", "embedded", "uni-class", "0", 0)) == "embedded/uni-class"
    assert cls.resolve_preset(PAPER_PRESET) == cls.paper_preset


def test_unknown_preset_is_one_line_before_any_work(tmp_path, capsys):
    code = main(["run", "--method", "knn", "--preset", "no-such-preset", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "no preset 'no-such-preset'" in err[0] and "paper" in err[0]
    assert not (tmp_path / "splits").exists()  # nothing was built
    with pytest.raises(NdbenchError):
        get_class("knn").resolve_preset("no-such-preset")


def test_paper_table_marks_a_column_measured_with_another_preset(monkeypatch):
    cls = get_class("defend")
    monkeypatch.setattr(cls, "paper_preset", "paper-recipe")
    mine = [rec("defend", "voc", "uni-class", str(c), 0, 0.9) for c in range(3)]
    frame = tables.per_class_table(mine, "voc", "uni-class", paper=True)
    assert "defend (preset defaults)" in frame.columns and "defend" not in frame.columns
    assert any("paper-recipe" in note for note in frame.attrs["notes"])
    for r in mine:
        r.preset = "paper-recipe"
    frame = tables.per_class_table(mine, "voc", "uni-class", paper=True)
    assert "defend" in frame.columns and not any("preset" in n for n in frame.attrs["notes"])
    summary = tables.summary_table([*mine, rec("defend", "voc", "uni-class", "3", 0, 0.8)],
                                   "uni-class", paper=True)
    assert "defend (preset defaults+paper-recipe)" in summary.columns


def test_an_empty_preset_is_refused_naming_each_methods_presets(tmp_path, capsys):
    code = main(["run", "--method", "knn,transformaly", "--preset", "", "--out", str(tmp_path / "out")])
    one_line_error(code, capsys.readouterr().err, "--preset is empty", "drop --preset",
                   "knn: embedded, paper, paper-text", "transformaly: embedded, embedded/multi-class, original, paper")
    assert not (tmp_path / "out").exists()


def test_a_preset_backbone_without_embedded_weights_blames_the_preset(tmp_path, monkeypatch, capsys):
    """On the embedded dataset the embedded preset gives weights "embedded"; a paper recipe with a
    hub backbone is refused naming the preset, not a --weights the user did not pass."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    code = main(["run", "--method", "transformaly", "--preset", "paper", "--out", str(tmp_path / "out")])
    line = one_line_error(code, capsys.readouterr().err, "transformaly --preset paper sets backbone "
                          "vit_base_patch16_224.orig_in21k", "has no embedded weights", "--weights hub",
                          "drop --preset paper")
    assert not line.startswith("ndbench: error: --weights")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_a_preset_that_changes_nothing_is_noted(splits_root, tmp_path, monkeypatch, capsys):
    """knn's paper recipe is its defaults: `--preset paper` runs as without it, and says so."""
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    out = fresh_out(splits_root, tmp_path)
    args = ["run", "--method", "knn", "--classes", "0", "--weights", "none", "--device", "cpu", "--out", str(out),
            "--dry-run"]
    assert main([*args, "--preset", "paper"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: --preset paper changes nothing for knn: its paper recipe is its defaults"], notes
    assert main(args) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize(("method", "preset", "dataset", "why"), [
    ("knn", "paper", "voc", "its paper recipe is its defaults"),
    ("knn", "embedded", "embedded", "every option it sets already has that value"),
    ("transformaly", "original", "voc", "every option it sets already has that value"),
])
def test_the_note_says_why_a_preset_changes_nothing(method, preset, dataset, why):
    overrides = {"backbone": "vit_base_patch16_384.orig_in21k_ft_in1k", "img_size": 384} \
        if preset == "original" else {}
    notes = check_run_configs([method], dataset=dataset, settings=["uni-class"], preset=preset,
                              overrides=overrides, weights="none")
    assert notes == [f"--preset {preset} changes nothing for {method}: {why}"]
    assert check_run_configs([method], dataset=dataset, settings=["uni-class"], preset=None, overrides=overrides,
                             weights="none") == []
