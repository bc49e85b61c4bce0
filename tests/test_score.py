"""`ndbench run --save-models` and `ndbench score`: saved detectors with their provenance,
scores identical to the run's, threshold labels, heat-map overlays, and one-line errors."""

from __future__ import annotations

import csv
import io
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_line_error
from defend_fixtures import TINY_CONFIG, TINY_VIT
from PIL import Image

from benchmark.cli import main
from benchmark.maps import TILE
from benchmark.models import MODEL_FORMAT, MODEL_FORMAT_VERSION, content_sha256, load_model, model_path, save_model
from benchmark.records import Record, load_records
from benchmark.score import ImageFiles, collect_images
from datasets_builders.index import DatasetIndex
from datasets_builders.splits import Manifest
from methods.knn import KNNDetector
from methods.registry import get

CPU = torch.device("cpu")


def write_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 40)) -> list[Path]:
    """`n` random RGB PNGs named img0.png, img1.png, ... under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def toy_record(method: str) -> Record:
    return Record(method=method, config_hash="c0ffee", config={}, dataset="embedded", setting="uni-class",
                  split="0", split_sha256="ab" * 32, normal_classes=[0], seed=0, metrics={"auroc": 0.5},
                  counts={}, train_seconds=0.0, inference_images_per_s=0.0, device="cpu", versions={},
                  created="2024-01-01T00:00:00+00:00")


def fit_and_save(detector, train: list[Path], folder: Path) -> Path:
    """Fit on the image files, save with a threshold from scoring them (half called novel)."""
    data = ImageFiles(train, detector.transform())
    torch.manual_seed(0)
    detector.fit(data, device=CPU)
    scores = detector.score(data, device=CPU)
    labels = np.arange(len(train)) >= len(train) // 2
    path = folder / "toy.model.pt"
    save_model(path, detector, toy_record(detector.name), labels.astype(int), scores)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny knn and a tiny mkd (random 32 px ViT) fitted on random PNGs, saved; and new images."""
    base = tmp_path_factory.mktemp("score")
    train = write_images(base / "train", 8, seed=0)
    knn = fit_and_save(KNNDetector(**TINY_CONFIG), train, base / "knn")
    mkd = fit_and_save(get("mkd", **TINY_CONFIG, epochs=1), train, base / "mkd")
    return {"knn": knn, "mkd": mkd, "new": write_images(base / "new", 3, seed=1, size=(48, 30)), "base": base}


