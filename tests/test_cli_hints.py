"""Every fix works as written and bad options are refused before any work.

1. Each backticked `ndbench ...` command in the package's source (error fixes, help texts,
   docstrings) parses with the CLI as written: its command exists, it takes every option it is
   given and it is given every required one.
2. Each bad option value ends as one line naming the option, exit 2, before any work: nothing
   is written under --out, no embedded scene is generated into the cache.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import typer.main

from benchmark.cli import app, main
from benchmark.overrides import parse_overrides

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "datasets_builders", "methods")
COMMAND = re.compile(r"`(ndbench [^`]+)`")
# Values for the f-string fields of suggested commands (any value of the right kind will do).
SAMPLES = {
    "dataset": "voc",
    "folder.name": "voc",
    "folder.parent": "results/splits",
    "splits_root": "results/splits",
    "self.index.dataset": "voc",
    "index.dataset": "voc",
    "method": "knn",
    "other": "mnist",
    "arch": "vit_tiny_patch16_224",
    "DATASET": "embedded",
    "options": " --setting multi-class --normal 1,2",
}
FIELD = re.compile(r"\{([^{}]+)\}")


def suggested_commands() -> list[tuple[str, str]]:
    """(where, command) of every backticked ndbench command in the package source."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                for command in COMMAND.findall(line):
                    found.append((f"{path.relative_to(ROOT)}:{number}", command))
    return found


def filled(command: str) -> list[str]:
    unknown = [name for name in FIELD.findall(command) if name not in SAMPLES]
    assert not unknown, f"add a sample value for {unknown} to SAMPLES"
    return FIELD.sub(lambda m: SAMPLES[m.group(1)], command).split()[1:]


COMMANDS = suggested_commands()


def test_the_source_suggests_commands():
    assert len(COMMANDS) >= 10 and any("build-splits {dataset} --root" in c for _, c in COMMANDS)


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[f"{w} {c}" for w, c in COMMANDS])
def test_a_suggested_command_parses_as_written(where, command, capsys):
    args = filled(command)
    assert main([*args, "--help"]) == 0, f"{where}: `{command}` -> {capsys.readouterr().err}"
    capsys.readouterr()
    root = typer.main.get_command(app)
    name, rest = args[0], args[1:]
    assert name in root.commands, f"{where}: `{command}`: ndbench has no command {name!r}"
    try:
        root.commands[name].make_context(name, rest)  # parses, checks required values; runs nothing
    except Exception as exc:  # click usage errors
        pytest.fail(f"{where}: `{command}` does not parse: {getattr(exc, 'format_message', exc.__str__)()}")


