"""Where `ndbench score` and the atomic writers put files: symlinks are written through, and a
target that is not a regular file (FIFO, socket, device) or that another output of the same
call takes is refused in one line before any scoring."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import one_line_error
from defend_fixtures import TINY_CONFIG
from test_score import fit_and_save, read_csv, write_images

from benchmark.cli import main
from datasets_builders.atomic import atomic_write_bytes, atomic_write_files, atomic_write_text
from datasets_builders.errors import WriteFailure
from methods.defend import MKDDetector
from methods.knn import KNNDetector
from methods.registry import get


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny knn and a tiny mkd (which draws heat maps) fitted on random PNGs, saved; and images."""
    base = tmp_path_factory.mktemp("score-outputs")
    train = write_images(base / "train", 4, seed=0)
    return {"knn": fit_and_save(KNNDetector(**TINY_CONFIG), train, base / "knn"),
            "mkd": fit_and_save(get("mkd", **TINY_CONFIG, epochs=1), train, base / "mkd"),
            "images": base / "train"}


@pytest.fixture
def no_scoring(monkeypatch):
    """Fail the test if a detector scores anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("scored before refusing the output")

    for cls in (KNNDetector, MKDDetector):
        monkeypatch.setattr(cls, "score", refuse)


def score(models: dict[str, Path], method: str, *extra: str) -> int:
    """`ndbench score` of the fixture's images with its `method` model on the CPU."""
    return main(["score", "--model", str(models[method]), str(models["images"]), "--device", "cpu", *extra])


def test_a_symlinked_output_is_written_through_and_stays_a_link(models, tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real.name)
    assert score(models, "knn", "--output", str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == real.name
    assert len(read_csv(real.read_text())) == 4


# No device node here: run as root, a regression would replace it.
@pytest.mark.parametrize(("kind", "said"), [("fifo", "is a FIFO"), ("socket", "is a socket"),
                                            ("link to a fifo", "is a FIFO")])
def test_an_output_that_is_not_a_regular_file_is_refused_before_scoring(models, tmp_path, capsys, monkeypatch,
                                                                        no_scoring, kind, said):
    target = tmp_path / "scores.csv"
    if kind == "socket":
        monkeypatch.chdir(tmp_path)  # a relative name: socket paths are limited to ~100 bytes
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(target.name)  # the socket file stays after the close
    else:
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)
        if kind == "fifo":
            target = fifo
        else:
            target.symlink_to(fifo)
    before = os.lstat(target)
    code = score(models, "knn", "--output", str(target))
    one_line_error(code, capsys.readouterr().err, f"cannot write {target}: it {said}, not a regular file")
    after = os.lstat(target)
    assert (stat.S_IFMT(after.st_mode), after.st_ino) == (stat.S_IFMT(before.st_mode), before.st_ino)


def test_a_map_target_that_is_not_a_regular_file_is_refused_before_scoring(models, tmp_path, capsys, no_scoring):
    maps = tmp_path / "maps"
    maps.mkdir()
    os.mkfifo(maps / "img1.png")
    code = score(models, "mkd", "--maps", str(maps), "--output", str(tmp_path / "scores.csv"))
    one_line_error(code, capsys.readouterr().err, f"cannot write {maps / 'img1.png'}: it is a FIFO")
    assert stat.S_ISFIFO(os.lstat(maps / "img1.png").st_mode) and sorted(os.listdir(maps)) == ["img1.png"]
    assert not (tmp_path / "scores.csv").exists()


@pytest.mark.parametrize("output", ["maps/img0.png", "link.png"])
def test_an_output_that_is_one_of_the_maps_is_refused_before_scoring(models, tmp_path, capsys, no_scoring, output):
    maps = tmp_path / "maps"
    (tmp_path / "link.png").symlink_to(maps / "img2.png")  # dangling until the map is written
    code = score(models, "mkd", "--maps", str(maps), "--output", str(tmp_path / output))
    shown = models["images"] / ("img0.png" if output.startswith("maps") else "img2.png")
    one_line_error(code, capsys.readouterr().err, f"is also the heat map of {shown}")
    assert not maps.exists()


