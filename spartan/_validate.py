"""The package's one set of value checkers: each returns the value, normalised, or raises a
one-line ``ValueError`` that names the field, what it must be and what it got.

Numbers may arrive as strings (YAML reads ``3e-3`` as one) or as NumPy scalars: both are taken
when they convert exactly; booleans are never numbers. Pure Python: every module may import it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]`` (either bound optional)."""
    number = _as_int(value)
    if number is None:
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise ValueError(f"{name} must be an integer{_range(minimum, maximum)}, got {value!r}")
    return number


def positive_int(name: str, value: Any) -> int:
    return integer(name, value, minimum=1)


def optional_positive_int(name: str, value: Any) -> int | None:
    return None if value is None else integer(f"{name} (or None)", value, minimum=1)


def number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
) -> float:
    """``value`` as a finite ``float`` in the given range (``minimum`` excluded with ``exclusive_minimum``)."""
    low = "" if minimum is None else (f" > {minimum}" if exclusive_minimum else f" >= {minimum}")
    high = "" if maximum is None else f" <= {maximum}"
    wanted = f"{name} must be a finite number{low}{' and' if low and high else ''}{high}"
    result = _as_float(value)
    if result is None or not math.isfinite(result):
        raise ValueError(f"{wanted}, got {value!r}")
    if minimum is not None and (result <= minimum if exclusive_minimum else result < minimum):
        raise ValueError(f"{wanted}, got {value!r}")
    if maximum is not None and result > maximum:
        raise ValueError(f"{wanted}, got {value!r}")
    return result


def positive_number(name: str, value: Any) -> float:
    return number(name, value, minimum=0, exclusive_minimum=True)


def boolean(name: str, value: Any) -> bool:
    """``True`` or ``False`` (NumPy booleans too); no strings, no numbers."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def string_list(name: str, value: Any) -> list[str] | None:
    """``None``, or a list of non-empty strings (one string becomes a list of one)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be None, a module path or a list of module paths, got {value!r}")
    return list(value)


def identifier(name: str, value: Any) -> str:
    """A name usable as a module attribute: letters, digits, ``_`` and ``-``, not empty, no dots."""
    if not isinstance(value, str) or not value or not all(c.isalnum() or c in "_-" for c in value):
        raise ValueError(
            f"{name} must be a non-empty string of letters, digits, '_' and '-' (no dots or spaces), got {value!r}"
        )
    return value


def _as_int(value: Any) -> int | None:
    return _convert(value, int, operator.index)  # int, NumPy and torch integer scalars


def _as_float(value: Any) -> float | None:
    return _convert(value, float, float)


def _convert(value: Any, parse: Any, convert: Any) -> Any:
    """``parse(text)`` for a string, ``convert(value)`` otherwise; None for booleans or on failure."""
    if isinstance(value, bool) or type(value).__name__ in ("bool", "bool_"):
        return None
    try:
        return parse(value.strip()) if isinstance(value, str) else convert(value)
    except (TypeError, ValueError):
        return None


def _range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""
