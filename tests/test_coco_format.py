"""`build-splits coco-format`: a user's COCO-format files as a benchmark, what real exports get
wrong (each one line, exit 2), and `run --dataset NAME` on the result."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from cli_checks import one_line_error
from coco_format_fixtures import TEST, TRAIN, write_coco_format

from benchmark.cli import main
from benchmark.records import load_records
from benchmark.runner import RunOptions, expand_jobs
from datasets_builders.coco_format import build_command_for
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex
from datasets_builders.splits import Manifest

TINY_KNN = ["--set", "backbone=ndbench_vit_embedded", "--set", "img_size=64", "--weights", "none", "--device", "cpu"]


@pytest.fixture
def source(tmp_path: Path) -> dict[str, Path]:
    return write_coco_format(tmp_path / "export")


def build_args(source: dict[str, Path], out: Path, *extra: str, name: str = "mylab") -> list[str]:
    return [
        "build-splits", "coco-format", "--name", name,
        "--train-annotations", str(source["train_annotations"]),
        "--test-annotations", str(source["test_annotations"]),
        "--train-images", str(source["images"]), "--test-images", str(source["images"]),
        "--out", str(out), *extra,
    ]  # fmt: skip


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_build_writes_the_protocol_with_file_ids_names_and_sub_folders(source, tmp_path, capsys):
    out = tmp_path / "splits"
    assert main(build_args(source, out, "--min-train-images", "2")) == 0
    captured = capsys.readouterr()
    index = DatasetIndex.read(out / "mylab")
    assert index.dataset == "mylab" and index.class_names == {2: "cat", 5: "dog", 9: "bird", 11: "fish"}
    assert index.root == source["images"].resolve()
    assert index.row("train/3").path == "train/a/img_003.jpg" and index.row("train/3").classes == (2, 11)
    assert index.row("train/9").classes == (5,)  # a crowd annotation counts
    assert index.row("train/12").classes == () and index.row("test/8").classes == ()
    assert len(index.subset("train")) == len(TRAIN) and len(index.subset("test")) == len(TEST)
    # fish is in one training image only: --min-train-images 2 leaves it without a split.
    built = sorted(p.relative_to(out / "mylab").as_posix() for p in (out / "mylab").glob("*/*.json"))
    assert built == ["multi-class/except-2.json", "multi-class/except-5.json", "multi-class/except-9.json",
                     "uni-class/2.json", "uni-class/5.json", "uni-class/9.json"]
    assert "note: no split for classes in fewer than 2 training images: 11 fish" in captured.err
    dog = Manifest.read(out / "mylab" / "uni-class" / "5.json")
    assert dog.train == ["train/4", "train/5", "train/6", "train/7", "train/8", "train/9"]
    assert [label for _, label in dog.test] == [1, 1, 0, 0, 0, 1, 1, 1]
    except_cat = Manifest.read(out / "mylab" / "multi-class" / "except-2.json")
    assert "train/3" in except_cat.train  # its fish is normal when only cat is left out
    assert "mylab/uni-class/9" in captured.out and "#train" in captured.out
    recipe = json.loads((out / "mylab" / "source.json").read_text())
    assert recipe["kind"] == "coco-format" and recipe["train_annotations"] == str(source["train_annotations"])


def test_a_large_export_is_announced_before_it_is_read(source, tmp_path, capsys, monkeypatch):
    import datasets_builders.coco as coco

    monkeypatch.setattr(coco, "ANNOUNCED_BYTES", 1)
    assert main(build_args(source, tmp_path / "out")) == 0
    err = capsys.readouterr().err
    assert f"mylab: reading {source['train_annotations']}" in err
    assert f"mylab: reading {source['test_annotations']}" in err


def test_without_min_train_images_every_shared_class_gets_splits(source, tmp_path, capsys):
    out = tmp_path / "splits"
    assert main(build_args(source, out, "--setting", "uni-class")) == 0
    assert sorted(p.stem for p in (out / "mylab" / "uni-class").glob("*.json")) == ["11", "2", "5", "9"]
    assert "note" not in capsys.readouterr().err


def test_images_default_to_the_folder_holding_the_json(tmp_path, capsys):
    source = write_coco_format(tmp_path / "export")
    for subset in ("train", "test"):
        moved = source["images"] / f"{subset}.json"
        source[f"{subset}_annotations"].rename(moved)
        source[f"{subset}_annotations"] = moved
    args = ["build-splits", "coco-format", "--name", "mylab", "--train-annotations", str(source["train_annotations"]),
            "--test-annotations", str(source["test_annotations"]), "--out", str(tmp_path / "splits")]
    assert main(args) == 0, capsys.readouterr().err
    index = DatasetIndex.read(tmp_path / "splits" / "mylab")
    assert index.row("test/1").path == "test/img_001.jpg"


def separate_folders_args(source: dict[str, Path], out: Path) -> list[str]:
    """Build arguments with `images/train` and `images/test` as the two image folders (the
    files' `file_name` entries made relative to them)."""
    args = build_args(source, out)
    args[args.index("--train-images") + 1] = str(source["images"] / "train")
    args[args.index("--test-images") + 1] = str(source["images"] / "test")
    for subset in ("train", "test"):
        prefix = f"{subset}/"
        edit(source[f"{subset}_annotations"],
             lambda d, p=prefix: [i.update(file_name=i["file_name"].removeprefix(p)) for i in d["images"]])
    return args


def test_separate_image_folders_share_their_deepest_common_root(tmp_path, capsys):
    source = write_coco_format(tmp_path / "export")
    args = separate_folders_args(source, tmp_path / "splits")
    assert main(args) == 0, capsys.readouterr().err
    index = DatasetIndex.read(tmp_path / "splits" / "mylab")
    assert index.root == source["images"].resolve() and index.row("train/2").path == "train/b/img_002.jpg"


def test_a_file_saved_with_a_byte_order_mark_reads_as_without(source, tmp_path, capsys):
    """Windows tools and some exporters start UTF-8 files with a BOM; it is not part of the JSON."""
    for subset in ("train", "test"):
        edit(source[f"{subset}_annotations"], lambda d: d["categories"][-1].update(name="poisson-\u00e9"))
    assert main(build_args(source, tmp_path / "plain", "--setting", "uni-class")) == 0
    for subset in ("train", "test"):
        path = source[f"{subset}_annotations"]
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert main(build_args(source, tmp_path / "bom", "--setting", "uni-class")) == 0, capsys.readouterr().err
    plain, bom = DatasetIndex.read(tmp_path / "plain" / "mylab"), DatasetIndex.read(tmp_path / "bom" / "mylab")
    assert bom.rows == plain.rows and bom.class_names == plain.class_names
    assert bom.class_names[11] == "poisson-\u00e9"


def test_a_file_saved_as_utf16_is_refused_naming_its_encoding(source, tmp_path, capsys):
    path = source["train_annotations"]
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))  # with its byte-order mark
    assert main(build_args(source, tmp_path / "splits", "--setting", "uni-class")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path} is saved as UTF-16 (save it as UTF-8, as JSON must be)" in err, err


