"""The values a numeric option accepts, checked in one line.

Every numeric field of orpo's configuration carries a `Range` in its metadata (`orpo/train/config.py`; the
fields it inherits from transformers' TrainingArguments get theirs in a table there), and the flags of the
argparse subcommands (`orpo generate`, `orpo chat`, `orpo demo`) take one as their `type`. The same object
checks a value (`check`: one `OrpoError` line naming the flag, the value and what is accepted), describes
what it accepts (for help and errors), and lists values it refuses (`refused`, which the hostile-input
tests feed to every command), so a new field cannot skip the check without its test noticing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from orpo.errors import OrpoError


@dataclass(frozen=True)
class Range:
    """Accepted: finite numbers of `kind` (int or float) within [low, high] (either end open, either end None
    for unbounded), plus the values of `also` (a value outside the bounds with a meaning of its own, e.g. -1),
    plus None where `optional` (the field's unset default). `note` says why, in the error line."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    optional: bool = False
    note: str = ""

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if self.kind is int and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        """E.g. "an integer >= 1", "a finite number in [0, 1)", "-1 or an integer >= 0", "... or unset"."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            if self.low == self.high:
                bounds = f"{self.low:g}"
                what = ""
            else:
                bounds = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            bounds = ""
        text = " ".join(part for part in (what, bounds) if part)
        text = " or ".join([*(f"{value:g}" for value in self.also), text])
        return text + (" or unset" if self.optional else "") + (f" ({self.note})" if self.note else "")

    def check(self, flag: str, value) -> None:
        """One OrpoError line unless `value` is accepted: "--flag VALUE: out of range; accepted: ..."."""
        if not self.accepts(value):
            raise OrpoError(f"--{flag} {value!r}: out of range; accepted: {self.describe()}")

    def refused(self) -> list:
        """Values this range refuses, one of each kind that applies: just below and above the bounds, a
        fraction for integers, NaN and inf for numbers."""
        step = 1 if self.kind is int else 0.5
        values = []
        if self.low is not None:
            values.append(self.low if self.low_open else self.low - step)
        if self.high is not None:
            values.append(self.high if self.high_open else self.high + step)
        if self.kind is int:
            values.append((self.low if self.low is not None else 0) + 1.5)
        else:
            values += [math.nan, math.inf]
        refused = [self.kind(v) if self.kind is int and float(v).is_integer() else v for v in values]
        return [v for v in refused if not self.accepts(v)]

    def __call__(self, text: str):
        """argparse `type=`: the flag's text as a number of `kind`, checked (argparse names the flag)."""
        import argparse

        try:
            value = float(text) if self.kind is float else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if self.kind is int else 'a number'}")
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; accepted: {self.describe()}")
        return value
