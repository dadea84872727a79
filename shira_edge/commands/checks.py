"""Click parameter types for numeric flags: a bad value is a usage error (exit 2) before any model loads.

    >>> import click
    >>> FiniteFloat(minimum=0).convert("nan", None, None)     # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    click.exceptions.BadParameter: nan is not a finite number >= 0.

click.FloatRange alone lets NaN through (every comparison with NaN is false), so finiteness is checked first.
"""

from __future__ import annotations

import math

import click


class FiniteFloat(click.ParamType):
    """A finite float >= minimum (or > minimum with open=True)."""

    name = "float"

    def __init__(self, minimum: float | None = None, open: bool = False):
        self.minimum, self.open = minimum, open

    def convert(self, value, param, ctx):
        number = value if isinstance(value, float) else click.FLOAT.convert(value, param, ctx)
        low = self.minimum
        if not math.isfinite(number) or low is not None and (number <= low if self.open else number < low):
            bound = "" if low is None else f" {'>' if self.open else '>='} {low:g}"
            self.fail(f"{value} is not a finite number{bound}.", param, ctx)
        return number
