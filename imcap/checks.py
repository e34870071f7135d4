"""Range and type checks of configuration values read from JSON (checkpoint.json, configs): each raises a
ValueError naming the key, e.g. "'model_config.dropout' must be a number in [0, 1), got nan"."""

from __future__ import annotations


def require_int(key: str, value, low: int, high: int) -> None:
    """ValueError naming `key` unless `value` is an integer (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{key}' must be an integer in [{low}, {high}], got {shown(value)}")


def require_number(key: str, value, low: float, high: float, *, open_high: bool = False) -> None:
    """ValueError naming `key` unless `value` is a number (not a bool, not NaN) in [low, high] ([low, high) if
    open_high)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value
    if not (ok and (value < high if open_high else value <= high)):
        raise ValueError(f"'{key}' must be a number in [{low}, {high}{')' if open_high else ']'}, got {shown(value)}")


def require_choice(key: str, value, choices: tuple) -> None:
    """ValueError naming `key` unless `value` is one of `choices` (True is not 1)."""
    if not any(type(value) is type(c) and value == c for c in choices):
        raise ValueError(f"'{key}' must be one of {', '.join(map(repr, choices))}, got {shown(value)}")


def shown(value) -> str:
    """A value of checkpoint.json in a one-line message: its repr, cut to 40 characters."""
    return repr(value)[:40]