def _duplicate_image(data):
    data["images"].append(dict(data["images"][0]))


def _missing_image(data):
    data["annotations"][0]["image_id"] = 999


def _missing_category(data):
    data["annotations"][0]["category_id"] = 77


def _float_category(data):
    data["annotations"][0]["category_id"] = 2.0  # equal to 2, but "2.0" in an index nothing reads


def _bool_category(data):
    data["annotations"][0]["category_id"] = True


def _no_categories(data):
    data["categories"] = []


def _negative_category(data):
    for entry in (*data["categories"], *data["annotations"]):
        key = "id" if "name" in entry else "category_id"
        entry[key] = -1 if entry[key] == 11 else entry[key]


def _two_categories_one_name(data):
    data["categories"].append({"id": 12, "name": "cat", "supercategory": "animal"})
    data["annotations"][0]["category_id"] = 12


def _two_categories_one_name_but_spaces(data):
    data["categories"].append({"id": 12, "name": " cat\t", "supercategory": "animal"})
    data["annotations"][0]["category_id"] = 12


def _blank_category_name(data):
    data["categories"][2]["name"] = " \t"


def _renumbered_category(data):
    for entry in (*data["categories"], *data["annotations"]):
        key = "id" if "name" in entry else "category_id"
        entry[key] = 12 if entry[key] == 2 else entry[key]


