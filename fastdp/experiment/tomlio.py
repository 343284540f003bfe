"""TOML in and out for experiment configs: tomllib to read, tomli-w to write.

None has no TOML spelling, so None values are left out (the loader turns a missing key back into
its default).
"""

from __future__ import annotations

import tomli_w

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError as exc:
        raise ImportError("reading TOML on Python 3.10 needs tomli: pip install tomli") from exc

__all__ = ["drop_none", "dumps", "loads", "parse_value"]


def loads(text: str) -> dict:
    """Parses TOML text into nested dicts (raises ``tomllib.TOMLDecodeError`` on bad syntax)."""
    return tomllib.loads(text)


def parse_value(text: str):
    """A TOML value from a command-line string: ``3`` -> 3, ``[1, 4]`` -> [1, 4], ``true`` -> True.

    Anything that is not a TOML value is taken as a bare string (``fedprox`` -> "fedprox").
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def drop_none(data: dict) -> dict:
    """A copy of nested dicts without the None values."""
    return {k: drop_none(v) if isinstance(v, dict) else v for k, v in data.items() if v is not None}


def dumps(data: dict) -> str:
    """Nested dicts -> TOML text (tomli-w); None values are left out (TOML has no null)."""
    return tomli_w.dumps(drop_none(data))
