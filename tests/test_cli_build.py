"""`ndbench build-splits` end to end: written files, byte-identical rebuilds, and every
bad-input case ending as one line on stderr with exit code 2."""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import one_line_error
from coco_fixtures import write_coco_tree
from coco_format_fixtures import TEST, instances, write_coco_format
from voc_fixtures import write_voc_tree

from benchmark.cli import main
from datasets_builders.errors import NdbenchError
from datasets_builders.index import DatasetIndex, build_index_fix, index_build_command
from datasets_builders.loading import load_split
from datasets_builders.splits import Manifest


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ndbench: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_voc_writes_paper_protocol_and_rebuilds_identically(tmp_path, capsys):
    voc = write_voc_tree(tmp_path / "src")
    out = tmp_path / "splits"
    args = ["build-splits", "voc", "--root", str(voc), "--out", str(out), "--setting", "uni-class"]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json"))
    assert "voc/index.json" in files and (out / "voc" / "index.csv").is_file()
    assert "voc/source.json" in files  # what the index was built from, for rebuild hints
    manifests = [f for f in files if f not in ("voc/index.json", "voc/source.json")]
    assert manifests, files
    first = {f: (out / f).read_bytes() for f in files}
    assert run_cli(args, capsys)[0] == 0
    assert {f: (out / f).read_bytes() for f in files} == first
    manifest = json.loads((out / manifests[0]).read_text())
    assert set(manifest) >= {"dataset", "setting", "normal_classes", "builder_version",
                             "index_sha256", "train", "test", "sha256"}
    assert "voc/uni-class/1" in stdout.replace("\n", " ") or "voc/uni-class" in stdout


def test_coco_builds_through_cli(tmp_path, capsys):
    root = write_coco_tree(tmp_path)
    out = tmp_path / "splits"
    code, stdout, err = run_cli(
        ["build-splits", "coco", "--root", str(root), "--year", "2014", "--out", str(out)], capsys
    )
    assert code == 0, err
    assert sorted(p.name for p in (out / "coco" / "uni-class").glob("*.json"))
    assert sorted(p.name for p in (out / "coco" / "multi-class").glob("except-*.json"))


def test_a_large_coco_annotation_file_is_announced_before_it_is_read(tmp_path, capsys, monkeypatch):
    import datasets_builders.coco as coco

    root = write_coco_tree(tmp_path)
    out = tmp_path / "splits"
    code, _, err = run_cli(["build-splits", "coco", "--root", str(root), "--out", str(out)], capsys)
    assert code == 0 and "reading" not in err  # the tiny files pass in silence
    monkeypatch.setattr(coco, "ANNOUNCED_BYTES", 1)
    code, _, err = run_cli(["build-splits", "coco", "--root", str(root), "--out", str(out)], capsys)
    assert code == 0, err
    for name in ("instances_train2014.json", "instances_val2014.json"):
        assert f"coco: reading {root / 'annotations' / name} (0 MB)" in err


def test_custom_normal_set_is_named_after_its_classes(tmp_path, capsys):
    root = write_coco_tree(tmp_path)
    out = tmp_path / "splits"
    index_meta = None
    code, _, err = run_cli(["build-splits", "coco", "--root", str(root), "--out", str(out),
                            "--setting", "uni-class"], capsys)
    assert code == 0, err
    index_meta = json.loads((out / "coco" / "index.json").read_text())
    first = sorted(int(k) for k in index_meta["class_names"])[0]
    code, printed, err = run_cli(["build-splits", "coco", "--root", str(root), "--out", str(out),
                                  "--normal", str(first)], capsys)
    assert code == 0, err
    assert (out / "coco" / "multi-class" / f"normal-{first}.json").is_file()
    assert "wrote 1 manifest and index.csv" in " ".join(printed.split())