def _climbing_file_name(data):
    data["images"][0]["file_name"] = "../elsewhere.jpg"


@pytest.mark.parametrize(
    ("subset", "change", "needles"),
    [
        ("train", _duplicate_image, ("lists image id 1 twice", "train.json")),
        ("test", _missing_image, ("refers to image id 999", "test.json", "fix the export")),
        ("train", _missing_category, ("category id 77", "train.json", "fix the export")),
        ("train", _float_category, ("category id 2.0", "train.json")),
        ("test", _bool_category, ("category id True", "test.json")),
        ("test", _no_categories, ("empty 'categories' list", "test.json")),
        ("train", _negative_category, ("'fish'", "negative id -1", "train.json", "ids 0 or above")),
        ("train", _two_categories_one_name,
         ("categories 2 and 12", "train.json", "both named 'cat'", "rename one of them", "both files")),
        ("train", _two_categories_one_name_but_spaces,
         ("categories 2 and 12", "train.json", "both named 'cat'", "spelled 'cat' and ' cat\\t'", "rename one")),
        ("test", _blank_category_name, ("category 9", "test.json", "blank name ' \\t'", "name every category")),
        ("test", _renumbered_category, ("category 'cat' has id 2 in", "train.json but id 12 in", "test.json")),
        ("train", _climbing_file_name, ("'../elsewhere.jpg'", "elsewhere.jpg, outside its image folder")),
    ],
)
def test_what_real_exports_get_wrong_is_one_line(source, tmp_path, capsys, subset, change, needles):
    edit(source[f"{subset}_annotations"], change)
    out = tmp_path / "splits"
    one_line_error(main(build_args(source, out)), capsys.readouterr().err, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("file_name", "target"),
    [
        ("../train/a/img_001.jpg", "train/a/img_001.jpg"),  # inside the index root, not inside images/test
        ("../../outside.jpg", "../outside.jpg"),
        ("{export}/outside.jpg", "../outside.jpg"),
    ],
)
def test_a_file_name_leaving_its_folder_names_the_folder_and_where_it_leads(tmp_path, capsys, file_name, target):
    source = write_coco_format(tmp_path / "export")
    args = separate_folders_args(source, tmp_path / "o")
    file_name = file_name.format(export=tmp_path.resolve() / "export")
    edit(source["test_annotations"], lambda d: d["images"][0].update(file_name=file_name))
    images = source["images"].resolve()
    line = one_line_error(main(args), capsys.readouterr().err, f"{source['test_annotations']} has file_name "
                          f"{file_name!r}, which leads to {os.path.normpath(images / target)}, outside its image "
                          f"folder {images / 'test'}", "as --test-images")
    assert "write each file_name relative to it" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("file_name", ["b/../img_001.jpg", "{test}/img_001.jpg"])
def test_a_file_name_inside_its_folder_but_not_straight_down_is_refused_with_its_plain_form(
    tmp_path, capsys, file_name
):
    source = write_coco_format(tmp_path / "export")
    args = separate_folders_args(source, tmp_path / "o")
    test_folder = source["images"].resolve() / "test"
    file_name = file_name.format(test=test_folder)
    edit(source["test_annotations"], lambda d: d["images"][0].update(file_name=file_name))
    one_line_error(main(args), capsys.readouterr().err, f"has file_name {file_name!r}, which must lead down from "
                   f"its image folder {test_folder} without '..' or a leading '/'", "write it as 'img_001.jpg'")


def test_a_protocol_split_that_cannot_form_is_left_out_with_a_note(source, tmp_path, capsys):
    # Every test image then holds a cat: uni-class/2 has no novel test image. The user chose no
    # classes, so the other splits are written and the one left out is named.
    edit(source["test_annotations"], lambda d: d["annotations"].extend(
        {**d["annotations"][0], "id": 100 + i, "image_id": image["id"]} for i, image in enumerate(d["images"])))
    out = tmp_path / "splits"
    assert main(build_args(source, out)) == 0
    err = capsys.readouterr().err
    assert "note: split mylab/uni-class/2 has no novel test image; not written" in err
    written = sorted(p.relative_to(out / "mylab").as_posix() for p in (out / "mylab").glob("*/*.json"))
    assert "uni-class/2.json" not in written
    assert "uni-class/5.json" in written and "multi-class/except-2.json" in written
    # Asked for by name, the same split is an error.
    code = main(build_args(source, tmp_path / "o2", "--classes", "2", "--setting", "uni-class"))
    one_line_error(code, capsys.readouterr().err, "uni-class/2 has no novel test image")


