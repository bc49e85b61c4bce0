"""`ndbench maps` (anomaly-map grids) and `ndbench bench` (speed figures) on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from defend_fixtures import TINY_VIT
from PIL import Image
from small_splits import fresh_out

from benchmark.bench import BenchConfig, baseline_training, paper_comparison, run_bench
from benchmark.cli import main
from benchmark.maps import CAPTION, HEAT_COLORMAP, TILE, heat_colours, parse_split, pick_images
from datasets_builders.splits import NOVEL


def test_pick_images_halves_normal_and_novel_and_is_seeded():
    labels = np.array([0] * 10 + [1] * 30)
    chosen = pick_images(labels, 8, seed=0)
    assert len(chosen) == 8 == len(set(chosen))
    assert [int(labels[i]) for i in chosen] == [0] * 4 + [NOVEL] * 4
    assert chosen == pick_images(labels, 8, seed=0) and chosen != pick_images(labels, 8, seed=1)
    few_normal = pick_images(np.array([0, 1, 1, 1, 1, 1]), 4, seed=0)
    assert [int(i) for i in few_normal[:1]] == [0] and len(few_normal) == 4  # novel fills the gap
    assert len(pick_images(np.array([0, 1]), 16, seed=0)) == 2


def test_parse_split_names_the_split_as_the_builders_write_it():
    assert parse_split("uni-class/03") == ("uni-class", "3")
    assert parse_split("multi-class/except-007") == ("multi-class", "except-7")
    # `build-splits --normal 3,1` writes normal-1-3: a hint naming normal-3-1 would never be met
    assert parse_split("multi-class/normal-3-1-3") == ("multi-class", "normal-1-3")


def test_heat_colours_span_the_scale():
    from matplotlib import colormaps

    colours = heat_colours(np.array([[0.0, 1.0, 0.5, -3.0, 7.0]]))
    assert colours.dtype == np.uint8 and colours.shape == (1, 5, 3)
    low, high = (colormaps[HEAT_COLORMAP](v, bytes=True)[:3] for v in (0.0, 1.0))
    assert colours[0, 0].tolist() == list(low) == colours[0, 3].tolist()  # clipped below
    assert colours[0, 1].tolist() == list(high) == colours[0, 4].tolist()  # clipped above
    assert colours[0, 0, 2] > colours[0, 0, 0] and colours[0, 1, 0] > colours[0, 1, 2]  # blue -> red


def test_maps_writes_a_grid_of_image_and_heat_pairs(splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    code = main(["maps", "--method", "mkd", "--split", "uni-class/3", "--n", "4", "--weights", "none",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    path = out / "maps" / "mkd__embedded__uni-class__3__seed0.png"
    assert f"wrote {path}" in capsys.readouterr().out.replace("\n", "")
    grid = np.asarray(Image.open(path).convert("RGB"))
    assert grid.shape == (2 * (TILE + CAPTION), 2 * 2 * TILE, 3)  # 4 pairs, 2 per row
    image_tile = grid[CAPTION:CAPTION + TILE, :TILE]
    heat_tile = grid[CAPTION:CAPTION + TILE, TILE:2 * TILE]
    assert not np.array_equal(image_tile, heat_tile)  # the overlay is not the bare image
    assert heat_tile.std() > 0 and not (grid[:CAPTION] == 255).all()  # heat varies; captions drawn


def test_maps_fits_the_config_of_preset_and_set_and_names_the_grid_by_its_hash(splits_root, tmp_path, capsys):
    from benchmark.report_data import map_caption
    from benchmark.runner import Job, RunOptions, build_detector, job_hash

    out = fresh_out(splits_root, tmp_path)
    code = main(["maps", "--method", "mkd", "--split", "uni-class/3", "--n", "2", "--weights", "none",
                 "--device", "cpu", "--out", str(out), "--set", "mask_ratio=0.75", "--set", "k=3"])
    captured = capsys.readouterr()
    assert code == 2 and "mkd has no option 'k'" in captured.err  # checked as ndbench run checks it
    code = main(["maps", "--method", "mkd", "--split", "uni-class/3", "--n", "2", "--weights", "none",
                 "--device", "cpu", "--out", str(out), "--set", "mask_ratio=0.75", "--preset", "paper"])
    assert code == 0, capsys.readouterr().err
    job = Job("mkd", "embedded", "uni-class", "3", 0, (("mask_ratio", 0.75),), "paper")
    config_hash = job_hash(job, build_detector(job, RunOptions(out=out, weights="none")))
    assert build_detector(job, RunOptions(out=out, weights="none")).config.mask_ratio == 0.75
    stem = f"mkd__embedded__uni-class__3__seed0__{config_hash}"
    assert [p.name for p in (out / "maps").iterdir()] == [f"{stem}.png"]
    assert map_caption(stem, {}).endswith(f"seed 0 · config {config_hash}")


@pytest.mark.parametrize(
    "args, needle",
    [(["--method", "knn"], "no anomaly maps"), (["--split", "uni-class"], "--split"),
     (["--split", "sideways/3"], "--split"), (["--n", "0"], "--n 0"),
     (["--split", "uni-class/99"], "unknown class 99 for embedded"),
     (["--split", "multi-class/except-99"], "unknown class 99 for embedded"),
     (["--split", "uni-class/abc"], "no split is named 'uni-class/abc'"),
     (["--split", "multi-class/7"], "no split is named 'multi-class/7'"),
     (["--split", "uni-class/-1"], "no split is named 'uni-class/-1'"),
     (["--split", "uni-class/3/"], "no split is named 'uni-class/3/'"),
     (["--split", "multi-class/normal-1-2"], "--setting multi-class --normal 1,2`"),
     (["--split", "multi-class/normal-2-1-2"], "normal-1-2.json (run `ndbench build-splits embedded")],
)
def test_maps_errors_are_one_line(splits_root, tmp_path, capsys, args, needle):
    out = fresh_out(splits_root, tmp_path)
    code = main(["maps", "--weights", "none", "--device", "cpu", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not (out / "maps").exists() or not any((out / "maps").iterdir())


def test_maps_checks_where_the_grid_goes_before_fitting(splits_root, tmp_path, capsys, monkeypatch):
    import benchmark.maps as maps

    monkeypatch.setattr(maps, "draw_maps", lambda *a, **k: pytest.fail("fitted before checking --out"))
    out = fresh_out(splits_root, tmp_path)
    (out / "maps").write_text("a file where the grids go")
    code = main(["maps", "--method", "mkd", "--weights", "none", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err
    (out / "maps").unlink()
    (out / "maps" / "mkd__embedded__uni-class__0__seed0.png").mkdir(parents=True)
    code = main(["maps", "--method", "mkd", "--weights", "none", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "is a folder, where the grid goes" in err, err


def test_bench_measures_every_figure_on_a_tiny_vit():
    config = BenchConfig(arch=TINY_VIT, img_size=32, batch_size=4, steps=1, count_images=4)
    rows = {row.name: row for row in run_bench(config, torch.device("cpu"), report=lambda _: None)}
    masked, full = rows["MKD train step, 50% tokens dropped"], rows["MKD train step, no tokens dropped"]
    assert masked.value > 0 and full.value > 0 and rows["defend scoring"].value > 0
    ratio = rows["MKD speed-up from token dropping"]
    assert ratio.value == pytest.approx(masked.value / full.value) and ratio.met == (ratio.value >= 1.7)
    passes = rows["teacher passes per training image in MKD"]
    assert passes.value == 1.0 and passes.met


def test_bench_cli_prints_the_table_and_refuses_bad_sizes(capsys):
    args = ["bench", "--no-compare", "--no-baselines", "--no-runs", "--no-loader", "--arch", TINY_VIT, "--img-size",
            "32", "--batch-size", "2", "--steps", "1", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "MKD speed-up from token dropping" in printed and "teacher passes" in printed
    assert main([*args[:-4], "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench", "--img-size", "0"]) == 2  # refused before any work, batch and steps left to the device
    assert "--img-size" in capsys.readouterr().err


def test_paper_comparison_times_defend_against_each_transformaly_case():
    config = BenchConfig(batch_size=2, steps=1, count_images=8)
    tiny = {"backbone": TINY_VIT, "img_size": 32}
    cases = (("all blocks", None, {**tiny, "first_error_block": 0}),
             ("last block", None, {**tiny, "first_error_block": 1}))
    rows = {r.name: r for r in paper_comparison(config, torch.device("cpu"), report=lambda _: None,
                                                 defend_options=tiny, cases=cases)}
    defend = rows["defend scoring, 32 px"].value
    for label, _, _ in cases:
        speed = rows[f"transformaly scoring, {label}"].value
        assert speed > 0 and rows[f"defend / transformaly ({label})"].value == pytest.approx(defend / speed)


def test_baseline_training_times_each_method_through_fit():
    """One row per baseline, named with its input size; the epochs are timed apart from
    fit's fixed costs (dsvdd's two phases both count)."""
    config = BenchConfig(batch_size=8)
    baselines = (("dsvdd", {"img_size": 32, "rep_dim": 32}),
                 ("transformaly", {"backbone": TINY_VIT, "img_size": 32, "first_error_block": 1}))
    rows = baseline_training(config, torch.device("cpu"), report=lambda _: None, baselines=baselines)
    assert [r.name for r in rows] == ["dsvdd training, 32 px", "transformaly training, 32 px"]
    # A tiny fit's extra epochs may be too quick to time on a busy machine: then NaN, never < 0.
    assert all(r.unit == "images/s" and not r.value <= 0 for r in rows)


def test_training_throughput_counts_only_the_extra_epochs():
    """Images/s = batch x extra epochs / (time of the longer fit - time of the 1-epoch fit);
    NaN when the difference is not positive."""
    from benchmark.bench import training_throughput

    def clock(ticks):
        values = iter(ticks)
        return lambda: next(values)

    config = BenchConfig(batch_size=4)
    tiny = {"img_size": 16, "rep_dim": 16}
    # fit 1 epoch: 0 -> 5 s; fit 3 epochs: 10 -> 17 s: 4 images x 2 extra epochs in 2 s.
    speed, size = training_throughput("dsvdd", tiny, config, torch.device("cpu"), clock=clock([0, 5, 10, 17]))
    assert (speed, size) == (4.0, 16)
    speed, _ = training_throughput("dsvdd", tiny, config, torch.device("cpu"), clock=clock([0, 5, 10, 14]))
    assert math.isnan(speed)


def test_bench_config_is_sized_by_device():
    from benchmark.bench import CPU_BENCH, bench_config

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (bench_config(cpu).batch_size, bench_config(cpu).steps) == (CPU_BENCH["batch_size"], CPU_BENCH["steps"])
    assert bench_config(cpu, full=True) == BenchConfig() == bench_config(cuda)
    assert bench_config(cpu, batch_size=4, steps=None).batch_size == 4


def test_bench_sections_are_chosen_by_device_unless_given():
    from benchmark.bench import section_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not section_enabled("compare", None, cpu, full=False)
    assert not section_enabled("baselines", None, cpu, full=False)
    assert section_enabled("runs", None, cpu, full=False)
    assert section_enabled("compare", None, cpu, full=True) and section_enabled("baselines", None, cuda, full=False)
    assert section_enabled("compare", True, cpu, full=False)
    assert not section_enabled("baselines", False, cuda, full=True)


def test_knn_run_level_counts_decodes_and_passes_per_distinct_image(splits_root, tmp_path):
    from benchmark.bench_data import knn_run_level

    rows = {r.name: r for r in knn_run_level(tmp_path / "runs", "cpu", report=lambda _: None, classes=[0, 1],
                                             overrides={"backbone": TINY_VIT, "img_size": 32}, workers=0,
                                             splits_root=splits_root)}
    assert rows["decodes per distinct image, caches cold"].value == 1.0
    assert rows["decodes per distinct image, caches cold"].met
    assert rows["knn frozen passes per distinct image, caches cold"].value == 1.0
    assert rows["decodes per distinct image, caches off"].value > 1.0
    assert rows["decodes + frozen passes, caches warm"].value == 0 and rows["decodes + frozen passes, caches warm"].met
    off, cold = rows["knn x 2 jobs, caches off"].value, rows["knn x 2 jobs, caches cold"].value
    assert rows["knn run speed-up with caches, cold"].value == pytest.approx(off / cold)


def test_loader_speed_reads_the_store_and_decodes_with_workers(tmp_path):
    from benchmark.bench_data import loader_speed

    rows = {r.name: r for r in loader_speed(tmp_path, report=lambda _: None, n_images=8, img_size=32, workers=2,
                                            batch_size=4)}
    assert {"decode + resize, 0 workers", "decode + resize, 1 workers", "decode + resize, 2 workers",
            "read from the image store, 0 workers"} <= set(rows)
    assert all(r.value > 0 for r in rows.values())
    ratio = rows["image store / decoding with 1 worker"]
    assert ratio.value == pytest.approx(rows["read from the image store, 0 workers"].value
                                        / rows["decode + resize, 1 workers"].value)
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 8
    views = rows["defend views, 2 / 0 workers"]
    assert views.value == pytest.approx(rows["defend multi-crop views, 2 workers"].value
                                        / rows["defend multi-crop views, 0 workers"].value)
