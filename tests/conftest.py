"""Fixtures shared across test files."""

from __future__ import annotations

from pathlib import Path

import pytest
from small_splits import SMALL

from benchmark.build import BuildRequest, build_splits
from datasets_builders.embedded import ensure_embedded


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
