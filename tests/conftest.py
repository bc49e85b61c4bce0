"""Fixtures shared across test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from http_fixtures import FileServer
from small_splits import SMALL, fresh_out

from benchmark.build import BuildRequest, build_splits
from benchmark.cli import main
from datasets_builders.embedded import ensure_embedded


@pytest.fixture(scope="session")
def knn_results(splits_root, tmp_path_factory) -> Path:
    """A results root with real knn records on the small splits (random 64 px backbone, so
    cheap): uni-class classes 0 and 1 with seeds 0 and 1, multi-class except-0 with seed 0,
    each job's model saved beside its record."""
    out = fresh_out(splits_root, tmp_path_factory.mktemp("knn-results"))
    common = ["--method", "knn", "--weights", "none", "--device", "cpu", "--out", str(out), "--save-models"]
    assert main(["run", *common, "--classes", "0,1", "--seeds", "0,1"]) == 0
    assert main(["run", *common, "--setting", "multi-class", "--classes", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def splits_root(tmp_path_factory) -> Path:
    """Small embedded splits under <base>/results/splits (scenes cached inside <base>)."""
    base = tmp_path_factory.mktemp("small-embedded")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NDBENCH_CACHE", str(base / "cache"))
        scenes = ensure_embedded(SMALL)
    out = base / "results"
    build_splits(BuildRequest(dataset="embedded", root=scenes, out=out / "splits"))
    return out / "splits"


@pytest.fixture
def faulty(monkeypatch):
    """The test-only "faulty" method (tests/fault_methods.py), registered for one test."""
    from fault_methods import NAME, FaultyDetector

    from methods.registry import REGISTRY

    REGISTRY.load()
    monkeypatch.setitem(REGISTRY.classes, NAME, FaultyDetector)
    monkeypatch.setattr(FaultyDetector, "name", NAME)
    return FaultyDetector


@pytest.fixture
def serve(tmp_path: Path) -> Path:
    """The folder the test's file server serves."""
    folder = tmp_path / "served"
    folder.mkdir()
    return folder


@pytest.fixture
def server(serve: Path):
    """A local HTTP server over `serve` (see http_fixtures.FileServer)."""
    with FileServer(serve) as running:
        yield running