def test_a_failed_write_leaves_the_previous_build_as_it_was(source, tmp_path, capsys):
    out = tmp_path / "splits"
    assert main(build_args(source, out, "--setting", "uni-class")) == 0
    capsys.readouterr()
    edit(source["train_annotations"], lambda d: d["annotations"].pop())  # a different index
    (out / "mylab" / "multi-class").write_text("a file where the multi-class folder belongs")
    before = {p: p.read_bytes() for p in (out / "mylab").rglob("*") if p.is_file()}
    one_line_error(main(build_args(source, out)), capsys.readouterr().err, "cannot write", "multi-class")
    after = {p: p.read_bytes() for p in (out / "mylab").rglob("*") if p.is_file()}
    assert after == before  # index, manifests and source.json untouched, no temporary file left


def test_an_image_file_in_train_and_test_is_refused(source, tmp_path, capsys):
    def list_a_train_file(data):
        data["images"][-1]["file_name"] = "train/b/img_002.jpg"

    edit(source["test_annotations"], list_a_train_file)
    line = one_line_error(main(build_args(source, tmp_path / "o")), capsys.readouterr().err, "train/b/img_002.jpg")
    assert "training" in line and "testing" in line


def test_an_image_file_listed_twice_in_one_file_is_refused(source, tmp_path, capsys):
    edit(source["train_annotations"], lambda d: d["images"][1].update(file_name=d["images"][0]["file_name"]))
    one_line_error(main(build_args(source, tmp_path / "o")), capsys.readouterr().err,
                   "img_001.jpg twice", "images 1 and 2")


def test_a_rebuild_with_fewer_classes_runs_only_the_current_splits(source, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(build_args(source, out / "splits", "--setting", "uni-class")) == 0
    def drop_birds(data):
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 9]

    edit(source["train_annotations"], drop_birds)
    assert main(build_args(source, out / "splits", "--setting", "uni-class")) == 0
    assert not (out / "splits" / "mylab" / "uni-class" / "9.json").exists()  # removed: no longer formed
    jobs = expand_jobs(["knn"], dataset="mylab", settings=["uni-class"], classes=None, seeds=[0],
                       options=RunOptions(out=out))
    assert sorted(job.split for job in jobs) == ["11", "2", "5"]


def built_splits(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.glob("*/*.json"))


def test_a_protocol_rebuild_removes_the_protocol_splits_it_no_longer_forms(source, tmp_path, capsys):
    out = tmp_path / "results"
    folder = out / "splits" / "mylab"
    assert main(build_args(source, out / "splits")) == 0
    assert main(build_args(source, out / "splits", "--normal", "2,5")) == 0
    (folder / "uni-class" / "99.json").write_text("{}")  # not a manifest: not ndbench's to remove
    capsys.readouterr()
    # Rebuilding one setting with --min-train-images 2 drops fish (11) from that setting only.
    assert main(build_args(source, out / "splits", "--setting", "uni-class", "--min-train-images", "2")) == 0
    assert "note: removed 1 manifests of an earlier build that this build no longer forms: uni-class/11" in (
        capsys.readouterr().err)
    assert built_splits(folder) == ["multi-class/except-11", "multi-class/except-2", "multi-class/except-5",
                                    "multi-class/except-9", "multi-class/normal-2-5", "uni-class/2",
                                    "uni-class/5", "uni-class/9", "uni-class/99"]
    assert (folder / "uni-class" / "99.json").read_text() == "{}"
    (folder / "uni-class" / "99.json").unlink()
    # A build of chosen splits removes nothing; a protocol build of both settings leaves the chosen normal set.
    assert main(build_args(source, out / "splits", "--classes", "11")) == 0
    assert "uni-class/11" in built_splits(folder) and "multi-class/except-9" in built_splits(folder)
    assert main(build_args(source, out / "splits", "--min-train-images", "2")) == 0
    assert built_splits(folder) == ["multi-class/except-2", "multi-class/except-5", "multi-class/except-9",
                                    "multi-class/normal-2-5", "uni-class/2", "uni-class/5", "uni-class/9"]
    capsys.readouterr()
    run = ["run", "--dataset", "mylab", "--method", "knn", "--setting", "all", "--out", str(out), "--dry-run",
           *TINY_KNN]
    assert main(run) == 0
    listed = capsys.readouterr().out
    assert "mylab/uni-class/9" in listed and "mylab/uni-class/11" not in listed and "except-11" not in listed