# --- bad options, before any work ------------------------------------------------------------------
CUDA_MISSING = [] if torch.cuda.is_available() else [(["run", "--method", "knn", "--device", "cuda"], "--device cuda")]
BAD_OPTIONS = [
    (["run", "--method", "knn", "--seeds", "x"], "cannot read --seeds 'x'"),
    (["run", "--method", "knn", "--seeds", "-1"], "--seeds -1 is out of range"),
    (["run", "--method", "knn", "--classes", "a,b"], "cannot read --classes 'a,b'"),
    (["run", "--method", ","], "--method is empty"),
    (["run", "--method", "knn,nope"], "unknown method 'nope'"),
    (["run", "--method", "knn", "--set", "k=abc"], "option 'k' takes int, not 'abc'"),
    (["run", "--method", "knn", "--set", "colour=3"], "has no option 'colour'"),
    (["run", "--method", "knn,mkd", "--set", "dense_epoch=1"],
     "no method of this run (knn, mkd) has an option 'dense_epoch' (options: backbone, batch_size,"),
    (["run", "--method", "knn,defend", "--set", "dense_epoch=1"], "(did you mean dense_epochs, an option of defend?)"),
    (["run", "--method", "knn,mkd", "--set", "defend.dense_epochs=1"],
     "--set defend.dense_epochs: 'defend' is not a method of this run (knn, mkd)"),
    (["run", "--method", "knn,mkd", "--set", "knn.epochs=1"], "--set knn.epochs: knn has no option 'epochs'"),
    (["run", "--method", "kdad", "--set", "img_size=16"],
     "kdad at img_size 16: teacher taps at reductions [4, 8, 16, 16]"),
    (["run", "--method", "kdad", "--set", "backbone=vgg16", "--set", "img_size=16", "--weights", "none",
      "--set", 'teacher_layers=["features.9","features.30"]', "--set", 'score_layers=["features.30"]'],
     "kdad: img_size 16 is too small for its teacher vgg16"),
    (["run", "--method", "knn", "--set", "k"], "cannot read --set 'k'"),
    (["run", "--method", "knn", "--set", "k=3", "--set", "k=4"], "--set k is given twice"),
    (["run", "--method", "knn", "--executor", "slurm"], "unknown executor 'slurm'"),
    (["run", "--method", "knn", "--ray-address", "10.0.0.1:6379"], "--ray-address needs --executor ray"),
    (["run", "--method", "knn", "--retries", "-1"], "--retries -1"),
    (["run", "--method", "knn", "--parallel", "0"], "--parallel 0"),
    (["run", "--method", "knn", "--parallel", "many"], "--parallel many"),
    (["run", "--method", "knn", "--executor", "ray", "--parallel", "2"], "--parallel is for --executor local"),
    (["run", "--method", "knn", "--weights", "/no/such/weights.safetensors"], "--weights /no/such"),
    (["run", "--method", "knn", "--weights", "/"], "--weights /: is a folder, not a file"),
    (["run", "--method", "knn", "--device", "tpu"], "unknown device 'tpu'"),
    *CUDA_MISSING,
    (["run", "--method", "knn", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["run", "--method", "knn", "--setting", "sideways"], "unknown setting 'sideways'"),
    (["maps", "--method", "knn"], "method 'knn' has no anomaly maps"),
    (["maps", "--split", "uni-class"], "cannot read --split"),
    (["maps", "--n", "0"], "--n 0"),
    (["maps", "--n", "100000"], "--n 100000 is too many for one grid"),
    (["maps", "--seed", "-5"], "--seed -5"),
    (["maps", "--weights", "/no/such/file.pt"], "--weights /no/such/file.pt"),
    (["build-splits", "voc", "--setting", "sideways"], "unknown setting 'sideways'"),
    (["build-splits", "voc", "--normal", "1,2", "--setting", "uni-class"], "--normal defines a multi-class split"),
    (["build-splits", "voc", "--normal", "1", "--classes", "2"], "--normal and --classes"),
    (["build-splits", "voc", "--normal", ""], "empty --normal"),
    (["build-splits", "voc", "--classes", "x"], "cannot read --classes 'x'"),
    (["build-splits", "cifar10", "--year", "2012"], "--year does not apply to cifar10"),
    (["build-splits", "voc", "--year", "2010"], "--year 2010"),
    (["build-splits", "mnist", "--class-order", "alphabetical"], "--class-order does not apply to mnist"),
    (["build-splits", "voc", "--class-order", "random"], "unknown class order 'random'"),
    (["build-splits", "imagenet"], "unknown dataset 'imagenet'"),
    (["pretrain", "--out", "weights.pt"], "does not end in .safetensors"),
    (["pretrain", "--arch", "no_such_net"], "no_such_net"),
    (["pretrain", "--device", "tpu"], "unknown device 'tpu'"),
    (["demo", "--device", "tpu"], "unknown device 'tpu'"),
    (["demo", "--parallel", "-2"], "--parallel -2"),
    (["demo", "--out", "/dev/null"], "--out /dev/null is a file, not a folder"),
    (["bench", "--arch", "no_such_vit"], "--arch no_such_vit: unknown timm model"),
    (["bench", "--arch", "resnet18"], "--arch resnet18: backbone ResNet is not a timm VisionTransformer"),
    (["bench", "--steps", "0"], "--steps"),
    (["table"], "run `ndbench run --method knn` first"),
    (["run", "--method", "knn", "--seeds", ""], "--seeds is empty"),
    (["run", "--method", "knn", "--ray-cpus-per-job", "2"], "--ray-cpus-per-job needs --executor ray"),
    (["run", "--method", "knn", "--ray-gpus-per-job", "0.5"], "--ray-gpus-per-job needs --executor ray"),
    (["bench", "--img-size", "100"], "--img-size 100 does not cut into whole 16-pixel patches"),
    (["pretrain", "--out", "/dev/null/w.safetensors"], "--out: /dev/null is a file, not a folder"),
    (["oracle", "--weights", "/no/such.safetensors"], "--weights /no/such.safetensors: no such file"),
    (["oracle", "--weights", "hub"], "the oracle needs the pre-training classifier head"),
    (["oracle", "--arch", "resnet18"], "--arch resnet18 is not a ViT"),
    (["score", "--model", "m.model.pt", "--output", "/dev/null/s.csv", "a.png"], "--output: /dev/null is a file"),
    (["score", "--model", "m.model.pt", "--maps", "/dev/null/maps", "a.png"], "--maps: /dev/null is a file"),
    (["report", "--report-dir", "/dev/null/page"], "--report-dir: /dev/null is a file"),
    (["report", "--report-dir", ""], "--report-dir is empty"),
    (["leaderboard"], "run `ndbench run --method knn` first"),
    (["run", "--method", "knn", "--set", "backbone=vit_tiny_patch16_224", "--weights", "embedded"],
     "vit_tiny_patch16_224 has no embedded weights"),
    (["run", "--method", "knn", "--set", "backbone=vit_tiny_patch16_224"],
     "knn --set backbone=vit_tiny_patch16_224: vit_tiny_patch16_224 has no embedded weights"),
    (["run", "--method", "transformaly", "--preset", "paper"], "transformaly --preset paper sets backbone"),
    (["run", "--method", "knn", "--preset", ""], "--preset is empty"),
    (["run", "--method", "knn", "--set", "backbone=foo"], "--set backbone=foo: unknown timm model 'foo'"),
    (["run", "--method", "knn", "--set", "weights="], "--set weights is empty"),
    (["run", "--method", "knn", "--weights", ""], "--weights is empty"),
    (["run", "--method", "knn", "--set", "mean=0.5,0.5,0.5"], "as a JSON list: mean=[0.5,0.5,0.5]"),
    (["run", "--method", "knn", "--set", "weights=/no/such.pt", "--dry-run"],
     "--set weights=/no/such.pt: no such file"),
]
BACKTICKED = re.compile(r"`[^`]*`")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]*")


