"""Argument checks shared by every public constructor: one message format, naming the parameter and its range.

Booleans are refused where numbers are expected (``True`` is not a learning rate), integers must be integers
(``1.5`` is not a seed), and floats must be finite.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[minimum, maximum]``; else raise ``ValueError``."""
    in_range = isinstance(value, int) and not isinstance(value, bool)
    in_range = in_range and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not in_range:
        raise ValueError(f"{name} must be an integer {_range_text(minimum, maximum)}, got {value!r}")
    return value


def check_optional_int(name: str, value: Any, minimum: int | None = None) -> int | None:
    """:func:`check_int`, with ``None`` allowed."""
    return None if value is None else check_int(name, value, minimum)


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    open_minimum: bool = False,
    open_maximum: bool = False,
) -> float:
    """Return ``value`` as a float if it is a finite real number in the given range; else raise ``ValueError``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if open_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if open_maximum else value <= maximum
    if not ok:
        low = "" if minimum is None else ("(" if open_minimum else "[") + f"{minimum:g}"
        high = "" if maximum is None else f"{maximum:g}" + (")" if open_maximum else "]")
        where = f"in {low or '(-inf'}, {high or 'inf)'}" if (low or high) else "finite"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not ``1``, not ``"yes"``); else raise ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise ``ValueError`` listing them."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return ""