def test_unknown_dataset(capsys, tmp_path):
    code, _, err = run_cli(["build-splits", "imagenet", "--out", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "unknown dataset 'imagenet'", "voc")


def test_missing_root(capsys, tmp_path):
    code, _, err = run_cli(["build-splits", "voc", "--root", str(tmp_path / "nowhere")], capsys)
    assert_one_line_error(code, err, "does not exist", "--root")


def test_wrong_layout_names_what_was_expected(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["build-splits", "voc", "--root", str(tmp_path / "empty"),
                            "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "VOC2012")
    assert not (tmp_path / "out").exists()


def test_malformed_xml_names_the_file_and_writes_nothing(capsys, tmp_path):
    voc = write_voc_tree(tmp_path / "src")
    test_ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    victim = voc / "Annotations" / f"{test_ids[0]}.xml"
    victim.write_text("<annotation><object>", encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(out)], capsys)
    assert_one_line_error(code, err, victim.name)
    assert not out.exists()


def test_listed_image_missing(capsys, tmp_path):
    voc = write_voc_tree(tmp_path / "src")
    victim = sorted((voc / "JPEGImages").glob("*.jpg"))[0]
    victim.unlink()
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, victim.stem)


def test_malformed_coco_json(capsys, tmp_path):
    root = write_coco_tree(tmp_path)
    (root / "annotations" / "instances_val2014.json").write_text("{not json", encoding="utf-8")
    code, _, err = run_cli(["build-splits", "coco", "--root", str(root), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "instances_val2014.json")


def test_unknown_class_id(capsys, tmp_path):
    voc = write_voc_tree(tmp_path / "src")
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--classes", "57",
                            "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "unknown class id 57")


def test_split_without_novel_test_image(capsys, tmp_path):
    voc = write_voc_tree(tmp_path / "src")
    every = ",".join(str(c) for c in range(20))
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--normal", every,
                            "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "no novel test image")


# --- a chosen class whose all-vs-one split cannot form -----------------------------------------
def one_class_alone_nowhere(dataset: str, base: Path) -> tuple[list[str], str]:
    """A small tree of `dataset` where one class's uni-class split forms but its all-vs-one
    split does not (every test image holds another class); the build-splits arguments that
    read it (without --out) and that class's split id prefix."""
    if dataset == "voc":  # cat (15): train 2008_000002; test 2008_000011 also holds a person
        return ["voc", "--root", str(write_voc_tree(base))], "voc"
    if dataset == "coco":  # toothbrush (90) once the empty test image 74 is gone
        root = write_coco_tree(base)
        val = root / "annotations" / "instances_val2014.json"
        data = json.loads(val.read_text())
        data["images"] = [image for image in data["images"] if image["id"] != 74]
        val.write_text(json.dumps(data))
        return ["coco", "--root", str(root)], "coco"
    paths = write_coco_format(base)  # fish (11) beside a bird, and no empty test image
    test = {**{i: objects for i, objects in TEST.items() if i != 8}, 7: [(11, 0), (9, 0)]}
    paths["test_annotations"].write_text(json.dumps(instances(test, lambda i: f"test/img_{i:03d}.jpg")))
    return ["coco-format", "--name", "lab", "--train-annotations", str(paths["train_annotations"]),
            "--test-annotations", str(paths["test_annotations"]), "--train-images", str(paths["images"]),
            "--test-images", str(paths["images"])], "lab"


# The class alone nowhere in the tree, and another class of the dataset.
ALONE_CLASS = {"voc": ("15", "1"), "coco": ("90", "1"), "coco-format": ("11", "2")}


@pytest.mark.parametrize("dataset", list(ALONE_CLASS))
def test_a_chosen_class_without_an_all_vs_one_split_names_the_setting_that_builds(capsys, tmp_path, dataset):
    args, name = one_class_alone_nowhere(dataset, tmp_path / "src")
    (c, another), out = ALONE_CLASS[dataset], tmp_path / "o"
    code, _, err = run_cli(["build-splits", *args, "--out", str(out), "--classes", c], capsys)
    line = one_line_error(code, err, f"split {name}/multi-class/except-{c} has no novel test image",
                          f"every test image holds a class other than {c} (",
                          f"{name}/uni-class/{c} forms: add --setting uni-class")
    assert "leave at least one class" not in line and "or leave" not in line
    assert not out.exists()
    code, _, err = run_cli(["build-splits", *args, "--out", str(out), "--classes", c, "--setting", "multi-class"],
                           capsys)
    one_line_error(code, err, f"{name}/uni-class/{c} forms: build it with --setting uni-class")
    code, _, err = run_cli(["build-splits", *args, "--out", str(out), "--classes", f"{c},{another}",
                            "--setting", "multi-class"], capsys)
    one_line_error(code, err, f"build it with --setting uni-class, or leave {c} out of --classes")
    # As the hint says.
    code, _, err = run_cli(["build-splits", *args, "--out", str(out), "--classes", c, "--setting", "uni-class"],
                           capsys)
    assert code == 0, err
    assert [path.name for path in (out / name).rglob("*.json") if path.parent != out / name] == [f"{c}.json"]


def test_a_chosen_class_with_no_split_names_the_classes_that_have_them(capsys, tmp_path):
    voc = write_voc_tree(tmp_path / "src")
    # bus (17) is in no test image: neither of its splits forms.
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(tmp_path / "o"),
                            "--classes", "17"], capsys)
    one_line_error(code, err, "split voc/uni-class/17 has no normal test image",
                   "choose --classes among those whose uni-class and multi-class splits form: 1,3,14")
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(tmp_path / "o"),
                            "--classes", "17", "--setting", "multi-class"], capsys)
    one_line_error(code, err, "split voc/multi-class/except-17 has no novel test image",
                   "choose --classes among those whose multi-class splits form: 1,3,14")