def test_a_failed_rebuild_keeps_the_manifests_it_would_remove(source, tmp_path, capsys, monkeypatch):
    import datasets_builders.atomic as atomic

    out = tmp_path / "splits"
    assert main(build_args(source, out, "--setting", "uni-class")) == 0
    before = {p: p.read_bytes() for p in (out / "mylab").rglob("*") if p.is_file()}
    real_unlink = Path.unlink

    def refuse_removal(path: Path, missing_ok: bool = False) -> None:
        if path.name == "11.json":
            raise OSError(28, "No space left on device")
        real_unlink(path, missing_ok=missing_ok)

    monkeypatch.setattr(atomic.Path, "unlink", refuse_removal)
    edit(source["train_annotations"], lambda d: d["annotations"].pop(0))  # a different index
    code = main(build_args(source, out, "--setting", "uni-class", "--min-train-images", "2"))
    monkeypatch.undo()
    one_line_error(code, capsys.readouterr().err, "cannot write")
    after = {p: p.read_bytes() for p in (out / "mylab").rglob("*") if p.is_file()}
    assert after == before  # the new index and manifests rolled back, 11.json still there


@pytest.mark.parametrize("link", ["folder", "file"])
def test_a_symlink_leading_out_of_the_image_folder_is_refused(tmp_path, capsys, link):
    """A file reached through a link in the image folder is read from where the link leads,
    so it must lie inside that folder as a file_name must."""
    source = write_coco_format(tmp_path / "export")
    args = separate_folders_args(source, tmp_path / "o")
    outside = tmp_path / "outside"
    outside.mkdir()
    (source["images"] / "test" / "img_001.jpg").rename(outside / "img_001.jpg")
    if link == "folder":
        (source["images"] / "test" / "linked").symlink_to(outside, target_is_directory=True)
        edit(source["test_annotations"], lambda d: d["images"][0].update(file_name="linked/img_001.jpg"))
    else:
        (source["images"] / "test" / "img_001.jpg").symlink_to(outside / "img_001.jpg")
    file_name = "linked/img_001.jpg" if link == "folder" else "img_001.jpg"
    images = source["images"].resolve()
    one_line_error(main(args), capsys.readouterr().err,
                   f"image 1 in {source['test_annotations']} has file_name {file_name!r}, which leads through a "
                   f"symbolic link to {outside.resolve() / 'img_001.jpg'}, outside its image folder {images / 'test'}",
                   "as --test-images")
    assert not (tmp_path / "o").exists()


def test_the_same_file_through_a_symlink_is_the_same_image(source, tmp_path, capsys):
    alias = source["images"] / "test" / "alias.jpg"
    alias.symlink_to(source["images"] / "train" / "a" / "img_001.jpg")
    edit(source["test_annotations"], lambda d: d["images"][0].update(file_name="test/alias.jpg"))
    one_line_error(main(build_args(source, tmp_path / "o")), capsys.readouterr().err, "img_001.jpg")


def test_category_names_lose_surrounding_whitespace(source, tmp_path, capsys):
    """"dog " in one file is the "dog" of the other, and tables name it "dog"."""
    edit(source["train_annotations"], lambda d: d["categories"][1].update(name="dog "))
    edit(source["test_annotations"], lambda d: d["categories"][2].update(name="\tbird"))
    out = tmp_path / "splits"
    assert main(build_args(source, out, "--setting", "uni-class")) == 0, capsys.readouterr().err
    assert DatasetIndex.read(out / "mylab").class_names == {2: "cat", 5: "dog", 9: "bird", 11: "fish"}


