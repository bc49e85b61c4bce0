"""Range checks for the methods' config dataclasses (torch-free).

Each config's `__post_init__` names its numeric fields with the `Range` each must lie in,
e.g. `check_ranges(self, epochs=count(), lr=positive(), mask_ratio=between(0, 1, high_open=True))`;
the first value outside its range raises one `NdbenchError` that names the field, the value
and the range ("epochs -1 is not valid (use a whole number >= 1)").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from datasets_builders.errors import NdbenchError

SCALAR, EACH, PAIR = "scalar", "each", "pair"


@dataclass(frozen=True)
class Range:
    """The values a config field accepts: a number in [low, high] (either end open or absent),
    whole numbers only when `whole`; `shape` applies it to the value itself, to every item of
    a tuple ("each") or to both ends of a (low, high) pair ("pair"); `none` says what None
    means where None is accepted; `why` (the reason for the range) ends the hint."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    whole: bool = False
    shape: str = SCALAR
    nonempty: bool = False
    none: str | None = None
    why: str | None = None

    def each(self, *, nonempty: bool = False) -> Range:
        """This range for every item of a tuple (at least one item when `nonempty`)."""
        return replace(self, shape=EACH, nonempty=nonempty)

    def pair(self) -> Range:
        """This range for both ends of a (low, high) pair, with low <= high."""
        return replace(self, shape=PAIR)

    def or_none(self, meaning: str) -> Range:
        """This range, or None, which means `meaning` (e.g. "to use batch_size")."""
        return replace(self, none=meaning)

    def because(self, why: str) -> Range:
        """This range with the reason for it added to the hint."""
        return replace(self, why=why)

    def admits_number(self, value: Any) -> bool:
        """Whether one number lies in the range (a whole number where `whole`; never NaN or inf)."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.whole and not isinstance(value, int) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def admits(self, value: Any) -> bool:
        """Whether a field's value is accepted (a number, a tuple of them or a pair, or None)."""
        if value is None:
            return self.none is not None
        if self.shape == SCALAR:
            return self.admits_number(value)
        if not isinstance(value, tuple | list) or self.nonempty and not value:
            return False
        if self.shape == PAIR and len(value) != 2 or not all(map(self.admits_number, value)):
            return False
        return self.shape != PAIR or value[0] <= value[1]

    def describe(self) -> str:
        """The range in words, as the hint's "use ..." says it."""
        number = "a whole number" if self.whole else "a number"
        if self.low is not None and self.high is not None:
            opening, closing = "(" if self.low_open else "[", ")" if self.high_open else "]"
            bounds = f"in {opening}{_num(self.low)}, {_num(self.high)}{closing}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            bounds = "(finite)"
        text = f"{number} {bounds}"
        if self.shape == EACH:
            text = f"{'one or more items' if self.nonempty else 'items'}, each {text}"
        elif self.shape == PAIR:
            text = f"a pair (low, high) with low <= high, each {text}"
        if self.none is not None:
            text += f", or None {self.none}"
        return text + (f"; {self.why}" if self.why else "")


def _num(value: float) -> str:
    """A bound as written in a hint: 1 for 1.0, 0.5 as it is."""
    return str(int(value)) if float(value).is_integer() else str(value)


def count(minimum: int = 1) -> Range:
    """Whole numbers from `minimum` on (epochs, batch sizes, layers; 0 where 0 means "none")."""
    return Range(low=minimum, whole=True)


def positive() -> Range:
    """Numbers above 0 (learning rates, temperatures, eps)."""
    return Range(low=0, low_open=True)


def non_negative() -> Range:
    """Numbers from 0 on (weight decays, final learning rates, memory budgets where 0 = none)."""
    return Range(low=0)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Range:
    """Numbers from `low` to `high`, each end closed unless said open (ratios, probabilities)."""
    return Range(low=low, high=high, low_open=low_open, high_open=high_open)


def check_value(name: str, value: Any, allowed: Range) -> None:
    """Raise one NdbenchError naming `name`, `value` and the range when `value` is outside it."""
    if not allowed.admits(value):
        raise NdbenchError(f"{name} {value!r} is not valid", f"use {allowed.describe()}")


def check_ranges(config: Any, **ranges: Range) -> None:
    """Check each named field of `config` against its range, in the order given."""
    for name, allowed in ranges.items():
        check_value(name, getattr(config, name), allowed)


# Shared by every config with a `std`: None takes the weights' own, else every item divides.
STD = positive().each(nonempty=True).or_none("to take the weights' own")
# Shared by every config with a `max_cache_gb`: 0 keeps nothing in memory (recompute each time).
CACHE_GB = non_negative().because("0 keeps nothing in memory")
# Drop-path and dropout rates.
DROP_RATE = between(0, 1, high_open=True)
# Adam's betas, SGD's momentum.
MOMENTUM = between(0, 1, high_open=True)
