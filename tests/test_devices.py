"""`--device`: auto, cpu, cuda and cuda:<n> (a device this machine has); any other torch
device type is refused in one line, exit 2, before any work (bench, oracle, run)."""

from __future__ import annotations

import pytest
import torch

from benchmark.cli import main
from methods.base import resolve_device

COMMANDS = {
    "bench": ["bench", "--no-runs", "--no-loader", "--steps", "1", "--batch-size", "1", "--img-size", "32"],
    "oracle": ["oracle", "--splits", "no-splits-here"],
    "run": ["run", "--method", "knn", "--classes", "0"],
}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("ndbench: error: ")
    return err[0]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["mps", "meta", "xla", "cuda:x", "cuda:0:1", "CPU", ""])
def test_a_device_ndbench_does_not_run_on_is_one_line(command, device, capsys, tmp_path):
    extra = ["--out", str(tmp_path / "out")] if command == "run" else []
    assert main([*COMMANDS[command], "--device", device, *extra]) == 2
    assert f"unknown device {device!r}" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine with one CUDA device, as far as `resolve_device` can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_cuda_device_number_the_machine_lacks_is_one_line(command, one_gpu, capsys, tmp_path):
    extra = ["--out", str(tmp_path / "out")] if command == "run" else []
    assert main([*COMMANDS[command], "--device", "cuda:1", *extra]) == 2
    assert "this machine has 1 CUDA device(s)" in one_error_line(capsys)


def test_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*COMMANDS["bench"], "--device", "cuda:0"]) == 2
    assert "CUDA is not available" in one_error_line(capsys)


def test_the_devices_ndbench_runs_on(one_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_a_cuda_device_number_with_ray_is_one_line(one_gpu, capsys, tmp_path):
    # Ray shows each task only its own GPU, as device 0: cuda:N would fail in every job.
    args = [*COMMANDS["run"], "--executor", "ray", "--out", str(tmp_path / "out")]
    assert main([*args, "--device", "cuda:0"]) == 2
    assert "--device cuda:0 cannot be used with --executor ray" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_every_device_option_names_cuda_n(capsys):
    for command in ("run", "score", "maps", "bench", "oracle", "pretrain", "demo"):
        assert main([command, "--help"]) == 0
        assert "cuda:N" in " ".join(capsys.readouterr().out.split()), command