def test_the_build_command_quotes_its_paths(tmp_path, capsys):
    """The recorded command, pasted into a shell, gives back each path as one argument."""
    source = write_coco_format(tmp_path / "lab's \"export\" $HOME `x`")
    out = tmp_path / "splits"
    assert main(build_args(source, out, "--setting", "uni-class")) == 0, capsys.readouterr().err
    args = shlex.split(build_command_for(out / "mylab", "mylab"))
    assert args[:4] == ["ndbench", "build-splits", "coco-format", "--name"]
    given = dict(zip(args[3::2], args[4::2], strict=True))
    assert given == {"--name": "mylab", "--train-annotations": str(source["train_annotations"].resolve()),
                     "--test-annotations": str(source["test_annotations"].resolve()),
                     "--train-images": str(source["images"].resolve()),
                     "--test-images": str(source["images"].resolve())}
    assert main([*args[1:], "--out", str(out), "--setting", "uni-class"]) == 0, capsys.readouterr().err


def test_ids_may_repeat_across_the_two_files(source, tmp_path, capsys):
    """Both files number their images from 1 (as exports do); that is not a shared image."""
    assert set(TRAIN) & set(TEST)
    assert main(build_args(source, tmp_path / "splits", "--setting", "uni-class")) == 0, capsys.readouterr().err


def test_a_missing_image_file_is_named(source, tmp_path, capsys):
    (source["images"] / "train" / "b" / "img_004.jpg").unlink()
    one_line_error(main(build_args(source, tmp_path / "o")), capsys.readouterr().err, "img_004.jpg", "missing",
                   "fix --train-images / --test-images")


@pytest.mark.parametrize(
    ("name", "extra", "needle"),
    [
        ("voc", [], "built-in dataset"),
        ("../up", [], "not a plain folder name"),
        ("mylab", ["--min-train-images", "-1"], "negative"),
        ("mylab", ["--root", "somewhere"], "coco-format takes no --root"),
        ("mylab", ["--class-order", "alphabetical"], "coco-format takes no --root, --year or --class-order"),
        ("mylab", ["--normal", "2,5", "--classes", "9"], "--normal and --classes both choose splits"),
        ("mylab", ["--normal", "2,5", "--setting", "uni-class"], "--normal defines a multi-class split"),
        ("mylab", ["--setting", "both"], "unknown setting 'both'"),
    ],
)
def test_bad_options_are_one_line(source, tmp_path, capsys, name, extra, needle):
    out = tmp_path / "o"
    one_line_error(main(build_args(source, out, *extra, name=name)), capsys.readouterr().err, needle)
    assert not out.exists()


