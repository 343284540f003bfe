"""TOML in and out for experiment configs: tomllib to read, a small writer for the subset configs use.

The writer covers what :class:`fastdp.experiment.ExperimentConfig` holds: strings, booleans,
integers, floats (including inf/nan), flat lists of those, and nested tables. None has no TOML
spelling, so None values are left out (the loader turns a missing key back into its default).
"""

from __future__ import annotations

import json
import math
import re

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as tomllib
    except ModuleNotFoundError as exc:
        raise ImportError("reading TOML on Python 3.10 needs tomli: pip install tomli") from exc

__all__ = ["dumps", "loads", "parse_value"]

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


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


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest round-tripping form, e.g. 1e-05, 8.0
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def dumps(data: dict, comments: dict[str, str] | None = None) -> str:
    """Nested dicts -> TOML text: scalars of a table first, then its sub-tables ``[a.b]``.

    Args:
        data: nested dicts of TOML-able values; None values are skipped.
        comments: optional ``{"section": "comment"}`` written above a table header.
    """
    comments = comments or {}
    lines: list[str] = []

    def emit(table: dict, prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if v is not None and not isinstance(v, dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            if lines:
                lines.append("")
            if prefix in comments:
                lines.append(f"# {comments[prefix]}")
            lines.append(f"[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"{_key(k)} = {_scalar(v)}")
        for k, v in tables.items():
            emit(v, f"{prefix}.{_key(k)}" if prefix else _key(k))

    emit(data, "")
    return "\n".join(lines) + "\n"
