"""`ndbench download` against a local HTTP server serving tiny files in the real layouts:
success (then build-splits on the result), checksum mismatch, a connection cut half-way,
a re-run with everything in place, a missing file, mirrors, no network, --only, unsafe
archives. Nothing here touches the internet: every URL is on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from download_fixtures import evil_tar, publish
from http_fixtures import closed_port_url
from voc_fixtures import TRAIN_2012

from benchmark.cli import main
from datasets_builders import download_table, transfer
from datasets_builders.coco import build_coco_index
from datasets_builders.download import STATE_FOLDER
from datasets_builders.index import DatasetIndex
from datasets_builders.single_object import build_mnist_index
from datasets_builders.voc import build_voc_index


def use_table(monkeypatch, entries: dict) -> None:
    """Point `ndbench download` at a table of tiny files (the real one is never used here)."""
    monkeypatch.setattr(download_table, "TABLE", entries)


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("ndbench: ")]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("ndbench: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_voc_download_lays_out_what_build_splits_reads(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("voc", 2012): publish(serve, "voc", 2012, server.url)})
    monkeypatch.setenv("NDBENCH_DATA", str(tmp_path / "data"))  # the default --root: $NDBENCH_DATA/voc
    code, out, err = run(["download", "voc"], capsys)
    assert code == 0, err
    root = tmp_path / "data" / "voc"
    voc = root / "VOCdevkit" / "VOC2012"
    assert (voc / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == list(TRAIN_2012)
    assert sorted(p.stem for p in (voc / "SegmentationClassAug").glob("*.png")) == sorted(
        p.stem for p in (tmp_path / "src-voc-2012" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").glob("*"))
    assert not (root / "__MACOSX").exists() and not (voc / "__MACOSX").exists()
    # Archives are removed once extracted; only the markers stay; no part file is left.
    assert sorted(p.name for p in (root / STATE_FOLDER).iterdir()) == [
        "SegmentationClassAug.zip.done.json", "VOCtrainval_11-May-2012.tar.done.json"]
    assert not any(name.endswith(".part") for name in files_under(root))
    assert "md5 verified" in err and "sha256 verified" in err and "not verified" in err
    assert "next: ndbench build-splits voc" in out
    # build-splits with no other step reads the trainaug list and the masks, exactly as from the source tree.
    code, _, err = run(["build-splits", "voc", "--out", str(tmp_path / "splits"), "--setting", "uni-class"], capsys)
    assert code == 0, err
    built = DatasetIndex.read(tmp_path / "splits" / "voc")
    (tmp_path / "src-voc-2012" / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation" / "trainaug.txt").write_text(
        "".join(f"{i}\n" for i in TRAIN_2012))
    expected = build_voc_index(tmp_path / "src-voc-2012")
    assert built.rows == expected.rows and len(built.subset("train")) == len(TRAIN_2012)


def test_a_second_run_makes_no_request(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("voc", 2012): publish(serve, "voc", 2012, server.url)})
    root = tmp_path / "voc"
    assert run(["download", "voc", "--root", str(root)], capsys)[0] == 0
    requests = len(server.state.requests)
    before = {p: (root / p).stat().st_mtime_ns for p in files_under(root)}
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    assert code == 0, err
    assert len(server.state.requests) == requests and err.count("skipped") == 3
    assert {p: (root / p).stat().st_mtime_ns for p in files_under(root)} == before


def test_a_dataset_laid_out_by_hand_is_not_downloaded(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("cifar10", None): publish(serve, "cifar10", None, server.url)})
    root = tmp_path / "cifar10"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    code, _, err = run(["download", "cifar10", "--root", str(root)], capsys)
    assert code == 0 and server.state.requests == [] and "not checked" in err
    code, _, err = run(["download", "cifar10", "--root", str(root), "--force"], capsys)
    assert code == 0 and len(server.state.requests) == 1, err


def test_cifar10_and_mnist_then_build_splits(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("cifar10", None): publish(serve, "cifar10", None, server.url),
                            ("mnist", None): publish(serve, "mnist", None, server.url)})
    for dataset in ("cifar10", "mnist"):
        root = tmp_path / dataset
        code, out, err = run(["download", dataset, "--root", str(root)], capsys)
        assert code == 0, err
        assert f"next: ndbench build-splits {dataset} --root {root}" in out.replace("\n", "")
        code, _, err = run(["build-splits", dataset, "--root", str(root), "--out", str(tmp_path / "splits"),
                            "--setting", "uni-class", "--classes", "1"], capsys)
        assert code == 0, err
    assert (tmp_path / "splits" / "cifar10" / "uni-class" / "1.json").is_file()
    assert files_under(tmp_path / "mnist") == {f.name for f in download_table.TABLE[("mnist", None)]}


def test_a_checksum_mismatch_is_one_line_and_keeps_nothing(server, serve, tmp_path, monkeypatch, capsys):
    real = publish(serve, "cifar10", None, server.url)
    use_table(monkeypatch, {("cifar10", None): (dataclasses.replace(real[0], md5="0" * 32),)})
    root = tmp_path / "cifar10"
    code, _, err = run(["download", "cifar10", "--root", str(root)], capsys)
    one_line_error(code, err, "cifar-10-python.tar.gz", "does not match the published " + "0" * 32)
    assert files_under(root) == set()  # no archive under its name, no part file, nothing extracted


def test_a_size_mismatch_is_caught_when_only_the_size_is_published(server, serve, tmp_path, monkeypatch, capsys):
    real = publish(serve, "cifar10", None, server.url)
    use_table(monkeypatch, {("cifar10", None): (dataclasses.replace(real[0], md5=None, size=real[0].size + 1),)})
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "c")], capsys)
    one_line_error(code, err, f"the published size is {real[0].size + 1}")


def test_a_connection_cut_half_way_is_resumed_with_range(server, serve, tmp_path, monkeypatch, capsys):
    table = publish(serve, "cifar10", None, server.url)
    use_table(monkeypatch, {("cifar10", None): table})
    half = table[0].size // 2
    server.state.cut_after["cifar10/cifar-10-python.tar.gz"] = half
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "c")], capsys)
    assert code == 0, err
    assert server.state.requests == [("cifar10/cifar-10-python.tar.gz", None),
                                     ("cifar10/cifar-10-python.tar.gz", f"bytes={half}-")]
    assert "resuming" in err and "md5 verified" in err
    assert (tmp_path / "c" / "cifar-10-batches-py" / "batches.meta").is_file()


def test_a_host_ignoring_range_restarts_cleanly(server, serve, tmp_path, monkeypatch, capsys):
    table = publish(serve, "cifar10", None, server.url)
    use_table(monkeypatch, {("cifar10", None): table})
    server.state.cut_after["cifar10/cifar-10-python.tar.gz"] = table[0].size // 3
    server.state.ignore_range = True
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "c")], capsys)
    assert code == 0 and "md5 verified" in err, err  # the 200 answer replaced the part, not appended to it


def test_an_interrupted_run_is_resumed_by_the_next(server, serve, tmp_path, monkeypatch, capsys):
    table = publish(serve, "cifar10", None, server.url)
    use_table(monkeypatch, {("cifar10", None): table})
    monkeypatch.setattr(transfer, "MAX_RESUMES", 0)
    cut = table[0].size // 2
    server.state.cut_after["cifar10/cifar-10-python.tar.gz"] = cut
    root = tmp_path / "c"
    code, _, err = run(["download", "cifar10", "--root", str(root)], capsys)
    one_line_error(code, err, f"broke off at {cut} bytes", "run the same command again")
    assert files_under(root) == {f"{STATE_FOLDER}/cifar-10-python.tar.gz.part"}
    assert (root / STATE_FOLDER / "cifar-10-python.tar.gz.part").stat().st_size == cut
    code, _, err = run(["download", "cifar10", "--root", str(root)], capsys)
    assert code == 0, err
    assert server.state.requests[-1] == ("cifar10/cifar-10-python.tar.gz", f"bytes={cut}-")


def test_a_file_missing_on_the_server_is_one_line(server, serve, tmp_path, monkeypatch, capsys):
    table = publish(serve, "mnist", None, server.url)
    use_table(monkeypatch, {("mnist", None): table})
    (serve / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    code, _, err = run(["download", "mnist", "--root", str(tmp_path / "m")], capsys)
    one_line_error(code, err, "HTTP 404", f"{server.url}mnist/t10k-images-idx3-ubyte.gz", "--mirror")
    assert any((tmp_path / "m").rglob("*ubyte*"))  # the files fetched before it are kept


def test_no_network_is_one_line_naming_the_url_and_the_fix(serve, tmp_path, monkeypatch, capsys):
    dead = closed_port_url()
    use_table(monkeypatch, {("mnist", None): publish(serve, "mnist", None, dead)})
    code, _, err = run(["download", "mnist", "--root", str(tmp_path / "m")], capsys)
    one_line_error(code, err, f"cannot reach {dead}mnist/", "--mirror", "README")
    assert not (tmp_path / "m").exists()  # nothing fetched: no empty root or state folder left


def test_mirror_replaces_the_official_hosts(server, serve, tmp_path, monkeypatch, capsys):
    # The official URLs lead nowhere; the mirror serves <mirror>/<dataset>/<file name>.
    use_table(monkeypatch, {("cifar10", None): publish(serve, "cifar10", None, closed_port_url())})
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "a"), "--mirror", server.url], capsys)
    assert code == 0, err
    assert server.state.requests == [("cifar10/cifar-10-python.tar.gz", None)]
    monkeypatch.setenv("NDBENCH_MIRROR", server.url.rstrip("/"))
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "b")], capsys)
    assert code == 0 and len(server.state.requests) == 2, err
    monkeypatch.delenv("NDBENCH_MIRROR")
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "c"), "--mirror", serve.as_uri()], capsys)
    assert code == 0 and (tmp_path / "c" / "cifar-10-batches-py").is_dir(), err


def test_only_annotations_fetches_coco_annotations_without_images(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("coco", 2014): publish(serve, "coco", 2014, server.url)})
    root = tmp_path / "coco"
    code, out, err = run(["download", "coco", "--root", str(root), "--only", "annotations"], capsys)
    assert code == 0, err
    assert [path for path, _ in server.state.requests] == ["coco/annotations_trainval2014.zip"]
    assert (root / "annotations" / "instances_train2014.json").is_file() and not (root / "train2014").exists()
    assert "needs the images" in out
    code, _, err = run(["download", "coco", "--root", str(root)], capsys)  # then the images
    assert code == 0, err
    assert [path for path, _ in server.state.requests][1:] == ["coco/train2014.zip", "coco/val2014.zip"]
    assert len(build_coco_index(root).rows) == 8


def test_coco_2017_and_voc_2007(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("coco", 2014): (), ("coco", 2017): publish(serve, "coco", 2017, server.url),
                            ("voc", 2012): (), ("voc", 2007): publish(serve, "voc", 2007, server.url)})
    code, out, err = run(["download", "coco", "--year", "2017", "--root", str(tmp_path / "coco")], capsys)
    assert code == 0 and "--year 2017" in out, err
    assert len(build_coco_index(tmp_path / "coco", year="2017").rows) == 8
    code, _, err = run(["download", "voc", "--year", "2007", "--root", str(tmp_path / "voc")], capsys)
    assert code == 0, err
    # The trainval and the test tarball fill one VOC2007 tree.
    index = build_voc_index(tmp_path / "voc", year=2007)
    assert len(index.subset("train")) == 3 and len(index.subset("test")) == 2


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_an_archive_climbing_out_of_the_root_is_refused(server, serve, tmp_path, monkeypatch, capsys, kind):
    real = publish(serve, "cifar10", None, server.url)[0]
    evil = serve / "cifar10" / "cifar-10-python.tar.gz"
    if kind == "tar":
        evil_tar(evil)
    else:
        real = dataclasses.replace(real, name="evil.zip", url=f"{server.url}cifar10/evil.zip")
        evil = serve / "cifar10" / "evil.zip"
        with zipfile.ZipFile(evil, "w") as bundle:
            bundle.writestr("../evil.txt", b"owned")
    use_table(monkeypatch, {("cifar10", None): (dataclasses.replace(real, md5=None, size=None),)})
    root = tmp_path / "deep" / "cifar10"
    code, _, err = run(["download", "cifar10", "--root", str(root)], capsys)
    one_line_error(code, err, "evil.txt")
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not (root / STATE_FOLDER / f"{real.name}.done.json").exists()


def test_a_damaged_archive_is_one_line(server, serve, tmp_path, monkeypatch, capsys):
    real = publish(serve, "cifar10", None, server.url)[0]
    archive = serve / "cifar10" / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[: real.size // 2])
    use_table(monkeypatch, {("cifar10", None): (dataclasses.replace(real, md5=None, size=None),)})
    code, _, err = run(["download", "cifar10", "--root", str(tmp_path / "c")], capsys)
    one_line_error(code, err, "cannot extract", "cifar-10-python.tar.gz")
    assert not (tmp_path / "c" / "cifar-10-batches-py").exists()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["embedded"], ("generated", "build-splits embedded")),
        (["imagenet"], ("cannot download 'imagenet'", "voc")),
        (["cifar10", "--year", "2012"], ("cifar10 has no --year",)),
        (["voc", "--year", "2010"], ("no voc 2010", "2012 or 2007")),
        (["voc", "--only", "annotations"], ("does not apply to voc",)),
        (["coco", "--only", "images"], ("unknown --only 'images'",)),
        (["voc", "--mirror", "ftp://host/x"], ("not an http(s):// or file:// URL",)),
        (["mnist", "--list", "--force"], ("--list downloads nothing, so --force would do nothing",)),
        (["mnist", "--list", "--keep-archives", "--force"], ("--force and --keep-archives",)),
    ],
)
def test_bad_requests_are_one_line_before_any_work(tmp_path, capsys, args, needles):
    root = tmp_path / "root"
    code, _, err = run(["download", *args, "--root", str(root)], capsys)
    one_line_error(code, err, *needles)
    assert not root.exists()


def test_list_shows_the_real_table_without_fetching(tmp_path, capsys):
    code, out, _ = run(["download", "coco", "--list", "--root", str(tmp_path / "c"), "--mirror", "https://m.example/d"],
                       capsys)
    assert code == 0 and not (tmp_path / "c").exists()
    lines = out.splitlines()
    assert "    https://m.example/d/coco/train2014.zip" in lines
    sha = "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"
    assert f"train2014.zip (13,510,573,713 bytes, sha256 {sha}): extracted into ./" in lines


def test_markers_record_what_was_extracted(server, serve, tmp_path, monkeypatch, capsys):
    table = publish(serve, "cifar10", None, server.url)
    use_table(monkeypatch, {("cifar10", None): table})
    root = tmp_path / "c"
    assert run(["download", "cifar10", "--root", str(root), "--keep-archives"], capsys)[0] == 0
    marker = json.loads((root / STATE_FOLDER / "cifar-10-python.tar.gz.done.json").read_text())
    assert marker["md5"] == table[0].md5 and marker["files"] == 7
    with tarfile.open(root / STATE_FOLDER / "cifar-10-python.tar.gz") as tar:  # kept, and complete
        assert len([m for m in tar.getmembers() if m.isfile()]) == 7


def test_an_unverifiable_zip_that_does_not_extract_is_not_kept(server, serve, tmp_path, monkeypatch, capsys):
    """The masks zip has no published checksum: a host serving an HTML page instead must not
    leave that page behind to be reused by the next run."""
    table = publish(serve, "voc", 2012, server.url)
    use_table(monkeypatch, {("voc", 2012): table})
    masks = serve / "voc" / "SegmentationClassAug.zip"
    good = masks.read_bytes()
    masks.write_bytes(b"<html>quota exceeded</html>")
    root = tmp_path / "voc"
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    one_line_error(code, err, "SegmentationClassAug.zip", "not a readable zip archive")
    assert not (root / STATE_FOLDER / "SegmentationClassAug.zip").exists()
    masks.write_bytes(good)
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    assert code == 0, err
    assert [p for p, _ in server.state.requests].count("voc/SegmentationClassAug.zip") == 2
    assert [p for p, _ in server.state.requests].count("voc/VOCtrainval_11-May-2012.tar") == 1


def test_a_damaged_plain_file_in_place_is_fetched_again(server, serve, tmp_path, monkeypatch, capsys):
    use_table(monkeypatch, {("mnist", None): publish(serve, "mnist", None, server.url)})
    root = tmp_path / "mnist"
    assert run(["download", "mnist", "--root", str(root)], capsys)[0] == 0
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    code, _, err = run(["download", "mnist", "--root", str(root)], capsys)
    assert code == 0 and "fails its check" in err, err
    assert [p for p, _ in server.state.requests][4:] == ["mnist/train-labels-idx1-ubyte.gz"]
    assert len(build_mnist_index(root, variant="mnist").rows) == 22