def named_options(line: str) -> set[str]:
    """The --options an error line names outside its backticked commands (those are checked
    against the commands they name by test_a_suggested_command_parses_as_written)."""
    return set(OPTION.findall(BACKTICKED.sub("", line)))


def command_options(name: str) -> set[str]:
    """Every --option the ndbench command `name` takes."""
    command = typer.main.get_command(app).commands[name]
    return {opt for param in command.params for opt in (*param.opts, *param.secondary_opts) if opt.startswith("--")}


@pytest.mark.parametrize(("args", "needle"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, args, needle):
    cache, data = tmp_path / "cache", tmp_path / "data"
    cache.mkdir()
    monkeypatch.setenv("NDBENCH_CACHE", str(cache))
    monkeypatch.setenv("NDBENCH_DATA", str(data))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out_args = [] if args[0] in ("pretrain", "demo", "bench", "oracle", "score") else ["--out", str(out)]
    code = main([*args, *out_args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ndbench: error:"), err
    assert needle in lines[0], err
    assert named_options(lines[0]) <= command_options(args[0]) | {"--help"}, f"{lines[0]} names an option " \
        f"`ndbench {args[0]}` does not have"
    assert not out.exists() and list(cache.iterdir()) == [] and not (tmp_path / "results").exists()


def test_run_without_the_data_names_the_commands_that_get_it(tmp_path, monkeypatch, capsys):
    """The hint of a new user's first `run` on VOC names commands that exist (`run` has no --root)."""
    monkeypatch.setenv("NDBENCH_DATA", str(tmp_path / "data"))
    code = main(["run", "--method", "defend", "--dataset", "voc", "--setting", "multi-class",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "voc root" in err and "does not exist" in err
    assert "`ndbench build-splits voc --root DIR`" in err and "`ndbench download voc`" in err
    assert "pass --root" not in err


def test_set_values_read_as_json_or_as_python_literals():
    parsed = parse_overrides(["gcn=False", "pretrain=true", "eval_batch_size=None", "epochs=3", "lr=1e-3",
                               "weights=/data/vit.safetensors", "global_scale=[0.3, 1.0]", "name=True-ish"])
    assert parsed == {"gcn": False, "pretrain": True, "eval_batch_size": None, "epochs": 3, "lr": 1e-3,
                      "weights": "/data/vit.safetensors", "global_scale": [0.3, 1.0], "name": "True-ish"}


def test_the_command_line_answers_help_without_importing_torch():
    # `ndbench --help` and each command's --help are read before any work: importing the CLI
    # must not pull in torch and timm (~6 s on a 2-core machine).
    import subprocess
    import sys

    code = "import sys, benchmark.cli; print(sorted({'torch', 'timm', 'torchvision'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]", loaded.stdout


@pytest.mark.parametrize("group", [[], ["cache"]])
def test_help_lists_each_command_with_its_first_paragraph_on_one_flowing_line(group):
    # Wide enough for every first paragraph: a line break from the docstring would cut one.
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [*group, "--help"], env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.output
    root = typer.main.get_command(app)
    commands = root.commands[group[0]].commands if group else root.commands
    lines = result.output.splitlines()
    for name, command in commands.items():
        first = " ".join(command.help.split("\n\n")[0].split())
        assert any(first in line for line in lines), (name, first)


@pytest.mark.parametrize("command", [["cache", "info"], ["cache", "clear"]])
@pytest.mark.parametrize("file_at", ["cache", "cache/store"])
def test_cache_commands_refuse_a_store_that_cannot_be_used(tmp_path, monkeypatch, capsys, command, file_at):
    monkeypatch.setenv("NDBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / file_at).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file_at).write_text("a file where a folder belongs")
    code = main(command)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert f"{tmp_path / file_at} is a file, not a folder" in lines[0]


def test_pretrain_ship_ignores_out(monkeypatch, tmp_path):
    from methods import shipped_weights

    entry = {"scene_test_instance_accuracy": 0.9, "pool_heldout_accuracy": 0.8, "file": "x.safetensors"}
    monkeypatch.setattr(shipped_weights, "ship", lambda **kwargs: {"weights": {"a": entry}})
    assert main(["pretrain", "--ship", "--out", str(tmp_path / "x.pt")]) == 0
    assert main(["pretrain", "--out", str(tmp_path / "x.pt")]) == 2