def test_output_dev_stdout_prints_the_csv_and_other_streams_are_refused_by_name(models):
    """Through a pipe, /dev/stdout resolves to no file: the CSV is printed as without --output;
    /dev/stderr on a pipe is refused naming --output, the option score has."""
    tests = Path(__file__).resolve().parent
    cli = "import sys, defend_fixtures; from benchmark.cli import main; sys.exit(main())"  # registers the tiny ViT
    command = [sys.executable, "-c", cli, "score", "--model", str(models["knn"]), str(models["images"]),
               "--device", "cpu", "--output"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent)])}
    printed = subprocess.run([*command, "/dev/stdout"], capture_output=True, text=True, env=env)
    assert printed.returncode == 0, printed.stderr
    assert [row["image"] for row in read_csv(printed.stdout)] == [str(p) for p in sorted(models["images"].iterdir())]
    refused = subprocess.run([*command, "/dev/stderr"], capture_output=True, text=True, env=env)
    one_line_error(refused.returncode, refused.stderr,
                   "--output /dev/stderr is a pipe of this process, not a file (give a file path with --output)")
    assert refused.stdout == ""


def test_atomic_writers_refuse_what_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for write in (lambda: atomic_write_bytes(fifo, b"x"), lambda: atomic_write_text(fifo, "x"),
                  lambda: atomic_write_files({tmp_path / "first.txt": "a", fifo: "b"})):
        with pytest.raises(WriteFailure, match="is a FIFO, not a regular file"):
            write()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]  # nothing staged, nothing half-written


def test_atomic_writers_write_through_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).symlink_to(Path("real") / name)  # dangling: the write creates the file
    atomic_write_bytes(tmp_path / "a.txt", b"bytes")
    atomic_write_files({tmp_path / "b.txt": "b", tmp_path / "c.txt": "c"})
    atomic_write_text(tmp_path / "c.txt", "c again")
    assert all((tmp_path / name).is_symlink() for name in ("a.txt", "b.txt", "c.txt"))
    assert [(tmp_path / "real" / name).read_text() for name in ("a.txt", "b.txt", "c.txt")] == ["bytes", "b", "c again"]
    assert sorted(os.listdir(tmp_path / "real")) == ["a.txt", "b.txt", "c.txt"]


def test_atomic_writers_write_undecodable_names_as_their_bytes(tmp_path):
    """Text naming a file the system handed over undecoded ("caf\\udce9" for Latin-1 bytes)."""
    name = os.fsdecode(b"caf\xe9.png")
    atomic_write_text(tmp_path / "a.csv", f"{name}\n")
    atomic_write_files({tmp_path / "b.csv": f"{name}\n"})
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes() == b"caf\xe9.png\n"


def test_the_device_help_names_cuda_n():
    """`--device cuda:1` is accepted, so the help says so."""
    from typer.testing import CliRunner

    from benchmark.cli import app

    result = CliRunner().invoke(app, ["score", "--help"], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    device = next(line for line in result.output.splitlines() if "--device" in line)
    assert "cuda:N" in device, device


def files_under(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` (hidden ones too) and what it holds."""
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize(("existed", "nth"), [(True, 1), (True, 3), (True, 5), (False, 3), (False, 5)])
def test_an_interrupt_while_the_outputs_are_put_in_place_leaves_the_old_ones(models, tmp_path, capsys,
                                                                            monkeypatch, existed, nth):
    """The CSV and the 4 maps land as one step: interrupted at the `nth` of their 5 replaces,
    the CSV and the maps are all as they were (or all absent), with no temporary file left."""
    import signal

    from benchmark.interrupts import Interrupted

    output, maps = tmp_path / "out" / "scores.csv", tmp_path / "maps"
    if existed:
        assert score(models, "mkd", "--maps", str(maps), "--output", str(output)) == 0
        for path in [output, *maps.iterdir()]:
            path.write_bytes(b"earlier " + path.name.encode())
    before = files_under(tmp_path)
    targets = {output, *(maps / p.with_suffix(".png").name for p in models["images"].iterdir())}
    assert len(targets) == 5
    real, replaced = os.replace, []

    def replace_then_interrupt(src, dst, **kwargs):
        if Path(dst) in targets:
            replaced.append(dst)
            if len(replaced) == nth:
                raise Interrupted(signal.SIGINT)
        return real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    code = score(models, "mkd", "--maps", str(maps), "--output", str(output))
    monkeypatch.undo()
    assert code == 130 and "nothing half-written was kept" in capsys.readouterr().err
    assert files_under(tmp_path) == before
    if not existed:
        assert not maps.exists() and not output.parent.exists()
