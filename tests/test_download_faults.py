"""`ndbench download` when things go wrong: an interrupt or a kill while an archive's files
are moved into place, a mirror that is not a URL, a damaged unverified archive. Every URL is
on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
from download_fixtures import publish
from test_download import files_under, one_line_error, run, use_table

from benchmark.interrupts import Interrupted
from datasets_builders import archives
from datasets_builders.download import STATE_FOLDER

MASKS = "SegmentationClassAug.zip"
REAL_REPLACE = os.replace


@pytest.fixture
def masks_only(server, serve, tmp_path, monkeypatch) -> tuple[Path, set[str]]:
    """A VOC root whose tarball step is done, so only the unverified masks zip is fetched;
    returns the root and the mask files a complete extraction gives."""
    masks = next(f for f in publish(serve, "voc", 2012, server.url) if f.name == MASKS)
    use_table(monkeypatch, {("voc", 2012): (masks,)})
    root = tmp_path / "voc"
    (root / "VOCdevkit" / "VOC2012").mkdir(parents=True)
    source = tmp_path / "src-voc-2012" / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    return root, {p.name for p in source.iterdir()}


def interrupt_moves(monkeypatch, after: int = 1) -> None:
    """SIGINT (as the CLI raises it) right after the `after`-th move out of a staging folder."""
    moves = []

    def replace(source, target):
        REAL_REPLACE(source, target)
        if any(part.endswith(".extracting") for part in Path(source).parent.parts):  # a staging folder
            moves.append(source)
            if len(moves) == after:
                raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)


def masks_in(root: Path) -> set[str]:
    folder = root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug"
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def test_an_interrupted_move_into_place_leaves_the_earlier_tree(masks_only, server, monkeypatch, capsys):
    root, expected = masks_only
    assert len(expected) > 1
    interrupt_moves(monkeypatch)
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    assert code == 130, err
    assert "an unfinished download stays as <file>.part" in err and "the same command resumes it" in err
    assert masks_in(root) == set()  # nothing of the new tree is left under its final name
    assert not any(".extracting" in name for name in files_under(root / "VOCdevkit"))
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    assert code == 0 and "not checked" not in err, err
    assert masks_in(root) == expected
    assert (root / STATE_FOLDER / f"{MASKS}.done.json").is_file()
    assert [p for p, _ in server.state.requests] == [f"voc/{MASKS}"]  # the kept archive was reused


def test_a_tree_a_killed_extraction_left_is_extracted_again(masks_only, server, monkeypatch, capsys):
    """A process killed mid-move gets no roll-back: the next run must not take what it left
    for a tree laid out by hand."""
    root, expected = masks_only
    monkeypatch.setattr(archives, "_roll_back", lambda placed: None, raising=False)
    interrupt_moves(monkeypatch)
    assert run(["download", "voc", "--root", str(root)], capsys)[0] == 130
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    left = sorted(masks_in(root))
    assert left  # something was moved in
    for name in left[: len(left) // 2 + 1]:  # as if the kill came half-way through a file-by-file move
        (root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug" / name).unlink()
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    assert code == 0, err
    assert "not checked" not in err and "did not finish" in err
    assert masks_in(root) == expected
    assert sorted(p.name for p in (root / STATE_FOLDER).iterdir()) == [f"{MASKS}.done.json"]
    code, _, err = run(["download", "voc", "--root", str(root)], capsys)
    assert code == 0 and "already downloaded and extracted, skipped" in err, err


def test_an_interrupted_merge_into_an_existing_tree_is_moved_back(server, serve, tmp_path, monkeypatch, capsys):
    """The VOC2007 test tarball merges into the trainval one's tree, file by file."""
    trainval, test = publish(serve, "voc", 2007, server.url)
    root = tmp_path / "voc"
    use_table(monkeypatch, {("voc", 2012): (), ("voc", 2007): (trainval,)})
    assert run(["download", "voc", "--year", "2007", "--root", str(root)], capsys)[0] == 0
    before = files_under(root / "VOCdevkit")
    use_table(monkeypatch, {("voc", 2012): (), ("voc", 2007): (trainval, test)})
    interrupt_moves(monkeypatch, after=3)
    code, _, err = run(["download", "voc", "--year", "2007", "--root", str(root)], capsys)
    assert code == 130, err
    assert files_under(root / "VOCdevkit") == before  # the files it added are gone again
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    code, _, err = run(["download", "voc", "--year", "2007", "--root", str(root)], capsys)
    assert code == 0, err
    added = files_under(root / "VOCdevkit") - before
    assert "VOC2007/ImageSets/Main/test.txt" in added and len(added) > 3


@pytest.mark.parametrize("mirror", ["http://[::1", "http://[::1/voc", "http://host:port/x"])
@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_mirror_that_does_not_parse_is_one_line(tmp_path, monkeypatch, capsys, mirror, how):
    args = ["download", "voc", "--root", str(tmp_path / "root")]
    if how == "option":
        args += ["--mirror", mirror]
    else:
        monkeypatch.setenv("NDBENCH_MIRROR", mirror)
    code, _, err = run(args, capsys)
    one_line_error(code, err, f"mirror {mirror!r} is not an http(s):// or file:// URL")
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("dataset", ["voc", "cifar10"])
def test_a_damaged_unverified_archive_is_deleted_and_the_hint_says_so(server, serve, tmp_path, monkeypatch,
                                                                      capsys, dataset):
    table = publish(serve, dataset, 2012 if dataset == "voc" else None, server.url)
    damaged = next(f for f in table if f.archive and (f.name == MASKS or dataset == "cifar10"))
    (serve / dataset / damaged.name).write_bytes(b"<html>quota exceeded</html>")
    unverified = dataclasses.replace(damaged, md5=None, sha256=None, size=None)
    use_table(monkeypatch, {(dataset, 2012 if dataset == "voc" else None): (unverified,)})
    root = tmp_path / dataset
    code, _, err = run(["download", dataset, "--root", str(root)], capsys)
    line = one_line_error(code, err, damaged.name, "the download was deleted", "run the same command again")
    assert "delete it" not in line
    assert not (root / STATE_FOLDER / damaged.name).exists()


def test_an_interrupted_download_of_a_plain_file_says_where_its_part_file_stays(server, serve, tmp_path, monkeypatch,
                                                                                capsys):
    import datasets_builders.download as download
    from datasets_builders.transfer import part_path

    files = publish(serve, "mnist", None, server.url)
    use_table(monkeypatch, {("mnist", None): files})
    root = tmp_path / "mnist"

    def interrupted_fetch(url, dest, **kwargs):
        part_path(dest).write_bytes(b"the first bytes")
        raise Interrupted(signal.SIGINT)

    monkeypatch.setattr(download, "fetch", interrupted_fetch)
    code, _, err = run(["download", "mnist", "--root", str(root)], capsys)
    assert code == 130, err
    part = part_path(root / files[0].target)
    assert part.is_file() and part.parent == root  # not under .ndbench-download/: a .gz is saved as it is
    assert "an unfinished download stays as <file>.part beside where the file goes" in err
