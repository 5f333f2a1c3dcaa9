"""Argument types and the help layout every `bicache-jax` command shares.

Its own module, below `cli`, `bench`, `evaluate` and `train`, so that each command's
parser uses them without importing the others.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """Keeps a description's line breaks and appends each option's default to its help."""


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper bound when high is None);
    argparse names the flag in its error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def int_list(low: int, high: int | None = None) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated integers, each in [low, high]."""
    item = int_in(low, high)

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(item(t) for t in text.split(",") if t.strip())
        if not values:
            raise argparse.ArgumentTypeError("give at least one value")
        return values

    return parse


def choice_list(choices, what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: comma-separated names, each one of `choices` (a `what`)."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(t.strip() for t in text.split(",") if t.strip())
        if not names:
            raise argparse.ArgumentTypeError(f"give at least one {what}")
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; known: "
                                                 f"{', '.join(sorted(choices))}")
        return names

    return parse


def unit_float(text: str) -> float:
    """An argparse type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value