# --- a build that would replace the index other manifests were built from -------------------------
def folder_files(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_classes_build_of_another_release_is_refused_before_it_replaces_the_index(capsys, tmp_path):
    write_voc_tree(tmp_path / "src", voc2007=True)
    voc, out = tmp_path / "src", tmp_path / "splits"
    assert run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(out), "--setting", "uni-class"],
                   capsys)[0] == 0
    before = folder_files(out / "voc")
    release_2007 = ["build-splits", "voc", "--root", str(voc), "--year", "2007"]
    chosen = ["--classes", "1", "--setting", "uni-class"]
    classes_2007 = [*release_2007, "--out", str(out), *chosen]
    code, _, err = run_cli(classes_2007, capsys)
    line = one_line_error(code, err, f"this build would replace the voc index under {out / 'voc'}, and 3 manifests "
                          "there built from it (uni-class/3, uni-class/14, uni-class/15) would then fail to load",
                          f"`ndbench build-splits voc --root {voc} --out {out}`", "build into another --out",
                          "running this command without --classes, then run it again")
    assert "changed since" not in line
    assert folder_files(out / "voc") == before  # nothing replaced
    # As hinted: elsewhere, or after the release's own protocol build (which replaces or removes them all).
    assert run_cli([*release_2007, "--out", str(tmp_path / "other"), *chosen], capsys)[0] == 0
    assert run_cli([*release_2007, "--out", str(out)], capsys)[0] == 0
    code, _, err = run_cli(classes_2007, capsys)
    assert code == 0, err
    for path in (out / "voc").glob("*/*.json"):
        load_split(out, f"voc/{path.parent.name}/{path.stem}")


def test_a_classes_build_from_the_same_index_adds_its_split_and_keeps_the_others(capsys, tmp_path):
    voc, out = write_voc_tree(tmp_path / "src"), tmp_path / "splits"
    assert run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(out), "--setting", "uni-class"],
                   capsys)[0] == 0
    shutil.copytree(tmp_path / "src", tmp_path / "moved")  # the same files elsewhere: the same index
    for root, extra in ((voc, ["--classes", "3", "--setting", "multi-class"]),
                        (tmp_path / "moved", ["--classes", "14", "--setting", "multi-class"]),
                        (voc, ["--normal", "1,3"])):
        code, _, err = run_cli(["build-splits", "voc", "--root", str(root), "--out", str(out), *extra], capsys)
        assert code == 0, err
    built = sorted(f"{path.parent.name}/{path.stem}" for path in (out / "voc").glob("*/*.json"))
    assert built == ["multi-class/except-14", "multi-class/except-3", "multi-class/normal-1-3",
                     "uni-class/1", "uni-class/14", "uni-class/15", "uni-class/3"]
    for name in built:
        load_split(out, f"voc/{name}")


def test_changed_source_files_under_a_normal_set_are_refused_naming_the_change(capsys, tmp_path):
    root, out = write_coco_tree(tmp_path), tmp_path / "splits"
    build = ["build-splits", "coco", "--root", str(root), "--out", str(out)]
    assert run_cli([*build, "--normal", "1,3"], capsys)[0] == 0
    val = root / "annotations" / "instances_val2014.json"
    data = json.loads(val.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 42]  # image 42 loses its car
    val.write_text(json.dumps(data))
    before = folder_files(out / "coco")
    code, _, err = run_cli([*build, "--classes", "1"], capsys)
    one_line_error(code, err, f"would replace the coco index under {out / 'coco'} (its source files changed since), "
                   "and 1 manifest there built from it (multi-class/normal-1-3)",
                   f"build into another --out, or delete {out / 'coco'} first to replace that build")
    assert folder_files(out / "coco") == before
    shutil.rmtree(out / "coco")
    assert run_cli([*build, "--classes", "1"], capsys)[0] == 0


