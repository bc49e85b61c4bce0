"""Multi-class training weighting: each image once per normal class it holds ("per-class", the
released code's ConcatDataset of per-class sets) by default, or once ("unique")."""

from __future__ import annotations

import numpy as np
import pytest
from small_splits import fresh_out

from benchmark.cli import main
from benchmark.records import load_records
from benchmark.runner import Job, RunOptions, build_detector, job_data
from methods.knn import KNNDetector


@pytest.fixture
def fake_features(monkeypatch):
    """knn with deterministic stand-in features: only the training set's size matters here."""
    seen: list[int] = []

    def features(self, images, **kwargs):
        seen.append(len(images))
        return np.random.default_rng(len(images)).normal(size=(len(images), 4))

    monkeypatch.setattr(KNNDetector, "features", features)
    return seen


def test_per_class_repeats_list_each_image_once_per_normal_class(splits_root, tmp_path):
    options = RunOptions(out=fresh_out(splits_root, tmp_path), weights="none")
    job = Job("knn", "embedded", "multi-class", "except-0", 0)
    manifest, train, _ = job_data(job, build_detector(job, options), options)
    normal = set(manifest.normal_classes)
    expected = sum(len(normal.intersection(train.index.row(i).classes)) for i in manifest.train)
    assert len(train) == expected > len(manifest.train)
    assert set(train.image_ids) == set(manifest.train)
    many = next(i for i in manifest.train if len(normal.intersection(train.index.row(i).classes)) > 1)
    assert train.image_ids.count(many) == len(normal.intersection(train.index.row(many).classes))
    job = Job("knn", "embedded", "multi-class", "except-0", 0, (("multi_class_weighting", "unique"),))
    _, unique, _ = job_data(job, build_detector(job, options), options)
    assert unique.image_ids == list(manifest.train)


def test_records_carry_the_weighting_and_keep_the_two_apart(splits_root, tmp_path, fake_features):
    out = fresh_out(splits_root, tmp_path)
    base = ["run", "--method", "knn", "--setting", "multi-class", "--classes", "0", "--weights", "none",
            "--device", "cpu", "--out", str(out)]
    assert main(base) == 0
    assert main([*base, "--set", "multi_class_weighting=unique"]) == 0
    records = {r.multi_class_weighting: r for r in load_records(out)}
    assert sorted(records) == ["per-class", "unique"]
    per_class, unique = records["per-class"], records["unique"]
    assert per_class.config_hash != unique.config_hash and per_class.config == unique.config
    assert per_class.counts["train_items"] > per_class.counts["train"] == unique.counts["train_items"]
    assert main([*base[:4], "uni-class", *base[5:]]) == 0
    assert [r.multi_class_weighting for r in load_records(out) if r.setting == "uni-class"] == [""]


def test_unknown_weighting_is_one_line(splits_root, tmp_path, capsys):
    out = fresh_out(splits_root, tmp_path)
    code = main(["run", "--method", "knn", "--set", "multi_class_weighting=double", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "multi_class_weighting" in err[0] and "unique" in err[0]
