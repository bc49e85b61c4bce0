"""Method registry: built-ins, get with overrides, unknown names, entry-point plugins."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import methods.registry as registry_module
from datasets_builders.errors import NdbenchError
from methods.base import BaseDetector, config_hash
from methods.registry import Registry, available


@dataclass(frozen=True)
class ToyConfig:
    shift: float = 1.0  # a toy hyper-parameter
    batch_size: int = 4


class ToyDetector(BaseDetector):
    """A detector a third-party package might ship."""

    Config = ToyConfig
    description = "toy plugin"
    paper = "none"

    def fit(self, train, *, device, progress=None):
        self.fitted = True

    def score(self, images, *, device, progress=None):
        return np.full(len(images), self.config.shift)

    def state(self):
        return {}

    def set_state(self, state):
        pass


def test_builtins_are_listed():
    assert "knn" in registry_module.available()


def test_get_applies_overrides_and_keeps_paper_defaults():
    knn = registry_module.get("knn", k=5)
    assert knn.config.k == 5
    assert knn.config.backbone == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert registry_module.get("knn").config.k == 2


def test_unknown_method_and_option_are_one_clear_error():
    with pytest.raises(NdbenchError, match="unknown method 'nope'.*knn"):
        registry_module.get("nope")
    with pytest.raises(NdbenchError, match="no option 'kk'"):
        registry_module.get("knn", kk=3)


def test_config_hash_changes_with_config():
    assert config_hash(registry_module.get("knn").config) != config_hash(registry_module.get("knn", k=3).config)
    assert config_hash(registry_module.get("knn").config) == config_hash(registry_module.get("knn").config)


def test_entry_point_plugin_is_loaded(monkeypatch):
    plugin = EntryPoint(name="toy", value=f"{__name__}:ToyDetector", group=registry_module.ENTRY_POINT_GROUP)

    def fake_entry_points(*, group):
        return [plugin] if group == registry_module.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    registry = registry_module.REGISTRY
    registry.load()  # the built-ins first, so the copy below holds them
    monkeypatch.setattr(registry, "classes", dict(registry.classes))
    monkeypatch.setattr(registry, "loaded", False)
    assert "toy" not in registry.classes
    assert "toy" in registry_module.available() and "knn" in registry_module.available()
    toy = registry_module.get("toy", shift=2.5)
    assert isinstance(toy, ToyDetector) and toy.name == "toy"
    assert toy.score([0, 1, 2], device="cpu").tolist() == [2.5, 2.5, 2.5]


def test_register_refuses_a_second_class_under_one_name():
    fresh = Registry(loaded=True)
    fresh.register("toy")(ToyDetector)

    class Other(ToyDetector):
        pass

    with pytest.raises(ValueError, match="already registered"):
        fresh.register("toy")(Other)


def test_save_load_round_trip(tmp_path):
    toy = ToyDetector(shift=3.0)
    toy.name = "toy"
    toy.fit([], device="cpu")
    toy.save(tmp_path / "toy.pt")
    loaded = type(toy).load(tmp_path / "toy.pt")
    assert loaded.config == toy.config


def test_the_papers_methods_are_all_registered_with_description_and_paper(capsys):
    from benchmark.cli import main
    from methods.registry import available, get_class

    paper_methods = {"knn", "defend", "mkd", "transformaly", "kdad", "msad", "rdad", "dsvdd"}
    assert paper_methods <= set(available())
    for name in paper_methods:
        cls = get_class(name)
        assert cls.name == name and cls.description and cls.paper and "embedded" in cls.presets
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in paper_methods)


def test_the_demo_runs_the_paper_method_its_ablation_and_the_quick_baselines():
    from benchmark.demo import demo_methods

    assert demo_methods(full=False) == ["knn", "mkd", "defend", "transformaly"]
    assert demo_methods(full=True) == available() and len(available()) == 8


def test_the_methods_table_says_what_paper_stands_for_once(capsys):
    from methods.registry import get_class

    labels = {name: get_class(name).preset_labels() for name in available()}
    assert labels["knn"] == ["embedded", "paper (= defaults)", "paper-text"]
    assert labels["kdad"] == ["embedded", "embedded/multi-class", "paper"]
    assert labels["dsvdd"] == ["embedded", "paper (= released_voc)", "released_voc"]
    assert not any("(= paper)" in label for names in labels.values() for label in names)


def test_a_list_option_given_as_text_asks_for_a_json_list():
    with pytest.raises(NdbenchError, match=r"takes .* not '0.5,0.5,0.5' \(write mean as a JSON list: "
                       r"mean=\[0.5,0.5,0.5\]\)$"):
        registry_module.get("knn", mean="0.5,0.5,0.5")
    with pytest.raises(NdbenchError, match=r"not 'a,b' \(write mean as a JSON list, e.g. "
                       r"mean=\[0.5,0.5,0.5\]\)$"):
        registry_module.get("knn", mean="a,b")