def test_missing_annotations_option_and_foreign_options(source, tmp_path, capsys):
    code = main(["build-splits", "coco-format", "--name", "mylab", "--test-annotations",
                 str(source["test_annotations"]), "--out", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, "--train-annotations")
    code = main(["build-splits", "voc", "--name", "mylab", "--out", str(tmp_path / "o")])
    one_line_error(code, capsys.readouterr().err, "coco-format options")


def test_no_class_in_both_subsets(source, tmp_path, capsys):
    edit(source["test_annotations"], lambda d: d.update(annotations=[]))
    one_line_error(main(build_args(source, tmp_path / "o")), capsys.readouterr().err, "no class occurs in both")


def test_round_trip_build_then_run_knn(source, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(build_args(source, out / "splits", "--min-train-images", "2")) == 0
    capsys.readouterr()
    run = ["run", "--dataset", "mylab", "--method", "knn", "--setting", "all", "--out", str(out), *TINY_KNN]
    assert main(run) == 0, capsys.readouterr().err
    records = load_records(out)
    assert sorted((r.setting, r.split) for r in records) == [
        ("multi-class", "except-2"), ("multi-class", "except-5"), ("multi-class", "except-9"),
        ("uni-class", "2"), ("uni-class", "5"), ("uni-class", "9"),
    ]  # fmt: skip
    for r in records:
        assert r.dataset == "mylab" and 0.0 <= r.metrics["auroc"] <= 1.0
        assert r.counts["test_normal"] + r.counts["test_novel"] == len(TEST)
    assert "mylab uni-class" in capsys.readouterr().out
    # A split the build skipped is not rebuilt behind the user's back: the error names the command.
    line = one_line_error(main([*run, "--classes", "11"]), capsys.readouterr().err, "build-splits coco-format")
    assert "--name mylab" in line and str(source["train_annotations"]) in line and "--classes 11" in line


def test_a_record_made_on_an_earlier_build_of_its_split_is_run_again(source, tmp_path, capsys):
    out = tmp_path / "results"
    build = build_args(source, out / "splits", "--setting", "uni-class", "--classes", "5")
    run = ["run", "--dataset", "mylab", "--method", "knn", "--classes", "5", "--out", str(out), *TINY_KNN]
    assert main(build) == 0 and main(run) == 0
    assert main(run) == 0 and "0 jobs ran, 1 skipped" in capsys.readouterr().err
    # The lab re-labels its data: image 7 loses its dog, so split 5 has one training image fewer.
    edit(source["train_annotations"], lambda d: d.update(
        annotations=[a for a in d["annotations"] if a["image_id"] != 7]))
    assert main(build) == 0
    dry = ["run", "--dataset", "mylab", "--method", "knn", "--classes", "5", "--out", str(out), "--dry-run"]
    capsys.readouterr()
    assert main([*dry, *TINY_KNN]) == 0 and "skip (record exists)" not in capsys.readouterr().out
    assert main(run) == 0
    err = capsys.readouterr().err
    assert "made on an earlier build of split mylab/uni-class/5; re-running its job" in err and "1 jobs ran" in err
    (record,) = load_records(out)
    assert record.split_sha256 == Manifest.read(out / "splits" / "mylab" / "uni-class" / "5.json").sha256
    assert record.counts["train"] == 5


def test_run_on_an_unbuilt_name_names_the_build_command(tmp_path, capsys):
    code = main(["run", "--dataset", "mylab", "--method", "knn", "--out", str(tmp_path / "results")])
    one_line_error(code, capsys.readouterr().err, "unknown dataset 'mylab'", "build-splits coco-format")


def test_a_missing_or_damaged_manifest_names_the_coco_format_build(source, tmp_path, capsys):
    out = tmp_path / "splits"
    assert main(build_args(source, out)) == 0
    manifest = out / "mylab" / "uni-class" / "5.json"
    manifest.write_text("{")
    with pytest.raises(NdbenchError, match="is not valid JSON") as damaged:
        Manifest.read(manifest)
    manifest.unlink()
    with pytest.raises(NdbenchError, match="no split manifest") as missing:
        Manifest.read(manifest)
    for error in (damaged.value, missing.value):
        assert "ndbench build-splits coco-format --name mylab" in error.fix, error.fix


def test_a_built_normal_set_is_run_with_the_all_vs_one_splits(source, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(build_args(source, out / "splits", "--normal", "2,5")) == 0  # only normal-2-5
    capsys.readouterr()
    run = ["run", "--dataset", "mylab", "--method", "knn", "--setting", "multi-class", "--out", str(out), *TINY_KNN]
    assert main(run) == 0, capsys.readouterr().err
    assert [r.split for r in load_records(out)] == ["normal-2-5"]
    assert main(build_args(source, out / "splits", "--setting", "multi-class", "--min-train-images", "2")) == 0
    assert main(run) == 0, capsys.readouterr().err
    assert sorted(r.split for r in load_records(out)) == ["except-2", "except-5", "except-9", "normal-2-5"]
    assert "normal-2-5" in (out / "tables" / "per_class_mylab_multi-class.md").read_text()


def test_a_record_run_again_without_save_models_loses_the_model_of_its_earlier_run(source, tmp_path, capsys):
    from benchmark.models import load_model, model_path

    out = tmp_path / "results"
    build = build_args(source, out / "splits", "--setting", "uni-class", "--classes", "5")
    run = ["run", "--dataset", "mylab", "--method", "knn", "--classes", "5", "--out", str(out), *TINY_KNN]
    assert main(build) == 0 and main([*run, "--save-models"]) == 0
    (record_file,) = (out / "runs").rglob("*.json")
    assert model_path(record_file).is_file()
    edit(source["train_annotations"], lambda d: d.update(
        annotations=[a for a in d["annotations"] if a["image_id"] != 7]))
    assert main(build) == 0 and main(run) == 0
    assert "1 jobs ran" in capsys.readouterr().err
    assert not model_path(record_file).exists()  # it was fitted on the earlier build of the split
    assert main([*run, "--force", "--save-models"]) == 0
    (record,) = load_records(out)
    assert load_model(model_path(record_file)).info["split"]["sha256"] == record.split_sha256


def test_the_closing_hint_runs_the_splits_where_they_were_built(source, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "my results"
    assert main(build_args(source, out / "splits", "--setting", "uni-class", "--classes", "5")) == 0
    hint = capsys.readouterr().out.split("run them with `")[1].split("`")[0]
    assert hint == f"ndbench run --dataset mylab --method knn --out '{out}'"
    assert main(["run", *hint.split(" --out ")[0].split()[2:], "--out", str(out), "--dry-run", *TINY_KNN]) == 0
    assert "mylab/uni-class/5" in capsys.readouterr().out
    assert main(build_args(source, Path("results/splits"), "--setting", "uni-class", "--classes", "5")) == 0
    assert "run them with `ndbench run --dataset mylab --method knn`" in capsys.readouterr().out
    # Splits outside a folder named `splits` cannot be found by `run`: the hint says how to build them.
    assert main(build_args(source, Path("o"), "--setting", "uni-class", "--classes", "5")) == 0
    assert ("reads the splits under DIR/splits, so to run them build with `--out o/splits` and run "
            "`ndbench run --dataset mylab --method knn --out o`") in capsys.readouterr().out


def test_an_unknown_class_lists_the_dataset_s_own_ids(source, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(build_args(source, out / "splits")) == 0
    capsys.readouterr()
    run = ["run", "--dataset", "mylab", "--method", "knn", "--out", str(out), "--classes", "3", *TINY_KNN]
    one_line_error(main(run), capsys.readouterr().err, "unknown class 3 for mylab (use one of 2,5,9,11)")
    maps = ["maps", "--dataset", "mylab", "--method", "mkd", "--split", "uni-class/3", "--out", str(out)]
    one_line_error(main(maps), capsys.readouterr().err, "unknown class 3 for mylab (use one of 2,5,9,11)")
    from datasets_builders.splits import describe_ids

    assert describe_ids([3, 1, 2]) == "ids 1..3" and describe_ids([1, 3]) == "one of 1,3"
    assert describe_ids([*range(1, 12), 13, 14]) == "one of 1..14 (13 ids, not every one between; see index.json)"


def test_maps_on_an_unbuilt_normal_set_names_it_and_its_build(source, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(build_args(source, out / "splits", "--setting", "multi-class")) == 0  # except-k only
    capsys.readouterr()
    maps = ["maps", "--dataset", "mylab", "--method", "mkd", "--out", str(out), "--split"]
    line = one_line_error(main([*maps, "multi-class/normal-2-5"]), capsys.readouterr().err,
                          "no split manifest at", "multi-class/normal-2-5.json")
    assert "build-splits coco-format --name mylab" in line and "--setting multi-class --normal 2,5" in line
    assert f"--out {out / 'splits'}" in line
    one_line_error(main([*maps, "multi-class/normal-2-3"]), capsys.readouterr().err, "unknown class 3 for mylab")


def test_the_missing_split_hint_quotes_the_splits_folder(source, tmp_path, capsys):
    """The hint for a custom dataset's missing split, pasted into a shell, writes where the run reads."""
    from benchmark.runner import RunOptions, _custom_split_missing

    splits = tmp_path / "my splits"
    assert main(build_args(source, splits, "--setting", "uni-class")) == 0, capsys.readouterr().err
    error = _custom_split_missing("mylab", RunOptions(out=tmp_path, splits_root=splits), "no split x")
    command = error.fix.removeprefix("build it with `").removesuffix("`")
    args = shlex.split(command)
    assert args[args.index("--out") + 1] == str(splits)
