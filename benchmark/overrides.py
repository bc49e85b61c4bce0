"""`--set` options of a run: NAME=VALUE pairs, and each method's share of them."""

from __future__ import annotations

import difflib
import json
from dataclasses import fields
from typing import Any

from datasets_builders.errors import NdbenchError

# How a multi-class training set is weighted (see `benchmark.runner.WEIGHTINGS`): an option of
# the run rather than of a method, so every job gets it.
WEIGHTING_OPTION = "multi_class_weighting"
RUN_OPTIONS = (WEIGHTING_OPTION,)

_PYTHON_LITERALS = {"True": True, "False": False, "None": None}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`NAME=VALUE` (or `METHOD.NAME=VALUE`) pairs; values parsed as JSON when they can be
    (numbers, booleans, lists), Python's True, False and None read as true, false and null."""
    parsed: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise NdbenchError(f"cannot read --set {item!r}", "write it as NAME=VALUE, e.g. --set epochs=1")
        if name in parsed:
            raise NdbenchError(f"--set {name} is given twice", f"keep one --set {name}=VALUE")
        if value in _PYTHON_LITERALS:
            parsed[name] = _PYTHON_LITERALS[value]
            continue
        try:
            parsed[name] = json.loads(value)
        except json.JSONDecodeError:
            parsed[name] = value
    return parsed


def method_options(method: str) -> set[str]:
    """The option names of a registered method's config."""
    from methods.registry import get_class

    return {f.name for f in fields(get_class(method).Config)}


def split_overrides(methods: list[str], overrides: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Each method's options from a run's `--set`: NAME=VALUE goes to every method of the run
    that has an option NAME, METHOD.NAME=VALUE to that method alone (over a NAME=VALUE of the
    same name); run options go to all. Returns the per-method options and a note for each
    NAME that some methods of the run do not have (they run without it). A NAME no method of
    the run has, or a METHOD that is not in the run, is refused naming the nearest option."""
    options = {method: method_options(method) for method in methods}
    shared = {name: value for name, value in overrides.items() if "." not in name}
    scoped = {name: value for name, value in overrides.items() if "." in name}
    per_method: dict[str, dict[str, Any]] = {method: {} for method in methods}
    notes = []
    for name, value in shared.items():
        takers = [m for m in methods if name in RUN_OPTIONS or name in options[m]]
        if not takers:
            raise _unknown_option(name, methods, options)
        for method in takers:
            per_method[method][name] = value
        if len(takers) < len(methods):
            others = [m for m in methods if m not in takers]
            notes.append(f"--set {name} applies to {_names(takers)} only ({_names(others)} "
                         f"{'has' if len(others) == 1 else 'have'} no such option)")
    for qualified, value in scoped.items():
        method, _, name = qualified.partition(".")
        if method not in options:
            raise NdbenchError(f"--set {qualified}: {method!r} is not a method of this run ({_names(methods)})",
                               f"add it to --method, or write --set {name}=VALUE for every method with {name!r}")
        if name not in options[method]:
            raise _unknown_option(name, [method], options, prefix=f"--set {qualified}: ")
        per_method[method][name] = value
    return per_method, notes


def _unknown_option(name: str, methods: list[str], options: dict[str, set[str]], prefix: str = "") -> NdbenchError:
    problem = (f"{methods[0]} has no option {name!r}" if len(methods) == 1
               else f"no method of this run ({_names(methods)}) has an option {name!r}")
    every = sorted(set().union(*(options[m] for m in methods)))
    close = difflib.get_close_matches(name, every, n=1)
    if close:
        holders = _names([m for m in methods if close[0] in options[m]])
        fix = f"did you mean {close[0]}, an option of {holders}?"
    else:
        fix = f"options: {', '.join(every)}"
    return NdbenchError(prefix + problem, fix)


def _names(methods: list[str]) -> str:
    return ", ".join(methods)
