"""The app folder Flower ships (as a FAB): pyproject.toml with the run config, and two re-exporting modules."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import tomli_w

from fastdp.atomic import atomic_write_text
from fastdp.flower.config import resolve_config

__all__ = ["APP_PACKAGE", "write_app"]

APP_PACKAGE = "fastdp_flower_app"


def write_app(app_dir: str | os.PathLike, run_config: Mapping | None = None) -> Path:
    """Writes the Flower app folder: pyproject.toml (the resolved run config as defaults) and a two-module package.

    The modules only re-export fastdp's apps: the code that runs is the installed fastdp on
    every machine (the SuperLink ships just this folder, as a FAB).
    """
    cfg = resolve_config(run_config)
    app_dir = Path(app_dir)
    pkg = app_dir / APP_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    atomic_write_text(pkg / "__init__.py", '"""fastdp Flower app: fastdp.flower\'s ServerApp and ClientApp."""\n')
    # `app = ...` (an assignment, not an import alias): Flower checks the module's syntax tree for it.
    for name in ("serverapp", "clientapp"):
        atomic_write_text(pkg / f"{name}.py", f"from fastdp.flower.{name} import app as _app\n\napp = _app\n")
    pyproject = {
        "project": {
            "name": "fastdp-flower-app",
            "version": "0.1.0",
            "description": "fastdp Sites and Strategy on Flower",
            "license": "Apache-2.0",
            "dependencies": ["fastdp[flower]"],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fastdp",
                    "components": {
                        "serverapp": f"{APP_PACKAGE}.serverapp:app",
                        "clientapp": f"{APP_PACKAGE}.clientapp:app",
                    },
                    # multi-line strings: the experiment config stays readable and editable there
                    "config": dict(cfg),
                }
            }
        },
    }
    atomic_write_text(app_dir / "pyproject.toml", tomli_w.dumps(pyproject, multiline_strings=True))
    return app_dir
