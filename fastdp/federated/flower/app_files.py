"""The app folder Flower ships (as a FAB): pyproject.toml with the run config, and two re-exporting modules."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from fastdp.federated.flower.config import resolve_config

__all__ = ["APP_PACKAGE", "write_app"]

APP_PACKAGE = "fastdp_flower_app"

# Characters a TOML literal string may not hold (control characters other than tab and newline).
_NOT_LITERAL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if "\n" in s and "'''" not in s and not s.endswith("'") and not _NOT_LITERAL.search(s):
        # Multi-line text (the experiment config) stays readable and editable in pyproject.toml;
        # TOML drops the newline right after the opening quotes, so the value is `s` exactly.
        return "'''\n" + s + "'''"
    # A JSON string is a TOML basic string once DEL is escaped (non-ASCII is kept as is: TOML
    # has no surrogate-pair escapes).
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_app(app_dir: str | os.PathLike, run_config: Mapping | None = None) -> Path:
    """Writes the Flower app folder: pyproject.toml (the resolved run config as defaults) and a two-module package.

    The modules only re-export fastdp's apps: the code that runs is the installed fastdp on
    every machine (the SuperLink ships just this folder, as a FAB).
    """
    cfg = resolve_config(run_config)
    app_dir = Path(app_dir)
    pkg = app_dir / APP_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""fastdp Flower app: fastdp.federated.flower\'s ServerApp and ClientApp."""\n')
    # `app = ...` (an assignment, not an import alias): Flower checks the module's syntax tree for it.
    for name in ("serverapp", "clientapp"):
        (pkg / f"{name}.py").write_text(f"from fastdp.federated.flower.{name} import app as _app\n\napp = _app\n")
    config = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in cfg.items())
    (app_dir / "pyproject.toml").write_text(
        f"""[project]
name = "fastdp-flower-app"
version = "0.1.0"
description = "fastdp Sites and Strategy on Flower"
license = "Apache-2.0"
dependencies = ["fastdp[flower]"]

[tool.flwr.app]
publisher = "fastdp"

[tool.flwr.app.components]
serverapp = "{APP_PACKAGE}.serverapp:app"
clientapp = "{APP_PACKAGE}.clientapp:app"

[tool.flwr.app.config]
{config}
""",
        encoding="utf-8",
    )
    return app_dir