def read_csv(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def test_scores_one_row_per_image_in_the_given_order(toy, tmp_path, capsys):
    folder = toy["new"][0].parent
    single = write_images(tmp_path / "one", 1, seed=5)[0]
    output = tmp_path / "scores.csv"
    assert main(["score", "--model", str(toy["knn"]), str(single), str(folder), "--output", str(output),
                 "--device", "cpu"]) == 0
    rows = read_csv(output.read_text())
    order = [single, *sorted(folder.glob("*.png"))]
    assert [r["image"] for r in rows] == [str(p) for p in order] and list(rows[0]) == ["image", "score"]
    detector = KNNDetector.load(toy["knn"])  # the detector's own load reads the file too
    expected = detector.score(ImageFiles(order, detector.transform()), device=CPU)
    assert [float(r["score"]) for r in rows] == expected.tolist()
    capsys.readouterr()
    assert main(["score", "--model", str(toy["knn"]), str(single), str(folder), "--device", "cpu"]) == 0
    assert read_csv(capsys.readouterr().out) == rows  # no --output: the CSV goes to stdout



def test_hidden_files_in_a_folder_are_skipped_but_named_ones_count(toy, tmp_path, capsys):
    """A folder copied from a Mac holds "._img0.png" resource forks (not images) and a
    ".DS_Store": expanding the folder leaves them out; a hidden file named on its own counts."""
    folder = tmp_path / "mac"
    images = write_images(folder, 2, seed=3)
    (folder / "._img0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    hidden = folder / ".img1.png"
    hidden.write_bytes(images[1].read_bytes())
    assert collect_images([folder]) == images
    assert collect_images([folder, hidden]) == [*images, hidden]
    assert main(["score", "--model", str(toy["knn"]), str(folder), "--device", "cpu"]) == 0
    assert [r["image"] for r in read_csv(capsys.readouterr().out)] == [str(p) for p in images]

def test_threshold_labels_each_image_with_the_stored_statistic(toy, tmp_path):
    output = tmp_path / "scores.csv"
    train = sorted((toy["base"] / "train").glob("*.png"), key=lambda p: int(p.stem[3:]))
    assert main(["score", "--model", str(toy["knn"]), *map(str, train), "--threshold", "--output", str(output),
                 "--device", "cpu"]) == 0
    rows = read_csv(output.read_text())
    threshold = load_model(toy["knn"]).threshold
    assert threshold is not None
    assert [r["label"] for r in rows] == ["novel" if float(r["score"]) >= threshold else "normal" for r in rows]
    # The threshold catches >= 95 % of the images called novel when it was stored (the second half).
    assert all(r["label"] == "novel" for r in rows[len(rows) // 2:])


def test_maps_writes_one_overlay_per_image(toy, tmp_path):
    output, maps = tmp_path / "scores.csv", tmp_path / "maps"
    images = [*toy["new"], toy["new"][0]]  # the same name twice gets a second file
    assert main(["score", "--model", str(toy["mkd"]), *map(str, images), "--maps", str(maps),
                 "--output", str(output), "--device", "cpu"]) == 0
    rows = read_csv(output.read_text())
    written = [Path(r["map"]) for r in rows]
    assert [p.name for p in written] == ["img0.png", "img1.png", "img2.png", "img0-2.png"]
    for path in written:
        with Image.open(path) as overlay:
            assert overlay.format == "PNG" and overlay.size == (48 * 6, 30 * 6)  # short side enlarged to >= TILE
            assert min(overlay.size) >= TILE and np.asarray(overlay).std() > 0


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing model", "no model file"),
        ("corrupt model", "cannot read model file"),
        ("not a model", "is not an ndbench model file"),
        ("unknown method", "unknown method 'nope'"),
        ("other format", "model format 999"),
        ("format as text", "has model format '1' "),
        ("config of another method", "model file {model}: MKDConfig has no option 'k'"),
        ("unreadable image", "cannot read image"),
        ("empty folder", "holds no image files"),
        ("missing image", "no image file or folder"),
        ("maps without maps", "has no anomaly maps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(toy, tmp_path, capsys, case, needle):
    model, images, extra = toy["knn"], [str(toy["new"][0])], []
    if case == "missing model":
        model = tmp_path / "absent.model.pt"
    elif case == "corrupt model":
        model = tmp_path / "corrupt.model.pt"
        model.write_bytes(toy["knn"].read_bytes()[:1000])
    elif case == "not a model":
        model = tmp_path / "state.pt"
        torch.save({"weight": torch.zeros(2)}, model)
    elif case in ("unknown method", "other format", "format as text", "config of another method"):
        payload = torch.load(toy["knn"], weights_only=False)
        payload.update({"unknown method": {"method": "nope"}, "other format": {"format_version": 999},
                        "format as text": {"format_version": "1"},
                        "config of another method": {"method": "mkd"}}[case])
        payload["checksum"] = content_sha256(payload)  # edited, yet consistent: only the named fault remains
        model = tmp_path / "edited.model.pt"
        torch.save(payload, model)
    elif case == "unreadable image":
        (tmp_path / "bad.png").write_text("not an image")
        images.append(str(tmp_path / "bad.png"))
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        images = [str(tmp_path / "empty")]
    elif case == "missing image":
        images.append(str(tmp_path / "absent.png"))
    elif case == "maps without maps":
        extra = ["--maps", str(tmp_path / "maps")]
    output = tmp_path / "scores.csv"
    code = main(["score", "--model", str(model), *images, "--output", str(output), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle.format(model=model) in lines[0], err
    assert lines[0].startswith("ndbench: error:") and "Traceback" not in err
    assert not output.exists() and not (tmp_path / "maps").exists()


@pytest.mark.parametrize("target", ["output image", "output model", "maps over inputs"])
def test_outputs_never_replace_an_input_or_the_model(toy, tmp_path, capsys, target):
    images = [tmp_path / "in" / p.name for p in toy["new"]]
    images[0].parent.mkdir()
    for source, copy in zip(toy["new"], images, strict=True):
        copy.write_bytes(source.read_bytes())
    model = tmp_path / "mkd.model.pt"
    model.write_bytes(toy["mkd"].read_bytes())
    before = {path: path.read_bytes() for path in [*images, model]}
    extra = {"output image": ["--output", str(images[1])], "output model": ["--output", str(model)],
             "maps over inputs": ["--maps", str(images[0].parent)]}[target]
    code = main(["score", "--model", str(model), str(images[0].parent), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    one_line_error(code, err, "overwrite the input image" if target == "maps over inputs" else "is one of the inputs")
    assert {path: path.read_bytes() for path in before} == before


def test_saved_files_hold_format_provenance_and_threshold(toy):
    saved = load_model(toy["mkd"])
    info = saved.info
    assert (info["format"], info["format_version"]) == (MODEL_FORMAT, MODEL_FORMAT_VERSION)
    assert info["split"] == {"id": "embedded/uni-class/0", "sha256": "ab" * 32, "normal_classes": [0]}
    assert info["weights"] == {"setting": "none", "file": None, "sha256": None}
    assert info["threshold"]["statistic"] == "score at 95% TPR on the split's test set"
    assert saved.detector.name == "mkd" and saved.detector.config.backbone == TINY_VIT


def test_weights_from_a_file_are_stored_with_their_sha256(tmp_path):
    import hashlib

    from benchmark.models import weights_info

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"some weights")
    config = KNNDetector(**{**TINY_CONFIG, "weights": str(weights)}).config
    assert weights_info(config) == {"setting": str(weights), "file": str(weights),
                                    "sha256": hashlib.sha256(b"some weights").hexdigest()}


@pytest.mark.parametrize("stored", ["x", {"value": "abc"}, {"value": [1]}, {"value": float("nan")}, float("inf")],
                         ids=["text", "text value", "list value", "nan value", "infinite"])
def test_a_damaged_stored_threshold_is_one_line_not_a_traceback(toy, tmp_path, capsys, stored):
    saved = torch.load(toy["knn"], weights_only=False)
    saved["threshold"] = stored
    damaged = tmp_path / "damaged.model.pt"
    torch.save(saved, damaged)
    assert main(["score", "--model", str(damaged), *map(str, toy["new"]), "--threshold"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "stored threshold" in err and "is not a" in err and "number" in err, err


def flip_tensor_bytes(model: Path) -> bytes:
    """The model file's bytes with every 7th byte of the first 2 kB of its largest tensor
    XOR 0xff: the zip structure stays intact, only tensor data changes."""
    data = bytearray(model.read_bytes())
    with zipfile.ZipFile(model) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    header = largest.header_offset
    name_length, extra_length = struct.unpack("<HH", data[header + 26:header + 30])
    start = header + 30 + name_length + extra_length
    for i in range(start, start + min(2048, largest.file_size), 7):
        data[i] ^= 0xFF
    return bytes(data)


def edit_state(payload: dict, edit: str) -> None:
    """Damage a loaded knn model payload after it was saved, as a hand edit would."""
    features = payload["state"]["train_features"]
    if edit == "nan features":
        payload["state"]["train_features"] = np.full_like(features, np.nan)
    elif edit == "wrong-shaped features":
        payload["state"]["train_features"] = features[:, :5]
    elif edit == "empty features":
        payload["state"]["train_features"] = features[:0]
    elif edit == "changed weights":
        state = payload["state"]["model"]
        name = next(iter(state))
        state[name] = state[name] + 1
    elif edit == "changed config":
        payload["config"]["k"] = 1
    elif edit == "checksum removed":
        del payload["checksum"]


@pytest.mark.parametrize("edit", ["bit flips", "nan features", "wrong-shaped features", "empty features",
                                  "changed weights", "changed config", "checksum removed"])
def test_a_damaged_model_is_one_line_before_any_scoring(toy, tmp_path, capsys, monkeypatch, edit):
    damaged = tmp_path / "damaged.model.pt"
    if edit == "bit flips":
        damaged.write_bytes(flip_tensor_bytes(toy["knn"]))
        torch.load(damaged, weights_only=False)  # torch reads it: only the checksum tells
    else:
        payload = torch.load(toy["knn"], weights_only=False)
        edit_state(payload, edit)
        torch.save(payload, damaged)

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored a damaged model")

    monkeypatch.setattr(KNNDetector, "score", no_scoring)
    output = tmp_path / "scores.csv"
    code = main(["score", "--model", str(damaged), *map(str, toy["new"]), "--output", str(output), "--device", "cpu"])
    one_line_error(code, capsys.readouterr().err, f"model file {damaged} is damaged")
    assert not output.exists()


def test_a_saved_model_reads_back_with_its_checksum(toy):
    payload = torch.load(toy["knn"], weights_only=False)
    assert payload["checksum"] == content_sha256(payload) == content_sha256(torch.load(toy["knn"], weights_only=False))
    assert load_model(toy["knn"]).detector.name == "knn"


def test_a_16_bit_png_scores_as_the_8_bit_one(toy, tmp_path):
    gray = np.random.default_rng(3).integers(0, 256, (40, 40), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as image:
        assert image.mode.startswith("I")  # PIL opens it wider than 8 bits
    output = tmp_path / "scores.csv"
    assert main(["score", "--model", str(toy["knn"]), str(tmp_path / "eight.png"), str(tmp_path / "sixteen.png"),
                 "--output", str(output), "--device", "cpu"]) == 0
    eight, sixteen = (float(row["score"]) for row in read_csv(output.read_text()))
    assert eight == sixteen


def test_a_model_scores_after_its_weights_file_is_gone(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from methods.backbones import create_backbone

    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "w.safetensors"
    save_file(create_backbone(TINY_VIT, weights="none").state_dict(), str(weights))
    train = write_images(tmp_path / "train", 4, seed=0)
    model = fit_and_save(KNNDetector(**{**TINY_CONFIG, "weights": str(weights)}), train, tmp_path)
    args = ["score", "--model", str(model), *map(str, train), "--device", "cpu", "--output"]
    assert main([*args, str(tmp_path / "before.csv")]) == 0
    weights.rename(tmp_path / "moved.safetensors")
    assert main([*args, str(tmp_path / "after.csv")]) == 0
    assert (tmp_path / "after.csv").read_text() == (tmp_path / "before.csv").read_text()


# --- slow: a real run's saved model ----------------------------------------------------------

@pytest.mark.slow
def test_score_reproduces_a_jobs_test_scores_exactly(knn_results, tmp_path):
    record = next(r for r in load_records(knn_results) if r.setting == "uni-class" and r.split == "0" and r.seed == 0)
    record_file = next((knn_results / "runs" / "embedded" / "uni-class" / "knn").glob("0__*__seed0.json"))
    splits = knn_results / "splits" / "embedded"
    index, manifest = DatasetIndex.read(splits), Manifest.read(splits / "uni-class" / "0.json")
    images = [str(Path(index.root) / index.row(image_id).path) for image_id, _ in manifest.test]
    assert all(Path(p).suffix == ".png" for p in images)
    output = tmp_path / "scores.csv"
    model = model_path(record_file)
    assert main(["score", "--model", str(model), *images, "--threshold", "--output", str(output),
                 "--device", "cpu"]) == 0
    mine = read_csv(output.read_text())
    stored = read_csv(record_file.with_suffix(".scores.csv").read_text())
    assert [float(r["score"]) for r in mine] == [float(r["score"]) for r in stored]  # identical, not close
    novel = [m["label"] == "novel" for m, s in zip(mine, stored, strict=True) if s["label"] == "1"]
    normal = [m["label"] == "novel" for m, s in zip(mine, stored, strict=True) if s["label"] == "0"]
    assert np.mean(novel) >= 0.95 and np.mean(normal) == pytest.approx(record.metrics["fpr95"])
    info = load_model(model).info
    assert info["split"]["sha256"] == record.split_sha256 and info["config_hash"] == record.config_hash
    assert info["weights"]["setting"] == "none" and info["seed"] == 0


@pytest.mark.slow
def test_skipped_jobs_without_a_model_are_named_and_force_saves_them(knn_results, splits_root, tmp_path, capsys):
    import shutil

    from small_splits import fresh_out

    out = fresh_out(splits_root, tmp_path)
    shutil.copytree(knn_results / "runs", out / "runs")
    folder = out / "runs" / "embedded" / "uni-class" / "knn"
    next(folder.glob("1__*__seed0.model.pt")).unlink()
    args = ["run", "--method", "knn", "--classes", "0,1", "--weights", "none", "--device", "cpu",
            "--out", str(out), "--save-models"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "0 jobs ran, 2 skipped" in err and "1 skipped job(s) have no saved model" in err
    assert "knn embedded/uni-class/1 seed 0;" in err.split("have no saved model")[1]
    assert main([*args, "--classes", "1", "--force"]) == 0
    assert "1 jobs ran" in capsys.readouterr().err
    assert len(list(folder.glob("*__seed0.model.pt"))) == 2


@pytest.mark.parametrize(("args", "needle"), [
    (["{image}", ""], "an image argument is empty"),
    ([""], "an image argument is empty"),
    (["{image}", "--maps", ""], "--maps is empty"),
    (["{image}", "--output", ""], "--output is empty"),
    (["{image}", "--model", ""], "--model is empty"),
])
def test_an_empty_argument_is_refused_not_read_as_the_current_folder(toy, tmp_path, capsys, monkeypatch, args,
                                                                     needle):
    """An unset shell variable in quotes gives "": it is not "." (every image in the working
    folder, or maps written among them)."""
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path, 2, seed=4)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [arg.format(image=toy["new"][0]) for arg in args]
    code = main(["score", "--model", str(toy["knn"]), "--device", "cpu", *args])
    captured = capsys.readouterr()
    one_line_error(code, captured.err, needle)
    assert captured.out == "" and sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_file_name_that_is_not_utf8_is_written_as_its_own_bytes(toy, tmp_path):
    """A Latin-1 "café.png" (old archives, Samba shares): the CSV holds the name's real bytes,
    in the image and the map column, so it names the file that was scored."""
    folder = tmp_path / "in"
    folder.mkdir()
    latin = folder / os.fsdecode(b"caf\xe9.png")
    latin.write_bytes(toy["new"][0].read_bytes())
    output, maps = tmp_path / "scores.csv", tmp_path / "maps"
    assert main(["score", "--model", str(toy["mkd"]), str(folder), "--maps", str(maps), "--output", str(output),
                 "--device", "cpu"]) == 0
    lines = output.read_bytes().splitlines()
    assert lines[0] == b"image,score,map" and len(lines) == 2
    image, _, drawn = lines[1].split(b",")
    assert image == os.fsencode(latin) and drawn == os.fsencode(maps) + b"/caf\xe9.png"
    assert os.listdir(os.fsencode(maps)) == [b"caf\xe9.png"]


@pytest.mark.parametrize("existed", [False, True])
def test_an_interrupt_while_drawing_maps_leaves_the_maps_folder_as_it_was(toy, tmp_path, capsys, monkeypatch,
                                                                          existed):
    """Ctrl-C says nothing half-written was kept: no map of the call remains (they would mix
    with a later call's, on another colour scale), and files there before are untouched."""
    import signal

    import benchmark.score
    from benchmark.interrupts import Interrupted

    maps = tmp_path / "maps"
    before = {}
    if existed:
        maps.mkdir()
        before = {maps / "img0.png": b"earlier map", maps / "notes.txt": b"mine"}
        for path, data in before.items():
            path.write_bytes(data)
    drawn = []
    real = benchmark.score.overlay

    def overlay_then_interrupt(*args, **kwargs):
        drawn.append(1)
        if len(drawn) == 3:
            raise Interrupted(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(benchmark.score, "overlay", overlay_then_interrupt)
    code = main(["score", "--model", str(toy["mkd"]), *map(str, toy["new"] * 2), "--maps", str(maps),
                 "--output", str(tmp_path / "s.csv"), "--device", "cpu"])
    assert code == 130 and "nothing half-written was kept" in capsys.readouterr().err
    assert not (tmp_path / "s.csv").exists()
    if existed:
        assert {path: path.read_bytes() for path in maps.iterdir()} == before
    else:
        assert not maps.exists()