def test_coco_without_test_images_is_refused(capsys, tmp_path):
    root = write_coco_tree(tmp_path)
    val = root / "annotations" / "instances_val2014.json"
    val.write_text(json.dumps({**json.loads(val.read_text()), "images": [], "annotations": []}))
    out = tmp_path / "o"
    code, _, err = run_cli(["build-splits", "coco", "--root", str(root), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "coco: no split can be formed", "train and the test images")
    assert not out.exists()


def test_a_path_the_user_cannot_read_is_one_line(capsys, tmp_path, monkeypatch):
    # Tests run as root, where permissions are not enforced: the builder raises what a user
    # without read access to another user's unpacked dataset gets.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", "/data/VOCdevkit/VOC2012/JPEGImages")

    monkeypatch.setattr("benchmark.build.build_index", refuse)
    code, _, err = run_cli(["build-splits", "voc", "--root", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert_one_line_error(code, err, "cannot access /data/VOCdevkit/VOC2012/JPEGImages: Permission denied",
                          "permissions")


def test_a_root_name_past_the_file_system_limit_is_one_line(capsys, tmp_path):
    root = tmp_path / ("x" * 300)
    code, _, err = run_cli(["build-splits", "voc", "--root", str(root), "--out", str(tmp_path / "o")], capsys)
    # Python 3.11's Path.exists raises ENAMETOOLONG; newer ones answer False ("does not exist").
    assert_one_line_error(code, err, "x" * 300)


def test_unwritable_out(capsys, tmp_path):
    voc = write_voc_tree(tmp_path / "src")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(["build-splits", "voc", "--root", str(voc), "--out", str(blocker / "splits"),
                            "--setting", "uni-class"], capsys)
    assert_one_line_error(code, err, "cannot write", "--out")


@pytest.mark.parametrize("args", [["build-splits", "voc", "--setting", "sideways"],
                                  ["build-splits", "voc", "--class-order", "random"],
                                  ["build-splits", "voc", "--bogus-flag"]])
def test_bad_options(capsys, tmp_path, args):
    code, _, err = run_cli([*args, "--root", str(tmp_path)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_console_script_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "benchmark.cli", "build-splits", "voc", "--root", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


# --- rebuild hints name how the index was built ---------------------------------------------
def resign_to_another_index(path: Path) -> None:
    """Make the manifest at `path` one built from another index (a valid, signed manifest)."""
    manifest = dataclasses.replace(Manifest.read(path), index_sha256="0" * 64)
    path.write_text(manifest.to_json())


# What is spoiled, how, and what the error says.
HINT_DAMAGES = {
    "damaged index": ("index.json", lambda path: path.write_text("{bad"), "is damaged"),
    "edited manifest": ("uni-class/{split}.json", lambda path: path.write_text("{}"), "incomplete or edited"),
    "manifest of another index": ("uni-class/{split}.json", resign_to_another_index, "another index"),
}


def error_line(dataset: str, split: str, out: Path, capsys) -> str:
    """The one error line a run on the split gets (a dry run, which does not compare a manifest
    with its index: that is where the split's images are loaded)."""
    code, _, err = run_cli(["run", "--method", "knn", "--dataset", dataset, "--classes", split,
                            "--setting", "uni-class", "--out", str(out), "--dry-run"], capsys)
    if code != 0:
        return one_line_error(code, err)
    with pytest.raises(NdbenchError) as info:
        load_split(out / "splits", f"{dataset}/uni-class/{split}")
    return f"{info.value.problem} ({info.value.fix})"
# A build from another folder than the default root, with the options that change the index,
# and the protocol's uni-class split it writes.
OWN_BUILDS = {
    "voc 2007 alphabetical": ("voc", ["--year", "2007", "--class-order", "alphabetical"], "14"),
    "coco 2017": ("coco", ["--year", "2017"], "1"),
}


def own_copy(dataset: str, base: Path) -> Path:
    """A small copy of `dataset` (both VOC releases, or COCO 2017) under `base`; its root."""
    if dataset == "voc":
        write_voc_tree(base, voc2007=True)
        return base
    return write_coco_tree(base, year="2017")


def backticked(line: str) -> str:
    (command,) = re.findall(r"`(ndbench [^`]+)`", line)
    return command


@pytest.mark.parametrize("damage", list(HINT_DAMAGES))
@pytest.mark.parametrize("build", list(OWN_BUILDS))
def test_a_rebuild_hint_names_the_root_and_options_the_index_was_built_with(
    tmp_path, monkeypatch, capsys, build, damage
):
    dataset, options, split = OWN_BUILDS[build]
    monkeypatch.delenv("NDBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the default root, data/<dataset>, does not exist
    root = own_copy(dataset, tmp_path / "my data")  # a space: the hint must quote it
    out = tmp_path / "results"
    folder = out / "splits" / dataset
    code, _, err = run_cli(["build-splits", dataset, "--root", str(root), *options, "--out", str(out / "splits")],
                           capsys)
    assert code == 0, err
    built = {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    name, spoil, needle = HINT_DAMAGES[damage]
    spoil(folder / name.format(split=split))

    line = error_line(dataset, split, out, capsys)
    assert needle in line, line
    command = backticked(line)
    assert f"--root {shlex.quote(str(root))}" in command and " ".join(options) in command, line
    args = shlex.split(command)
    assert args[:3] == ["ndbench", "build-splits", dataset]
    # As hinted, it rebuilds the index it was (a default rebuild finds no data/<dataset>, and
    # for VOC the other year or class order would give other rows and class ids).
    code, _, err = run_cli(args[1:], capsys)
    assert code == 0, err
    assert {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()} == built
    assert load_split(out / "splits", f"{dataset}/uni-class/{split}")[1].name == split


def test_a_default_build_keeps_its_rebuild_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("NDBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    write_voc_tree(tmp_path / "data" / "voc")
    code, _, err = run_cli(["build-splits", "voc", "--setting", "uni-class"], capsys)
    assert code == 0, err
    folder = Path("results/splits/voc")
    assert json.loads((folder / "source.json").read_text())["root"] == str(tmp_path / "data" / "voc")
    assert build_index_fix(folder) == "rebuild it with `ndbench build-splits voc --out results/splits`"
    assert index_build_command(DatasetIndex.read(folder)) == "ndbench build-splits voc"
    # The same root given by hand is the default too.
    code, _, err = run_cli(["build-splits", "voc", "--root", "data/voc", "--setting", "uni-class"], capsys)
    assert code == 0, err
    assert build_index_fix(folder) == "rebuild it with `ndbench build-splits voc --out results/splits`"


def test_a_default_root_from_ndbench_data_is_named_where_it_is_not_the_default(tmp_path, monkeypatch, capsys):
    write_voc_tree(tmp_path / "store" / "voc")
    monkeypatch.setenv("NDBENCH_DATA", str(tmp_path / "store"))
    out = tmp_path / "splits"
    code, _, err = run_cli(["build-splits", "voc", "--out", str(out), "--setting", "uni-class"], capsys)
    assert code == 0, err
    assert build_index_fix(out / "voc") == f"rebuild it with `ndbench build-splits voc --out {out}`"
    monkeypatch.delenv("NDBENCH_DATA")
    assert build_index_fix(out / "voc") == (
        f"rebuild it with `ndbench build-splits voc --root {tmp_path / 'store' / 'voc'} --out {out}`"
    )
    assert index_build_command(DatasetIndex.read(out / "voc")) == (
        f"ndbench build-splits voc --root {tmp_path / 'store' / 'voc'} --out {out}"
    )


@pytest.mark.parametrize("record", [None, "{bad", '{"kind": "built-in", "dataset": "coco", "root": "/x"}',
                                    '{"kind": "built-in", "dataset": "voc", "root": 7}'])
def test_an_index_without_a_readable_record_keeps_the_default_hint(tmp_path, capsys, record):
    write_voc_tree(tmp_path / "src")
    out = tmp_path / "splits"
    code, _, err = run_cli(["build-splits", "voc", "--root", str(tmp_path / "src"), "--out", str(out),
                            "--setting", "uni-class"], capsys)
    assert code == 0, err
    source = out / "voc" / "source.json"
    assert "--root" in build_index_fix(out / "voc")
    if record is None:  # an index built before ndbench recorded its source
        source.unlink()
    else:
        source.write_text(record)
    assert build_index_fix(out / "voc") == f"rebuild it with `ndbench build-splits voc --out {out}`"
